"""Instance Unlearn LoRA's training inputs come from UnlearnConfig's options table.

Names map onto fields in one place (nodes/config_inputs.py); defaults, bounds and choices are the
config's, so a value the config refuses is refused with the same message from the node; every
field a user can set has an input; inputs added later come after the older widgets, so a saved
workflow's values land in the same widgets.
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import tree
from workflow_check import load_workflows, widgets

from .helpers import TRAIN, assert_same_weights, run, snapshot

pytestmark = pytest.mark.comfyui


@pytest.fixture(scope="module")
def mapping(pack):
    from instance_unlearn.nodes import config_inputs
    from instance_unlearn.unlearn_core.method.config import UnlearnConfig, options

    return {"module": config_inputs, "options": options(), "UnlearnConfig": UnlearnConfig}


@pytest.fixture(scope="module")
def definition(pack):
    from instance_unlearn.nodes.unlearn_lora import InstanceUnlearnLoRA

    return InstanceUnlearnLoRA.GET_NODE_INFO_V1()


def spec_of(definition: dict, name: str) -> tuple[str, dict]:
    inputs = {**definition["input"]["required"], **definition["input"].get("optional", {})}
    kind, options = inputs[name][0], inputs[name][1]
    return ("COMBO" if isinstance(kind, list) else kind), options


def test_every_config_field_a_user_can_set_has_an_input(mapping):
    module, options = mapping["module"], mapping["options"]
    mapped = list(module.FIELDS.values())
    assert len(mapped) == len(set(mapped)), "two inputs set one field"
    assert set(mapped).isdisjoint(module.WITHOUT_INPUT)
    assert set(mapped) | set(module.WITHOUT_INPUT) == set(options), "a config field has neither an input nor a reason"
    assert module.WITHOUT_INPUT == {"adapter": module.WITHOUT_INPUT["adapter"]}  # only adapter, with its reason


def test_old_input_names_are_kept_and_the_new_ones_are_optional(mapping, definition):
    module = mapping["module"]
    assert module.FIELDS["rank"] == "lora_rank", "saved workflows call it rank"
    required, optional = definition["input"]["required"], definition["input"]["optional"]
    assert set(module.FIRST) <= set(required) and set(module.ADDED) <= set(optional)


def test_inputs_have_the_configs_defaults_choices_and_help(mapping, definition):
    module, options = mapping["module"], mapping["options"]
    defaults = mapping["UnlearnConfig"]()
    for name, field in module.FIELDS.items():
        option = options[field]
        kind, spec = spec_of(definition, name)
        assert kind == {"choice": "COMBO", "int": "INT", "float": "FLOAT", "bool": "BOOLEAN", "names": "STRING"}[option.kind], name
        assert spec["tooltip"].lower().startswith(option.help.lower()), name
        # the widget's default, read back through the node's mapping, is the config's default
        assert module.config_from_inputs({name: spec["default"]}) == defaults, name
        if kind == "COMBO":
            assert spec["options"] == list(option.choices) and spec["default"] == option.default, name


def nudged(value, kind: str, direction: int):
    """One step beyond ``value``: 1 for a whole number, a relative 1e-9 for a float (no subnormals)."""
    if kind == "INT":
        return value + direction
    return float(value) + direction * 1e-9 * max(1.0, abs(value))


def test_number_bounds_are_exactly_what_the_config_accepts(mapping, definition):
    """The widget's min/max are the config's range: the edge values pass through the node's mapping,
    one step beyond them is refused (an open lower end is refused at min itself)."""
    module, options = mapping["module"], mapping["options"]
    from instance_unlearn.unlearn_core.errors import InputError

    checked = 0
    for name, field in module.FIELDS.items():
        kind, spec = spec_of(definition, name)
        if kind not in ("INT", "FLOAT"):
            continue
        option = options[field]
        low, high = spec["min"], spec.get("max")
        assert (low, high) == (option.low, option.high), name
        with pytest.raises(InputError, match=f"^{field}="):
            module.config_from_inputs({name: nudged(low, kind, -1)})
        if option.optional:  # min is 0, which the node reads as None
            assert getattr(module.config_from_inputs({name: low}), field) is None
        elif option.low_open:
            with pytest.raises(InputError, match=f"^{field}="):
                module.config_from_inputs({name: low})
        else:
            assert getattr(module.config_from_inputs({name: low}), field) == low
        if high is not None:
            assert getattr(module.config_from_inputs({name: high}), field) == high
            with pytest.raises(InputError, match=f"^{field}="):
                module.config_from_inputs({name: nudged(high, kind, 1)})
        checked += 1
    assert checked >= 12


def test_saved_workflows_keep_their_values_in_the_same_widgets(definition):
    """The frontend fills saved values into widgets by position: every saved name must still sit where it was."""
    names = [w.name for w in widgets(definition)]
    saved = [n for w in load_workflows().values() for n in w["nodes"] if n["type"] == "InstanceUnlearn_TrainLoRA"]
    assert saved
    for node in saved:
        assert names[: len(node["widgets_values"])] == list(node["widgets_values_named"])
    oldest = min(len(node["widgets_values"]) for node in saved)  # the SD3.5 workflows, saved before the newer inputs
    added = names[oldest:]
    from instance_unlearn.nodes.config_inputs import ADDED

    # then the forgetting check's own widgets (what it judges with), which set no config field, then the
    # earlier result a second request continues from
    assert added == [*ADDED, "copy_detector", "forget_threshold", "existing_lora"], "the inputs added since the workflows were saved come after every older widget"


def out_of_bounds(option, spec) -> object:
    if option.kind == "choice":
        return "no_such_choice"
    if option.kind == "bool":
        return "yes"
    if option.kind == "names":
        return ","
    if spec.get("max") is not None:
        return spec["max"] * 2 + 1
    return -1


def test_a_value_outside_the_config_is_refused_by_the_node_with_the_configs_message(comfy, loaded, node, with_surrogates,
                                                                                   mapping, definition):  # fmt: skip
    from instance_unlearn.unlearn_core.errors import InputError

    module, options = mapping["module"], mapping["options"]
    files, weights = tree(comfy["base"]), snapshot(loaded["model"])
    for name, field in module.FIELDS.items():
        option = options[field]
        bad = out_of_bounds(option, spec_of(definition, name)[1])
        with pytest.raises(InputError) as from_config:
            mapping["UnlearnConfig"](**{field: () if option.kind == "names" else bad})
        with pytest.raises(InputError) as from_node:
            run(node["train"], model=loaded["model"], targets=with_surrogates[0], lora_name="tests/refused",
                **dict(TRAIN, **{name: bad}))  # fmt: skip
        assert str(from_node.value) == str(from_config.value), name
    assert tree(comfy["base"]) == files, "a refused run wrote files"
    assert_same_weights(loaded["model"], weights)


def trained_config(comfy, node, loaded, with_surrogates, name: str, **inputs) -> tuple[dict, dict]:
    _, lora, _, saved = run(node["train"], model=loaded["model"], targets=with_surrogates[0], lora_name=name,
                            **dict(TRAIN, steps=1, **inputs))  # fmt: skip
    from safetensors import safe_open

    with safe_open(str(comfy["base"] / "models" / "loras" / saved), framework="pt") as handle:
        return json.loads(handle.metadata()["unlearn.config"]), lora


def test_a_prompt_saved_before_the_new_inputs_trains_with_the_configs_defaults(comfy, loaded, node, with_surrogates, mapping):
    config, lora = trained_config(comfy, node, loaded, with_surrogates, "tests/old_prompt")
    module = mapping["module"]
    expected = module.config_from_inputs({k: v for k, v in dict(TRAIN, steps=1).items() if k in module.FIELDS}).to_dict()
    assert config == expected
    assert all(torch.equal(v, torch.tensor(float(TRAIN["rank"]))) for k, v in lora.items() if k.endswith(".alpha"))


def test_the_new_inputs_reach_training(comfy, loaded, node, with_surrogates):
    """alpha, clipping, the LoRA's layers and the method options arrive in the config the LoRA records,
    and alpha and the layers in the LoRA itself."""
    new = dict(lora_alpha=2.0, grad_clip=0.0, target_modules="qkv", weighting="constant", constant_lambda=0.3,
               forget_space="native", remember_weight="complement", balance="scale", balance_ratio=0.25,
               forget_noise="own", own_noise_spread=0.2, remember_target="data", stop_when_forgotten=False, check_every=3,
               check_margin=0.1, check_nearby=1, raise_after=7, raise_factor=1.5, repair_when_forgotten=False,
               check_confirmations=3)  # fmt: skip
    config, lora = trained_config(comfy, node, loaded, with_surrogates, "tests/new_inputs", **new)
    assert config["lora_alpha"] == 2.0 and config["grad_clip"] is None and config["target_modules"] == ["qkv"]
    method_options = ("weighting", "constant_lambda", "forget_space", "remember_weight", "balance", "balance_ratio",
                      "forget_noise", "own_noise_spread", "remember_target", "stop_when_forgotten", "check_every",
                      "check_margin", "check_nearby", "raise_after", "raise_factor", "repair_when_forgotten",
                      "check_confirmations")  # fmt: skip
    assert {k: config[k] for k in method_options} == {k: new[k] for k in method_options}
    alphas = {k: v for k, v in lora.items() if k.endswith(".alpha")}
    assert alphas and all(float(v) == 2.0 for v in alphas.values()), "the LoRA's alpha is config.effective_alpha"
    assert all(k.removesuffix(".alpha").endswith(".qkv") for k in alphas), "only the named layers got a LoRA"
    baseline = trained_config(comfy, node, loaded, with_surrogates, "tests/baseline_inputs")[1]
    assert any(k.endswith(".proj.alpha") for k in baseline), "the default set also holds the output projections"


def test_own_forget_noise_is_the_noise_each_target_was_sampled_from(loaded, node, with_surrogates, monkeypatch):
    import comfy.sample

    from instance_unlearn.unlearn_core.method import lora_run

    trained_on, original = [], lora_run.train_unlearning

    def recording(denoiser, process, data, *args, **kwargs):
        trained_on.append(data.forget.noise)
        return original(denoiser, process, data, *args, **kwargs)

    monkeypatch.setattr(lora_run, "train_unlearning", recording)
    inputs = dict(TRAIN, steps=2, lora_name="")
    own = run(node["train"], model=loaded["model"], targets=with_surrogates[0], **inputs, forget_noise="own")[1]
    fresh = run(node["train"], model=loaded["model"], targets=with_surrogates[0], **inputs, forget_noise="fresh")[1]
    target = with_surrogates[0].targets[0]
    # the stock KSampler draws one noise tensor for the whole batch; the target was image batch_index of it
    batch = torch.zeros(target.provenance["batch_index"] + 1, *target.latent.shape)
    sampled_from = comfy.sample.prepare_noise(batch, target.provenance["seed"])[target.provenance["batch_index"]]
    assert torch.equal(trained_on[0][0], sampled_from.float())
    assert any(not torch.equal(own[k], fresh[k]) for k in own), "forget_noise=own trained the same LoRA as fresh"


@pytest.mark.parametrize("node_id", ["InstanceUnlearn_TrainLoRA", "InstanceUnlearn_PreserveCheck"])
def test_the_help_page_names_every_input(pack, node_id):
    import re

    from workflow_check import ROOT

    from instance_unlearn.nodes.extension import NODES

    definition = next(cls for cls in NODES if cls.GET_NODE_INFO_V1()["name"] == node_id).GET_NODE_INFO_V1()
    page = (ROOT / "web" / "docs" / f"{node_id}.md").read_text()
    names = [*definition["input"]["required"], *definition["input"].get("optional", {})]
    assert [n for n in names if not re.search(rf"\b{n}\b", page)] == []
