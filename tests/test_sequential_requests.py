"""Requests one after another on one model line: a job continues from earlier results, keeps their
targets in its forget set, writes the exact sum of the line, and chains the model state."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from conftest import make_tiny_sd3, quick_job, save_targets, sd3_cond
from safetensors.torch import load_file, save_file

from unlearn_core import InputError, load_lora
from unlearn_core.cli import main
from unlearn_core.formats.apply import apply_to_folder, merge_into
from unlearn_core.formats.model_folders import ModelCache, locate
from unlearn_core.serve import provider
from unlearn_core.serve.earlier import model_state
from unlearn_core.serve.provider import run_job

SD3 = {"kind": "sd3"}


def line(tmp_path, config=None, **job):
    """A base SD3 folder and a first request on it (``job`` updates the job); returns the first job."""
    make_tiny_sd3().save_pretrained(tmp_path / "transformer")
    save_targets(tmp_path / "first.safetensors", channels=4, cond=sd3_cond(1), seed=0)
    save_targets(tmp_path / "second.safetensors", channels=4, cond=sd3_cond(2, seed=5), n=2, seed=7)
    first = quick_job("transformer", "first.safetensors", output="one/forget.safetensors", model=SD3, config=config or {}, **job)
    run_job(first, tmp_path)
    return first


def second_job(first: dict, **changes) -> dict:
    return {**first, "targets": "second.safetensors", "output": "two/forget.safetensors",
            "earlier": ["one/forget.safetensors"], **changes}  # fmt: skip


def test_a_second_request_trains_on_the_first_keeps_its_target_and_writes_the_line(tmp_path):
    first = line(tmp_path)
    models = ModelCache()
    source = locate({"path": "transformer", **SD3}, tmp_path)
    model = models.get(source)[0].model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    run_job(second_job(first), tmp_path, models=models)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()), "the cached base model changed"

    one, two = tmp_path / "one", tmp_path / "two"
    report_one = json.loads((one / "forget.report.json").read_text())
    report_two = json.loads((two / "forget.report.json").read_text())
    # the second trained on the state the first produced, and names it
    assert report_two["model_state"]["sha256"] == report_one["result_state"]["sha256"] != report_one["model_state"]["sha256"]
    assert report_two["earlier"] == [{"file": "forget.safetensors", "sha256": report_one["files"]["forget.safetensors"]}]
    base = report_one["base_model"]["files_sha256"]
    assert report_two["result_state"] == model_state(base, [report_one["files"]["forget.safetensors"],
                                                            report_two["files"]["forget.safetensors"]])  # fmt: skip
    # the first target stays in the forget set, first, and is judged again
    trained_one, trained_two = load_file(str(one / "forget.training.safetensors")), load_file(str(two / "forget.training.safetensors"))
    assert torch.equal(trained_two["targets"][:1], trained_one["targets"]) and len(trained_two["targets"]) == 3
    assert torch.equal(trained_two["noise"][:1], trained_one["noise"])
    assert report_two["targets"][0] == {"earlier": "forget.safetensors"} and "noise" in report_two["targets"][1]
    assert len(report_two["verification"]["baseline"]["counted"]) == 3
    # its base-copy marks come from its own request (the served model no longer makes it), not regenerated
    assert report_two["verification"]["baseline"]["counted"][0] == report_one["verification"]["baseline"]["counted"][0]
    assert report_two["verification"]["baseline"]["own_similarity"][0] is None

    # the merged file is the whole line: applying it equals applying both results in order
    merged = load_lora(two / "forget.merged.safetensors")
    assert json.loads(merged.metadata["unlearn.merged_of"]) == ["forget.safetensors", "forget.safetensors"]
    assert merged.metadata["unlearn.model_state"] == report_two["result_state"]["sha256"]
    stacked = merge_into(merge_into(make_tiny_sd3(), one / "forget.safetensors"), two / "forget.safetensors")
    at_once = merge_into(make_tiny_sd3(), merged)
    for (name, a), b in zip(stacked.state_dict().items(), at_once.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-6), name


def test_continuing_equals_training_with_the_earlier_result_applied_by_hand(tmp_path):
    """The same data on the base with the first LoRA merged into a model folder gives the same LoRA."""
    fixed = {"stop_when_forgotten": False}
    first = line(tmp_path, fixed)
    # the new targets with everything given, so both runs train on identical data
    new = load_file(str(tmp_path / "second.safetensors"))
    new["surrogates"] = new["targets"].flip(-1)
    new["noise"] = torch.randn(new["targets"].shape, generator=torch.Generator().manual_seed(3))
    new["remember"] = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(4))
    new.update({f"remember.{k}": v[:1].repeat(3, *([1] * (v.dim() - 1))) for k, v in sd3_cond(1, seed=9).items()})
    save_file(new, str(tmp_path / "second.safetensors"))
    run_job(second_job(first), tmp_path)

    by_hand = tmp_path / "by_hand"
    apply_to_folder(tmp_path / "transformer", tmp_path / "one" / "forget.safetensors", by_hand)
    earlier = load_file(str(tmp_path / "one" / "forget.training.safetensors"))
    joined = {key: torch.cat([earlier[key], new[key]]) for key in ("targets", "surrogates", "noise", *sd3_cond(1))}
    joined.update({k: v for k, v in new.items() if k.startswith("remember")})
    save_file(joined, str(tmp_path / "joined.safetensors"))
    run_job({**first, "model": {"path": "by_hand", **SD3}, "targets": "joined.safetensors", "output": "hand/forget.safetensors"},
            tmp_path)  # fmt: skip

    continued, manual = load_lora(tmp_path / "two" / "forget.safetensors"), load_lora(tmp_path / "hand" / "forget.safetensors")
    assert continued.layers.keys() == manual.layers.keys()
    for name in continued.layers:
        assert torch.allclose(continued.layers[name].delta(), manual.layers[name].delta(), atol=1e-6), name
    assert any(continued.layers[name].delta().abs().max() > 1e-4 for name in continued.layers)  # it trained


@pytest.fixture
def no_training(monkeypatch):
    """Call it once the first request is done: from then on, training must not start."""

    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    return lambda: monkeypatch.setattr(provider, "unlearn_diffusers", refuse)


@pytest.mark.parametrize("damage, message", [
    ("missing", "does not exist"),
    ("no training file", "forget.training.safetensors is missing"),
    ("not a LoRA", "not a readable safetensors file"),
    ("full weights", "full weights"),
])  # fmt: skip
def test_a_missing_or_malformed_earlier_result_is_refused_before_any_training(tmp_path, no_training, damage, message):
    first = line(tmp_path)
    no_training()
    result = tmp_path / "one" / "forget.safetensors"
    if damage == "missing":
        result.unlink()
    elif damage == "no training file":
        (tmp_path / "one" / "forget.training.safetensors").unlink()
    elif damage == "not a LoRA":
        result.write_bytes(b"not safetensors")
    else:
        save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(2, 2)}, str(result), {"unlearn.adapter": "full"})
    with pytest.raises(InputError, match=message):
        run_job(second_job(first), tmp_path)
    assert not (tmp_path / "two").exists()


def test_results_of_another_base_or_out_of_order_are_refused_before_any_training(tmp_path, no_training):
    first = line(tmp_path)
    no_training()
    shutil.rmtree(tmp_path / "transformer")
    make_tiny_sd3(seed=1).save_pretrained(tmp_path / "transformer")  # another base under the same name
    with pytest.raises(InputError, match="was not trained on the base model alone"):
        run_job(second_job(first), tmp_path)
    with pytest.raises(InputError, match="earlier=.*must be a list"):
        run_job(second_job(first, earlier="one/forget.safetensors"), tmp_path)


def test_the_command_line_runs_a_line_of_two(tmp_path):
    first = line(tmp_path)
    (tmp_path / "second.json").write_text(json.dumps(second_job(first)))
    assert main(["run", str(tmp_path / "second.json")]) == 0
    assert (tmp_path / "two" / "forget.merged.safetensors").is_file()


@pytest.mark.filterwarnings("ignore:Already found a `peft_config`")  # two adapters on one model is the point
def test_the_merged_line_loaded_by_diffusers_equals_both_results_as_two_adapters(tmp_path):
    """In diffusers keys the line's merged file, read by diffusers' own loader, makes what the two
    results make as two adapters active together."""
    import copy

    run_job(second_job(line(tmp_path, config={"learning_rate": 1e-2}, key_format="diffusers")), tmp_path)
    one, two = load_file(str(tmp_path / "one" / "forget.safetensors")), load_file(str(tmp_path / "two" / "forget.safetensors"))
    merged = load_file(str(tmp_path / "two" / "forget.merged.safetensors"))
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(3))
    cond, timestep = sd3_cond(2, seed=9), torch.tensor([700.0, 300.0])

    def output(model):
        with torch.no_grad():
            return model(hidden_states=x, timestep=timestep, **cond).sample

    base = make_tiny_sd3()
    stacked, at_once = copy.deepcopy(base), copy.deepcopy(base)
    stacked.load_lora_adapter(one, adapter_name="one", prefix="transformer")
    stacked.load_lora_adapter(two, adapter_name="two", prefix="transformer")
    stacked.set_adapters(["one", "two"])
    at_once.load_lora_adapter(merged, adapter_name="line", prefix="transformer")
    assert (output(stacked) - output(base)).abs().max() > 1e-3  # the results change the output
    torch.testing.assert_close(output(at_once), output(stacked), atol=1e-5, rtol=0)
