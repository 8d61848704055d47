"""A CLI job always knows each target's noise (given, from its seed, or recovered by inverting the
sampler), says where it came from, verifies forgetting from it, and never trains towards a copy."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_sd3, quick_job, save_targets, sd3_cond
from safetensors.torch import load_file, save_file

import unlearn_core.serve.provider as provider
from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
from unlearn_core.cli import main
from unlearn_core.diffusion.noise import seeded_noise
from unlearn_core.diffusion.sampling import sample
from unlearn_core.errors import InputError
from unlearn_core.formats.model_folders import locate
from unlearn_core.verify.metrics import PixelCopyDetector, copy_similarity

STEPS = 6


def _model_outputs(folder, seeds, cond):
    """What the job's sampler makes from these seeds: targets the model really produced."""
    from diffusers import SD3Transformer2DModel

    model = SD3Transformer2DModel.from_pretrained(str(folder))
    process = locate({"path": str(folder), "kind": "sd3"}, folder.parent).process(torch.device("cpu"))
    return sample(DiffusersDenoiser(model, process), process, seeded_noise(seeds, (4, 8, 8)), cond, STEPS)


@pytest.fixture
def produced(tmp_path):
    """A tiny SD3 folder and a targets file holding two of its own outputs (images only)."""
    make_tiny_sd3().save_pretrained(tmp_path / "transformer")
    cond = sd3_cond(2)
    targets = _model_outputs(tmp_path / "transformer", [11, 12], cond)
    save_file({"targets": targets, **cond}, str(tmp_path / "targets.safetensors"))
    return tmp_path, targets, cond


def _run(root, **sections) -> dict:
    job = quick_job("transformer", "targets.safetensors", model={"kind": "sd3"}, check={"steps": STEPS},
                    config={"steps": 4, "lora_rank": 2, "forget_batch_size": 1, "remember_batch_size": 2, "check_every": 2},
                    **sections)  # fmt: skip
    (root / "job.json").write_text(json.dumps(job))
    assert main(["run", str(root / "job.json")]) == 0
    return json.loads((root / "out" / "forget.report.json").read_text())


def test_images_only_recover_their_noise_by_inversion_and_the_report_says_so(produced):
    root, targets, _ = produced
    report = _run(root)
    for record in report["targets"]:
        assert record["noise"]["source"].startswith("recovered by inverting the sampler")
        assert record["noise"]["reproduces"] and record["noise"]["copy_similarity_of_regeneration"] > 0.99
    assert report["verification"]["verifiable"] == [True, True]  # so the check regenerates them from it
    trained_on = load_file(str(root / "out" / "forget.training.safetensors"))
    assert trained_on["noise"].shape == targets.shape


def test_a_broken_inversion_is_reported_as_not_reproducing(produced, monkeypatch):
    root, _, _ = produced
    monkeypatch.setattr(provider, "invert", lambda denoiser, process, image, cond, steps, clip: torch.randn_like(image))
    report = _run(root)
    assert not any(record["noise"]["reproduces"] for record in report["targets"])
    assert "cannot be verified" in report["targets"][0]["noise"]["note"]
    assert report["verification"]["verifiable"] == [False, False]
    assert not report["verification"]["stopped_early"]


def test_a_job_with_seeds_uses_them(produced):
    root, _, _ = produced
    report = _run(root, seeds=[11, 12])
    assert [r["noise"]["source"] for r in report["targets"]] == ["seed", "seed"]
    assert [r["noise"]["seed"] for r in report["targets"]] == [11, 12]
    assert all(r["noise"]["reproduces"] for r in report["targets"])
    trained_on = load_file(str(root / "out" / "forget.training.safetensors"))
    assert torch.equal(trained_on["noise"], seeded_noise([11, 12], (4, 8, 8)))


def test_wrong_seeds_are_said_not_to_reproduce(produced):
    root, _, _ = produced
    report = _run(root, seeds=[500, 501])
    assert not any(r["noise"]["reproduces"] for r in report["targets"])


def test_noise_in_the_targets_file_is_the_noise_and_not_conditioning(produced):
    root, targets, cond = produced
    save_file({"targets": targets, "noise": seeded_noise([11, 12], (4, 8, 8)), **cond}, str(root / "targets.safetensors"))
    report = _run(root)
    assert [r["noise"]["source"] for r in report["targets"]] == ["given in the targets file"] * 2
    assert all(r["noise"]["reproduces"] for r in report["targets"])


