"""The four nodes in-process against a real ComfyUI: training, LoRA equivalence, base integrity.

Bad inputs are in test_node_bad_inputs.py, faults and repeated runs in test_node_faults.py.
"""

from __future__ import annotations

import json

import pytest
import torch

from .helpers import SURROGATE, TRAIN, assert_same_weights, denoiser_output, generate, run, snapshot

pytestmark = pytest.mark.comfyui

def test_mark_records_provenance_and_dedupes(comfy, loaded, node, marked):
    assert len(marked) == 1
    target = marked.targets[0]
    assert target.provenance["seed"] == 11 and target.provenance["steps"] == 3
    assert target.provenance["model"] == "tiny_sd3.safetensors" and target.provenance["batch_index"] == 1
    assert target.latent is not None and target.latent.shape == (16, 8, 8)
    latent, images = generate(comfy["nodes"], loaded["model"], loaded["vae"], loaded["conditioning"], seed=11)
    again, _ = run(node["mark"], forget_set="flags", indices="1", images=images, latent=latent)
    assert len(again) == 1, "marking the same image twice must be a no-op"
    manifest = json.loads((comfy["base"] / "output" / "unlearn" / "forget_sets" / "flags" / "manifest.json").read_text())
    assert len(manifest["targets"]) == 1


def test_surrogate_is_a_mild_edit(with_surrogates, marked):
    targets, preview, text = with_surrogates
    target = targets.targets[0]
    assert target.surrogate_latent is not None and target.surrogate_latent.shape == target.latent.shape
    assert not torch.equal(target.surrogate_latent, target.latent)
    assert preview.shape[2] == 2 * marked.targets[0].image.shape[1]  # target | surrogate
    assert "SSIM(target, surrogate)" in text


def test_train_saves_a_lora_that_stock_loaders_reproduce(comfy, loaded, node, with_surrogates):
    base = loaded["model"]
    before = snapshot(base)
    base_output = denoiser_output(base, loaded["conditioning"])
    targets = with_surrogates[0]
    model, lora, loss, name = run(node["train"], {"UNIQUE_ID": "7"}, model=base, targets=targets, lora_name="tests/flag_fix", **TRAIN)
    path = comfy["base"] / "models" / "loras" / "tests" / "flag_fix.safetensors"
    assert name == "tests/flag_fix.safetensors" and path.is_file()
    assert len(loss["loss"]) == TRAIN["steps"] and all(torch.isfinite(torch.tensor(loss["loss"])))
    assert any(k.endswith("x_block.attn.qkv.lora_up.weight") for k in lora)
    # the node's MODEL and the file through the stock LoraLoaderModelOnly give the same denoiser output
    with torch.inference_mode():
        stock = comfy["nodes"].LoraLoaderModelOnly().load_lora_model_only(base, name, 1.0)[0]
    node_output = denoiser_output(model, loaded["conditioning"])
    stock_output = denoiser_output(stock, loaded["conditioning"])
    assert torch.allclose(node_output, stock_output, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(node_output, base_output, atol=1e-6), "the LoRA changed nothing"
    # and the cached base model is exactly as before
    assert torch.equal(denoiser_output(base, loaded["conditioning"]), base_output)
    assert_same_weights(base, before)
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["unlearn.method"] == "surrogate"
    assert json.loads(metadata["unlearn.target_ids"]) == [targets.targets[0].id]
    assert json.loads(metadata["unlearn.config"])["steps"] == TRAIN["steps"]


def test_preserve_check_reports_and_saves_beside_the_lora(comfy, loaded, node, with_surrogates):
    targets = with_surrogates[0]
    model, lora, loss, name = run(node["train"], model=loaded["model"], targets=targets, lora_name="tests/checked", **TRAIN)
    grid, report_text, passed = run(node["check"], base_model=loaded["model"], unlearned_model=model, vae=loaded["vae"],
                                    targets=targets, preserve_seeds=2, steps=3, forget_threshold=0.7,
                                    integrity_threshold=0.85, lora_name=name)  # fmt: skip
    report = json.loads(report_text)
    saved = comfy["base"] / "models" / "loras" / "tests" / "checked.report.json"
    assert json.loads(saved.read_text()) == report
    # what a user reads: the verdict in words first, the text as written (Fréchet, not an escape)
    assert report_text.startswith('{\n  "summary": {\n    "verdict": "') and list(report["summary"])[1] == "passed"
    assert "Fréchet" in report_text and "\\u00e9" not in report_text
    assert report["targets"][0]["seed"] == 11
    # the base model regenerates the marked target from its provenance (same seed and settings)
    assert report["targets"][0]["ssim_base_to_target"] > 0.99
    assert len(report["preserve"]) == 2 and isinstance(passed, bool)
    assert grid.shape[1] == 2 * 64 and grid.shape[2] == 3 * 64  # two rows; target + 2 preserve columns


def test_inpaint_surrogate_changes_the_masked_region(comfy, loaded, node):
    latent, images = generate(comfy["nodes"], loaded["model"], loaded["vae"], loaded["conditioning"], seed=21)
    mask = torch.zeros(1, 64, 64)
    mask[:, :, 32:] = 1  # the right half is undesired
    targets, _ = run(node["mark"], forget_set="inpaint", indices="0", images=images, latent=latent, mask=mask,
                     conditioning=loaded["conditioning"])  # fmt: skip
    assert targets.targets[0].mask is not None
    result, preview, text = run(node["surrogate"], model=loaded["model"], vae=loaded["vae"], targets=targets,
                                **dict(SURROGATE, method="inpaint", strength=1.0))  # fmt: skip
    target = result.targets[0]
    change = (target.surrogate_latent - target.latent).abs()
    assert change[:, :, 4:].mean() > 10 * change[:, :, :4].mean(), "inpainting changed the kept half as much as the mask"


def test_gradient_checkpointing_trains_the_same_lora_and_restores_the_blocks(loaded, node, with_surrogates):
    base = loaded["model"]
    before = snapshot(base)
    blocks = list(base.model.diffusion_model.joint_blocks)
    plain = run(node["train"], model=base, targets=with_surrogates[0], lora_name="", **dict(TRAIN, steps=2))[1]
    checkpointed = run(node["train"], model=base, targets=with_surrogates[0], lora_name="",
                       **dict(TRAIN, steps=2, gradient_checkpointing=True))[1]  # fmt: skip
    for key, value in plain.items():
        assert torch.allclose(value, checkpointed[key], atol=1e-5), key
    assert all("forward" not in vars(block) for block in blocks), "a checkpointed forward was left on the model"
    assert_same_weights(base, before)
