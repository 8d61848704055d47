"""Preserve Check's forgetting verdict must come from the unlearning, never from how it regenerates.

The shipped workflows sample with a CLIPTextEncode("") negative at cfg > 1. A regeneration
that drops that negative gives another image, so the base model already "forgets" the target:
the check must replay the recorded negative, prove that the base model reproduces the target,
and otherwise say it cannot verify forgetting.
"""

from __future__ import annotations

import json

import pytest
import torch

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


def check(node, loaded, targets, unlearned=None, **inputs):
    _, text, passed = run(node["check"], base_model=loaded["model"], unlearned_model=unlearned or loaded["model"],
                          vae=loaded["vae"], targets=targets, **{"preserve_seeds": 1, "steps": 3, "forget_threshold": 0.7,
                                                                "integrity_threshold": 0.5, "lora_name": "", **inputs})  # fmt: skip
    return json.loads(text), passed


def test_base_model_with_the_recorded_negative_reproduces_the_target_and_is_not_forgotten(loaded, node, batch):
    targets = mark(node, loaded, batch, "verdict_recorded", with_negative=True)
    assert targets.targets[0].negative is not None
    report, passed = check(node, loaded, targets)
    row = report["targets"][0]
    assert row["reproduced"] is True and row["ssim_base_to_target"] > 0.99
    assert row["copy_similarity_unlearned_to_target"] > 0.99
    assert row["forgotten"] is False, "the unchanged base model was judged to have forgotten its own output"
    assert report["summary"]["forgetting_passed"] is False and passed is False


def test_a_target_the_base_model_cannot_reproduce_is_never_counted_forgotten(loaded, node, batch):
    targets = mark(node, loaded, batch, "verdict_missing", with_negative=False)
    report, passed = check(node, loaded, targets)
    from instance_unlearn.unlearn_core.verify.metrics import SAME_OUTPUT_SSIM

    row = report["targets"][0]
    # the zeroed negative gives another image: below the same-output level (how far below depends on
    # the host's tiny VAE: 0.3 to 0.35 with 0.33's slim decoder, about 0.91 with 0.3.x's full one)
    assert row["ssim_base_to_target"] < SAME_OUTPUT_SSIM
    assert row["reproduced"] is False and row["forgotten"] is None
    assert "cannot verify forgetting" in row["note"] and "negative" in row["note"]
    summary = report["summary"]
    assert summary["cannot_verify"] == 1 and summary["forgetting_passed"] is False and passed is False
    assert summary["verdict"].startswith("1 of 1 target(s): cannot verify forgetting")


@pytest.fixture(scope="module")
def trained(node, loaded, batch):
    """(targets marked with their negative, the model unlearned from them: 30 strong steps)."""
    targets = mark(node, loaded, batch, "verdict_trained", with_negative=True)
    built, _, _ = run(node["surrogate"], model=loaded["model"], vae=loaded["vae"], targets=targets,
                      **dict(SURROGATE, strength=1.0, cfg=CFG))  # fmt: skip
    unlearned, *_ = run(node["train"], model=loaded["model"], targets=built, lora_name="",
                        **dict(TRAIN, steps=30, learning_rate=0.05))  # fmt: skip
    return targets, unlearned


def test_the_verdict_changes_only_through_the_lora(loaded, node, trained):
    targets, unlearned = trained
    before, _ = check(node, loaded, targets)
    after, _ = check(node, loaded, targets, unlearned)
    assert before["targets"][0]["forgotten"] is False
    assert after["targets"][0]["reproduced"] is True  # the base side of the check did not move
    assert (after["targets"][0]["copy_similarity_unlearned_to_target"]
            < before["targets"][0]["copy_similarity_unlearned_to_target"])  # fmt: skip
    assert after["targets"][0]["forgotten"] is True, after["targets"][0]
    assert after["measure"]["forgetting"].startswith("copy similarity (pixel-cosine)")


@pytest.fixture
def decoded(monkeypatch, pack):
    """Every image the pack decodes while the test runs, in order (the images Preserve Check judges)."""
    from instance_unlearn.nodes.host import vae

    seen, original = [], vae.decode

    def recording(vae, samples):
        images = original(vae, samples)
        seen.extend(image[None].clone() for image in images)  # one entry per image, batch or not
        return images

    monkeypatch.setattr(vae, "decode", recording)
    return seen


def core(image):
    return image[0].permute(2, 0, 1).float()