@pytest.mark.parametrize(
    ("files", "job", "message"),
    [
        ({"noise": torch.zeros(2, 4, 8, 8)}, {"seeds": [1, 2]}, "one way"),
        ({}, {"seeds": [1]}, "1 seeds for 2 targets"),
        ({"noise": torch.zeros(2, 4, 4, 4)}, {}, "must match 'targets'"),
        ({}, {"seeds": [-1, 2]}, "whole numbers"),
        ({}, {"check": {"forget_below": 2.0}}, "check.forget_below"),
        ({}, {"check": {"detector": "missing.pt"}}, "does not exist"),
    ],
)
def test_bad_noise_seeds_and_checks_are_refused_before_any_training(tmp_path, files, job, message):
    make_tiny_sd3().save_pretrained(tmp_path / "transformer")
    cond = sd3_cond(2)
    targets = save_targets(tmp_path / "targets.safetensors", channels=4, cond=cond, n=2)
    save_file({"targets": targets, **cond, **files}, str(tmp_path / "targets.safetensors"))
    (tmp_path / "job.json").write_text(json.dumps(quick_job("transformer", "targets.safetensors", model={"kind": "sd3"}, **job)))
    with pytest.raises(Exception, match=message):
        provider.run_job(json.loads((tmp_path / "job.json").read_text()), tmp_path)
    assert not (tmp_path / "out").exists()


def test_a_given_surrogate_that_is_a_copy_is_refused(produced):
    root, targets, cond = produced
    save_file({"targets": targets, "surrogates": targets.clone(), **cond}, str(root / "targets.safetensors"))
    (root / "job.json").write_text(json.dumps(quick_job("transformer", "targets.safetensors", model={"kind": "sd3"})))
    assert main(["run", str(root / "job.json")]) == 2
    assert not (root / "out").exists()


def _scoring(targets, other, score: float) -> torch.Tensor:
    """Each target blended with another image until the pixel detector scores it ``score`` against it."""
    blended = []
    for target, away in zip(targets, other, strict=True):
        low, high = 0.0, 1.0  # the share of the other image: 0 is the target itself
        for _ in range(40):
            mix = (low + high) / 2
            candidate = (1 - mix) * target + mix * away
            if float(copy_similarity(PixelCopyDetector(), candidate[None], target[None])[0]) > score:
                low = mix
            else:
                high = mix
        blended.append(candidate)
    return torch.stack(blended)


@pytest.mark.parametrize("stopping", [True, False])
def test_a_given_surrogate_the_check_could_never_call_forgotten_is_refused(produced, stopping):
    """Between the check's bar (threshold - margin) and the threshold: training towards it ends
    where the check cannot confirm the target gone, so verified stopping refuses it; without the
    check the threshold alone is the bar."""
    root, targets, cond = produced
    surrogates = _scoring(targets, _model_outputs(root / "transformer", [13, 14], cond), 0.875)
    save_file({"targets": targets, "surrogates": surrogates, **cond}, str(root / "targets.safetensors"))
    job = quick_job("transformer", "targets.safetensors", model={"kind": "sd3"}, check={"steps": STEPS, "forget_below": 0.9},
                    config={"steps": 2, "lora_rank": 2, "forget_batch_size": 1, "remember_batch_size": 2,
                            "stop_when_forgotten": stopping})  # fmt: skip
    (root / "job.json").write_text(json.dumps(job))
    if stopping:
        with pytest.raises(InputError, match=r"given surrogate 0 .*>= 0\.85, the forgetting check's bar"):
            provider.run_job(job, root)
        assert not (root / "out").exists()
    else:
        assert main(["run", str(root / "job.json")]) == 0


def test_a_generated_surrogate_that_is_a_copy_is_rebuilt_and_the_report_says_how(produced):
    root, _, _ = produced
    report = _run(root, surrogate={"method": "sdedit", "strength": 0.02, "steps": 3})
    notes = [record["surrogate"] for record in report["targets"]]
    assert all(note["rebuilt"] for note in notes)  # an edit at 0.02 is the target again
    assert all(note["copy_similarity"] < note["copy_at"] <= note["tried"][0]["copy_similarity"] for note in notes)
    assert all(note["strength"] > 0.02 or note["seed"] != 0 for note in notes)
