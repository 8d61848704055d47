"""Preserve Check's forgetting verdict must come from the unlearning, never from how it regenerates.

The shipped workflows sample with a CLIPTextEncode("") negative at cfg > 1. A regeneration
that drops that negative gives another image, so the base model already "forgets" the target:
the check must replay the recorded negative, prove that the base model reproduces the target,
and otherwise say it cannot verify forgetting.
"""

from __future__ import annotations

import json

import pytest

from . import tiny_models
from .helpers import SURROGATE, TRAIN, generate, prompt_for, run

pytestmark = pytest.mark.comfyui

CFG = 4.5


@pytest.fixture(scope="module")
def batch(comfy, loaded):
    """Seed 31 at cfg 4.5 with a non-empty negative (what a text encoder gives for "")."""
    negative = tiny_models.conditioning(99)
    latent, images = generate(comfy["nodes"], loaded["model"], loaded["vae"], loaded["conditioning"], seed=31, cfg=CFG,
                              negative=negative)  # fmt: skip
    return {"latent": latent, "images": images, "negative": negative}


def mark(node, loaded, batch, forget_set: str, with_negative: bool):
    prompt, node_id = prompt_for(31, cfg=CFG)
    extra = {"negative": batch["negative"]} if with_negative else {}
    targets, _ = run(node["mark"], {"PROMPT": prompt, "UNIQUE_ID": node_id}, forget_set=forget_set, indices="0",
                     images=batch["images"], latent=batch["latent"], conditioning=loaded["conditioning"], **extra)  # fmt: skip
    return targets


def check(node, loaded, targets, unlearned=None):
    _, text, passed = run(node["check"], base_model=loaded["model"], unlearned_model=unlearned or loaded["model"],
                          vae=loaded["vae"], targets=targets, preserve_seeds=1, steps=3, forget_threshold=0.7,
                          integrity_threshold=0.5, lora_name="")  # fmt: skip
    return json.loads(text), passed


def test_base_model_with_the_recorded_negative_reproduces_the_target_and_is_not_forgotten(loaded, node, batch):
    targets = mark(node, loaded, batch, "verdict_recorded", with_negative=True)
    assert targets.targets[0].negative is not None
    report, passed = check(node, loaded, targets)
    row = report["targets"][0]
    assert row["reproduced"] is True and row["ssim_base_to_target"] > 0.99
    assert row["forgotten"] is False, "the unchanged base model was judged to have forgotten its own output"
    assert report["summary"]["forgetting_passed"] is False and passed is False


def test_a_target_the_base_model_cannot_reproduce_is_never_counted_forgotten(loaded, node, batch):
    targets = mark(node, loaded, batch, "verdict_missing", with_negative=False)
    report, passed = check(node, loaded, targets)
    row = report["targets"][0]
    assert row["ssim_base_to_target"] < 0.9  # the zeroed negative gives another image
    assert row["reproduced"] is False and row["forgotten"] is None
    assert "cannot verify forgetting" in row["note"] and "negative" in row["note"]
    summary = report["summary"]
    assert summary["cannot_verify"] == 1 and summary["forgetting_passed"] is False and passed is False
    assert summary["verdict"].startswith("1 of 1 target(s): cannot verify forgetting")


def test_the_verdict_changes_only_through_the_lora(loaded, node, batch):
    targets = mark(node, loaded, batch, "verdict_trained", with_negative=True)
    built, _, _ = run(node["surrogate"], model=loaded["model"], vae=loaded["vae"], targets=targets,
                      **dict(SURROGATE, strength=1.0, cfg=CFG))  # fmt: skip
    unlearned, *_ = run(node["train"], model=loaded["model"], targets=built, lora_name="",
                        **dict(TRAIN, steps=30, learning_rate=0.05))  # fmt: skip
    before, _ = check(node, loaded, targets)
    after, _ = check(node, loaded, targets, unlearned)
    assert before["targets"][0]["forgotten"] is False
    assert after["targets"][0]["reproduced"] is True  # the base side of the check did not move
    assert after["targets"][0]["ssim_unlearned_to_target"] < before["targets"][0]["ssim_unlearned_to_target"]
    assert after["targets"][0]["forgotten"] is True, after["targets"][0]
