"""The provider finds the network and its schedule in diffusers folders, and never guesses a schedule."""

import json
import logging

import pytest
import torch
from conftest import (
    make_tiny_sd3,
    make_tiny_unet,
    quick_job,
    save_ddpm_pipeline,
    save_targets,
    sd3_cond,
)
from diffusers import DDPMScheduler
from safetensors.torch import load_file

from unlearn_core import InputError
from unlearn_core.cli import main
from unlearn_core.formats.model_folders import locate


def alphas(source) -> torch.Tensor:
    return source.process().alphas_cumprod


COSINE = DDPMScheduler(beta_schedule="squaredcos_cap_v2").alphas_cumprod.double()
LINEAR = DDPMScheduler().alphas_cumprod.double()


def test_a_ddpm_pipeline_folder_gives_its_unet_and_its_own_schedule(tmp_path):
    save_ddpm_pipeline(tmp_path / "pipe")
    source = locate({"path": "pipe"}, tmp_path)  # kind found in model_index.json
    assert source.kind == "unet" and source.model_dir == tmp_path / "pipe" / "unet"
    assert torch.equal(alphas(source), COSINE) and not torch.allclose(alphas(source), LINEAR)
    assert source.clip == 1.0  # DDPMScheduler's clip_sample / clip_sample_range


def test_the_unet_folder_of_a_pipeline_finds_the_schedule_beside_it(tmp_path):
    save_ddpm_pipeline(tmp_path / "pipe")
    source = locate({"path": "pipe/unet", "kind": "unet"}, tmp_path)
    assert torch.equal(alphas(source), COSINE)


def test_an_explicit_scheduler_folder_or_file_is_used(tmp_path):
    make_tiny_unet().save_pretrained(tmp_path / "unet")
    DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False).save_pretrained(tmp_path / "sched")
    for given in ("sched", "sched/scheduler_config.json"):
        source = locate({"path": "unet", "kind": "unet", "scheduler": given}, tmp_path)
        assert torch.equal(alphas(source), COSINE) and source.clip is None


def test_a_unet_without_a_schedule_is_refused_with_the_fix(tmp_path):
    make_tiny_unet().save_pretrained(tmp_path / "unet")
    with pytest.raises(InputError, match="no noise schedule for the UNet") as caught:
        locate({"path": "unet", "kind": "unet"}, tmp_path)
    assert '"scheduler": "path/to/scheduler"' in str(caught.value) and "pipeline folder" in str(caught.value)


@pytest.mark.parametrize(
    "spec, wrong",
    [
        ({"kind": "sd3"}, "has no transformer/ folder"),
        ({"scheduler_path": "x"}, r"unknown model keys \['scheduler_path'\]"),
        ({"clip": -1}, "model.clip=-1 must be a positive number"),
        ({"path": "pipe/unet", "kind": "sd3"}, "holds a UNet2DModel, not a SD3Transformer2DModel"),
    ],
    ids=["pipeline without that component", "unknown key", "negative clip", "wrong kind for the folder"],
)
def test_model_sections_that_cannot_work_are_refused(tmp_path, spec, wrong):
    save_ddpm_pipeline(tmp_path / "pipe")
    with pytest.raises(InputError, match=wrong):
        locate({"path": "pipe", **spec}, tmp_path)


def test_a_v_prediction_schedule_gets_the_v_process_and_a_sample_schedule_is_refused(tmp_path):
    from unlearn_core.diffusion.process import DDPMVelocity

    save_ddpm_pipeline(tmp_path / "pipe", prediction_type="v_prediction")
    assert type(locate({"path": "pipe"}, tmp_path).process()) is DDPMVelocity
    save_ddpm_pipeline(tmp_path / "sample", prediction_type="sample")
    with pytest.raises(InputError, match="predicts 'sample'; unlearning trains epsilon- and v-prediction"):
        locate({"path": "sample"}, tmp_path)


def test_sd3_takes_the_shift_of_the_pipeline_scheduler(tmp_path, caplog):
    from diffusers import FlowMatchEulerDiscreteScheduler

    (tmp_path / "sd3").mkdir()
    make_tiny_sd3().save_pretrained(tmp_path / "sd3" / "transformer")
    FlowMatchEulerDiscreteScheduler(shift=2.5).save_pretrained(tmp_path / "sd3" / "scheduler")
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"]}  # fmt: skip
    (tmp_path / "sd3" / "model_index.json").write_text(json.dumps(index))
    source = locate({"path": "sd3"}, tmp_path)
    assert source.kind == "sd3" and source.shift == 2.5 and source.clip is None
    with caplog.at_level(logging.WARNING, logger="unlearn_core"):
        assert locate({"path": "sd3", "shift": 3.0}, tmp_path).shift == 3.0
    assert "overrides the pipeline scheduler's shift 2.5" in caplog.text
    assert locate({"path": "sd3/transformer", "kind": "sd3"}, tmp_path).shift == 2.5


def test_the_cli_trains_on_a_pipeline_folder_with_its_schedule(tmp_path):
    """The reported defect: a DDPMPipeline folder was refused, and without "scheduler" kind unet
    silently trained with linear betas. Now the job runs, and its remember samples are the
    cosine schedule's (they differ from what linear betas give)."""
    from unlearn_core import DDPMEpsilon
    from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
    from unlearn_core.diffusion.noise import seeded_noise
    from unlearn_core.diffusion.sampling import sample

    save_ddpm_pipeline(tmp_path / "pipe")
    save_targets(tmp_path / "targets.safetensors")
    (tmp_path / "job.json").write_text(json.dumps(quick_job("pipe", "targets.safetensors")))
    assert main(["run", str(tmp_path / "job.json")]) == 0
    trained_on = load_file(str(tmp_path / "out" / "forget.training.safetensors"))
    unet = make_tiny_unet()
    noise = seeded_noise([10_000 + i for i in range(3)], (3, 8, 8))
    for betas, expected_equal in (("squaredcos_cap_v2", True), ("linear", False)):
        process = DDPMEpsilon.from_scheduler(DDPMScheduler(beta_schedule=betas))
        expected = sample(DiffusersDenoiser(unet, process), process, noise, {}, 3, clip=1.0)
        assert torch.allclose(trained_on["remember"], expected, atol=1e-5) == expected_equal, betas


def test_sd3_cli_job_without_a_scheduler_still_uses_sd3s_shift(tmp_path):
    make_tiny_sd3().save_pretrained(tmp_path / "transformer")
    save_targets(tmp_path / "targets.safetensors", channels=4, cond=sd3_cond(1))
    job = quick_job("transformer", "targets.safetensors", model={"kind": "sd3"})
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["run", str(tmp_path / "job.json")]) == 0
    report = json.loads((tmp_path / "out" / "forget.report.json").read_text())
    assert report["base_model"]["shift"] == 3.0 and report["base_model"]["kind"] == "sd3"
