"""Generated remember samples (and SDEdit surrogates) clip x0 as the model's own sampler does,
and a warning says when samples leave the data's range."""

import json
import logging

import torch
from conftest import quick_job, save_ddpm_pipeline, save_targets
from safetensors.torch import load_file

from unlearn_core.cli import main

WARNING = "outside the data's range"


def run(tmp_path, caplog, **model):
    save_targets(tmp_path / "targets.safetensors")
    (tmp_path / "job.json").write_text(json.dumps(quick_job("pipe", "targets.safetensors", model=model)))
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="unlearn_core"):
        assert main(["run", str(tmp_path / "job.json")]) == 0
    trained_on = load_file(str(tmp_path / "out" / "forget.training.safetensors"))
    report = json.loads((tmp_path / "out" / "forget.report.json").read_text())
    return trained_on, report, caplog.text


def test_samples_clip_like_the_schedulers_clip_sample(tmp_path, caplog):
    save_ddpm_pipeline(tmp_path / "pipe")  # DDPMScheduler: clip_sample=True, range 1
    trained_on, report, log = run(tmp_path, caplog)
    assert trained_on["remember"].abs().max() <= 1.0 and trained_on["surrogates"].abs().max() <= 1.0
    assert report["samples"]["clip"] == 1.0 and report["samples"]["remember"]["inside"]
    assert WARNING not in log


def test_an_unclipped_sampler_that_diverges_is_reported(tmp_path, caplog):
    """The reported defect: on a pixel DDPM the unclipped samples ranged over thousands and
    integrity collapsed without a word. A random tiny UNet diverges the same way."""
    save_ddpm_pipeline(tmp_path / "pipe", clip_sample=False)
    trained_on, report, log = run(tmp_path, caplog)
    assert trained_on["remember"].abs().max() > 10  # what the model's own (unclipped) sampler gives
    assert report["samples"]["clip"] is None and not report["samples"]["remember"]["inside"]
    assert WARNING in log and "set model.clip" in log


def test_model_clip_overrides_the_scheduler(tmp_path, caplog):
    save_ddpm_pipeline(tmp_path / "pipe", clip_sample=False)
    trained_on, report, log = run(tmp_path, caplog, clip=0.5)
    assert float(trained_on["remember"].abs().max()) <= 0.5 and report["samples"]["clip"] == 0.5
    assert WARNING not in log
    assert torch.isfinite(trained_on["remember"]).all()
