"""A second request in ComfyUI: Instance Unlearn LoRA's existing_lora, on a real ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch

from .helpers import (
    SURROGATE,
    TRAIN,
    assert_same_weights,
    denoiser_output,
    generate,
    prompt_for,
    run,
    snapshot,
)

pytestmark = pytest.mark.comfyui

FIRST = "tests/line_first"
# as in test_verified_stopping: a check every step, a threshold a trained adapter crosses at once
CHECK = dict(check_every=1, check_nearby=1, check_margin=0.0, forget_threshold=0.999, check_confirmations=2,
             repair_when_forgotten=False)  # fmt: skip


def _file(comfy, name: str):
    """A LoRA file's tensors and metadata, read by the core's one safetensors reader."""
    from instance_unlearn.unlearn_core.formats.files import read_safetensors

    return read_safetensors(comfy["base"] / "models" / "loras" / name, "LoRA file")


@pytest.fixture(scope="module")
def line(comfy, loaded, node):
    """Request 1 forgot target A (forget set 'line'); the served model (base + its LoRA) then made B,
    marked into the same set. Returns the first LoRA's name, the served model and the targets [A, B]
    with surrogates."""
    base, vae, conditioning = loaded["model"], loaded["vae"], loaded["conditioning"]
    latent, images = generate(comfy["nodes"], base, vae, conditioning, seed=41)
    prompt, node_id = prompt_for(41)
    first, _ = run(node["mark"], {"PROMPT": prompt, "UNIQUE_ID": node_id}, forget_set="line", indices="0", images=images,
                   latent=latent, conditioning=conditioning)  # fmt: skip
    first, _, _ = run(node["surrogate"], model=base, vae=vae, targets=first, **SURROGATE)
    run(node["train"], model=base, targets=first, vae=vae, lora_name=FIRST, **dict(TRAIN, steps=10, learning_rate=1e-2), **CHECK)
    loader = comfy["nodes"].LoraLoaderModelOnly()
    with torch.inference_mode():
        served = loader.load_lora_model_only(base, FIRST + ".safetensors", 1.0)[0]
    latent, images = generate(comfy["nodes"], served, vae, conditioning, seed=42)
    prompt, node_id = prompt_for(42)
    both, _ = run(node["mark"], {"PROMPT": prompt, "UNIQUE_ID": node_id}, forget_set="line", indices="1", images=images,
                  latent=latent, conditioning=conditioning)  # fmt: skip
    both, _, _ = run(node["surrogate"], model=served, vae=vae, targets=both, **SURROGATE)
    assert [t.id for t in both.targets][:1] == [t.id for t in first.targets] and len(both) == 2
    return {"first": FIRST + ".safetensors", "served": served, "targets": both, "loader": loader}


def test_continuing_equals_training_with_it_applied_by_hand_and_the_merged_file_serves_both(comfy, loaded, node, line):
    base, conditioning, loader = loaded["model"], loaded["conditioning"], line["loader"]
    denoiser_output(base, conditioning)  # the clones share one network: load the base to look at it
    base_weights = snapshot(base)
    settings = dict(TRAIN, learning_rate=1e-2, stop_when_forgotten=False)
    model, lora, _, saved = run(node["train"], model=base, targets=line["targets"], existing_lora=line["first"],
                                lora_name="tests/line_second", **settings)  # fmt: skip
    run(node["train"], model=line["served"], targets=line["targets"], lora_name="tests/line_by_hand", **settings)
    own, metadata = _file(comfy, "tests/line_second.safetensors")
    by_hand, _ = _file(comfy, "tests/line_by_hand.safetensors")
    assert own.keys() == by_hand.keys() and all(torch.equal(own[k], by_hand[k]) for k in own)

    # the outputs are every request so far: the merged file through the stock loader on the base model
    assert saved == "tests/line_second.merged.safetensors"
    merged, merged_metadata = _file(comfy, saved)
    assert merged.keys() == lora.keys() and all(torch.equal(merged[k], lora[k]) for k in merged)
    with torch.inference_mode():
        from_file = loader.load_lora_model_only(base, saved, 1.0)[0]
        stacked = loader.load_lora_model_only(line["served"], "tests/line_second.safetensors", 1.0)[0]
    served_output = denoiser_output(model, conditioning)
    assert torch.allclose(denoiser_output(from_file, conditioning), served_output, atol=1e-5, rtol=1e-5)
    assert torch.allclose(denoiser_output(stacked, conditioning), served_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(served_output, denoiser_output(line["served"], conditioning), atol=1e-6)

    # the audit: what this request trained on, and what the merged file sums
    from instance_unlearn.unlearn_core.formats.files import file_sha256

    first_sha = file_sha256(comfy["base"] / "models" / "loras" / line["first"])
    assert json.loads(metadata["unlearn.earlier"]) == [{"file": line["first"], "sha256": first_sha}]
    assert json.loads(merged_metadata["unlearn.merged_of"]) == [line["first"], "tests/line_second.safetensors"]
    assert json.loads(merged_metadata["unlearn.target_ids"]) == [t.id for t in line["targets"].targets]
    denoiser_output(base, conditioning)  # the clones share one network: load the base to look at it
    assert_same_weights(base, base_weights)


def test_earlier_targets_come_first_and_are_judged_with_their_own_runs_marks(comfy, loaded, node, line):
    targets = line["targets"]
    reversed_targets = targets.with_targets(list(reversed(targets.targets)))  # the new target first
    model, _, _, saved = run(node["train"], model=loaded["model"], targets=reversed_targets, existing_lora=line["first"],
                         vae=loaded["vae"], lora_name="tests/line_checked", **dict(TRAIN, learning_rate=1e-2), **CHECK)  # fmt: skip
    _, first_metadata = _file(comfy, line["first"])
    _, metadata = _file(comfy, "tests/line_checked.safetensors")
    assert json.loads(metadata["unlearn.target_ids"]) == [t.id for t in targets.targets]  # the earlier one first
    first_marks = json.loads(first_metadata["unlearn.verification"])["baseline"]["counted"]
    baseline = json.loads(metadata["unlearn.verification"])["baseline"]
    assert len(baseline["counted"]) == 2 and baseline["counted"][0] == first_marks[0]
    # the served model no longer makes A, so without the carried marks it could not be judged at all
    assert first_marks[0][0], "the base model copies its own target: the first run's check marked it"
    assert json.loads(first_metadata["unlearn.verification"])["stopped_early"], "the served model no longer makes it"
    # and it is judged again at every check, on the model as it is served
    checks = json.loads(metadata["unlearn.verification"])["checks"]
    assert checks and all(check["own_similarity"][0] is not None for check in checks)
    assert saved.endswith(".merged.safetensors")

    # Preserve Check judges every target again against the original base model, and shows each one's
    # training step by its id whatever order the targets come in (steps made distinct to tell them apart)
    from instance_unlearn.unlearn_core.formats.lora import load_lora, save_lora

    merged = load_lora(comfy["base"] / "models" / "loras" / saved)
    verification = {**json.loads(merged.metadata["unlearn.verification"]), "forgotten_at": [3, 7]}
    save_lora(comfy["base"] / "models" / "loras" / "tests" / "line_steps.safetensors", merged, "comfy",
              {"unlearn.verification": json.dumps(verification)})  # fmt: skip
    _, report_text, _ = run(node["check"], base_model=loaded["model"], unlearned_model=model, vae=loaded["vae"],
                            targets=reversed_targets, preserve_seeds=1, steps=3, forget_threshold=0.999,
                            integrity_threshold=0.0, lora_name="tests/line_steps")  # fmt: skip
    rows = {row["target"]: row for row in json.loads(report_text)["targets"]}
    assert list(rows) == [t.id for t in reversed_targets.targets]
    assert [rows[t.id]["forgotten_at_training_step"] for t in targets.targets] == [3, 7]


def test_a_missing_earlier_target_is_refused_before_any_work(comfy, loaded, node, line):
    from instance_unlearn.unlearn_core.errors import InputError

    only_new = line["targets"].with_targets(line["targets"].targets[1:])
    with pytest.raises(InputError, match="mark the new output into forget set 'line'"):
        run(node["train"], model=loaded["model"], targets=only_new, existing_lora=line["first"],
            lora_name="tests/line_refused", **TRAIN)  # fmt: skip
    assert not (comfy["base"] / "models" / "loras" / "tests" / "line_refused.safetensors").exists()


def test_a_name_that_would_overwrite_the_earlier_result_is_refused(comfy, loaded, node, line):
    """The node's default lora_name is the same for every request: the file a request continues
    from must not be replaced by its own LoRA, nor by its merged one."""
    from instance_unlearn.unlearn_core.errors import InputError

    folder = comfy["base"] / "models" / "loras"
    before = (folder / line["first"]).read_bytes()
    (folder / "tests" / "line_copy.merged.safetensors").write_bytes(before)  # as if a request had merged it
    for existing, lora_name in [(line["first"], "tests/line_first"), ("tests/line_copy.merged.safetensors", "tests/line_copy")]:
        with pytest.raises(InputError, match="would overwrite existing_lora"):
            run(node["train"], model=loaded["model"], targets=line["targets"], existing_lora=existing, lora_name=lora_name,
                **TRAIN)  # fmt: skip
        assert (folder / existing).read_bytes() == before


def test_a_check_with_other_nearby_probes_is_refused(loaded, node, line):
    from instance_unlearn.unlearn_core.errors import InputError

    with pytest.raises(InputError, match="continue with check_nearby 1"):
        run(node["train"], model=loaded["model"], targets=line["targets"], existing_lora=line["first"], vae=loaded["vae"],
            lora_name="", **{**TRAIN, **CHECK, "check_nearby": 2})  # fmt: skip


def test_other_loras_are_refused(comfy, loaded, node, line):
    from instance_unlearn.unlearn_core.errors import InputError
    from instance_unlearn.unlearn_core.formats.lora import (
        LoraLayer,
        LoraWeights,
        load_lora,
        save_lora,
    )

    folder = comfy["base"] / "models" / "loras"
    plain = LoraWeights({"joint_blocks.0.x_block.attn.qkv": LoraLayer(torch.zeros(2, 128), torch.zeros(384, 2), 2.0)}, "mmdit")
    save_lora(folder / "tests" / "not_ours.safetensors", plain, "comfy")
    first = load_lora(folder / line["first"])
    save_lora(folder / "tests" / "other_model.safetensors", first, "comfy", {"unlearn.base_model": "another model"})
    for name, reason in [("tests/not_ours.safetensors", "is not a LoRA this node saved"),
                         ("tests/other_model.safetensors", "was trained on another model"),
                         ("tests/absent.safetensors", "is not in models/loras")]:  # fmt: skip
        with pytest.raises(InputError, match=reason):
            run(node["train"], model=loaded["model"], targets=line["targets"], existing_lora=name, lora_name="", **TRAIN)