def test_the_nodes_verdict_and_figures_are_the_cores_check_on_the_same_images(loaded, node, trained, decoded):
    """Preserve Check only generates: its report is unlearn_core.verify.preserve's check (the demo's) on its images."""
    from instance_unlearn.unlearn_core.verify.metrics import PixelCopyDetector, load_lpips
    from instance_unlearn.unlearn_core.verify.preserve import (
        PreservePair,
        TargetImages,
        Thresholds,
        check_preservation,
        evaluate,
    )

    targets, unlearned = trained
    report, passed = check(node, loaded, targets, unlearned, preserve_seeds=2)
    target = targets.targets[0]
    # each model's regenerations in turn: its target replay, then the held-out seeds
    base_target, *base_held_out = decoded[: len(decoded) // 2]
    unlearned_target, *unlearned_held_out = decoded[len(decoded) // 2 :]
    pairs = [PreservePair(core(b), core(u), {k: row[k] for k in ("prompt", "target", "seed")})
             for b, u, row in zip(base_held_out, unlearned_held_out, report["preserve"], strict=True)]  # fmt: skip
    expected = check_preservation(
        [TargetImages(target.id, target.image.permute(2, 0, 1).float(), core(base_target), core(unlearned_target),
                      target.provenance["seed"])],
        pairs, PixelCopyDetector(), Thresholds(0.7, 0.5), load_lpips())  # fmt: skip
    assert {k: v for k, v in report.items() if k not in ("forget_set", "lora_name")} == expected.as_dict()
    assert passed is expected.passed and report["targets"][0]["forgotten"] is True
    # the in-process entry the benchmarks use (model-space batches) gives the same figures
    figures = evaluate(target.image.permute(2, 0, 1)[None] * 2 - 1, core(unlearned_target)[None] * 2 - 1,
                       torch.stack([p.base for p in pairs]) * 2 - 1, torch.stack([p.unlearned for p in pairs]) * 2 - 1,
                       PixelCopyDetector(), 0.7)  # fmt: skip
    assert figures.forgotten == [True]
    assert figures.target_copy_similarity[0] == pytest.approx(report["targets"][0]["copy_similarity_unlearned_to_target"], abs=1e-5)
    assert figures.integrity_ssim == pytest.approx(report["summary"]["mean_preserve_ssim"], abs=1e-5)


def test_an_sscd_file_in_models_unlearn_measures_forgetting(comfy, loaded, node, trained, decoded, tmp_path, monkeypatch):
    from instance_unlearn.nodes.preserve_check import PreserveCheck
    from instance_unlearn.unlearn_core.verify.metrics import (
        TorchScriptCopyDetector,
        copy_similarity,
    )

    folder = tmp_path / "models" / "unlearn"
    folder.mkdir(parents=True)
    scripted = torch.jit.script(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(6), torch.nn.Flatten()))
    scripted.save(str(folder / "tiny_sscd.pt"))
    monkeypatch.setattr(comfy["folder_paths"], "models_dir", str(tmp_path / "models"))
    listed = PreserveCheck.GET_NODE_INFO_V1()["input"]["optional"]["copy_detector"][1]["options"]
    assert listed == ["pixel", "tiny_sscd.pt"]
    targets, unlearned = trained
    report, _ = check(node, loaded, targets, unlearned, copy_detector="tiny_sscd.pt")
    row = report["targets"][0]
    assert row["measure"] == "sscd" and report["measure"]["forgetting"].startswith("copy similarity (sscd)")
    detector = TorchScriptCopyDetector(folder / "tiny_sscd.pt")
    reference = targets.targets[0].image.permute(2, 0, 1)[None].float()
    unlearned_target = decoded[len(decoded) // 2]  # the unlearned model's replay of the target
    assert row["copy_similarity_unlearned_to_target"] == pytest.approx(float(copy_similarity(detector, core(unlearned_target)[None], reference)))
    pixel, _ = check(node, loaded, targets, unlearned)
    assert row["copy_similarity_unlearned_to_target"] != pytest.approx(pixel["targets"][0]["copy_similarity_unlearned_to_target"])


def test_remember_seeds_and_preserve_seeds_are_disjoint(loaded, node, batch, monkeypatch, pack):
    from instance_unlearn.nodes.host import sampling
    from instance_unlearn.unlearn_core.data.seeds import preserve_seeds, remember_seeds

    seeds, original = [], sampling.ksample

    def recording(patcher, seed, *args, **kwargs):
        seeds.append(seed)
        return original(patcher, seed, *args, **kwargs)

    monkeypatch.setattr(sampling, "ksample", recording)
    targets = mark(node, loaded, batch, "verdict_seeds", with_negative=True)
    built, _, _ = run(node["surrogate"], model=loaded["model"], vae=loaded["vae"], targets=targets, **SURROGATE)
    seeds.clear()
    unlearned, *_ = run(node["train"], model=loaded["model"], targets=built, lora_name="", **dict(TRAIN, steps=1, remember_count=6))
    remembered = list(seeds)
    seeds.clear()
    check(node, loaded, targets, unlearned, preserve_seeds=3)
    # each model in turn: the target's own seed, then the held-out seeds
    assert seeds == [31, *preserve_seeds(31, 3)] * 2
    held_out = preserve_seeds(31, 3)
    assert remembered == remember_seeds(31, 6)
    assert not set(remembered) & set(held_out)


def test_a_target_without_its_seed_is_replayed_from_the_noise_recovered_by_inversion(loaded, node, batch):
    """An image loaded without its seed (here: the seed dropped) at cfg 4.5 with a negative: the check
    inverts the guided sampler, the base model reproduces the target from that noise, and the
    unchanged base model is judged not to have forgotten it."""
    from dataclasses import replace

    marked = mark(node, loaded, batch, "verdict_seedless", with_negative=True)
    targets = marked.with_targets([replace(t, provenance={k: v for k, v in t.provenance.items() if k != "seed"})
                                   for t in marked.targets])  # fmt: skip
    report, passed = check(node, loaded, targets)
    row = report["targets"][0]
    assert row["seed"] is None and row["noise"].startswith("recovered by inverting the sampler")
    assert row["reproduced"] is True and row["ssim_base_to_target"] > 0.98
    assert row["forgotten"] is False and passed is False
