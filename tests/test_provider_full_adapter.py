"""adapter "full" (docs/PROVIDERS.md's choice for DDPM) saves every trained weight instead of crashing."""

import json

import pytest
import torch
from conftest import quick_job, save_ddpm_pipeline, save_targets
from diffusers import UNet2DModel
from safetensors import safe_open
from safetensors.torch import load_file

from unlearn_core import ForgetTargets, RememberSet, UnlearnConfig, UnlearnData
from unlearn_core.backends.diffusers_backend import unlearn_diffusers
from unlearn_core.cli import main
from unlearn_core.formats.lora import REPRODUCTION_KEYS
from unlearn_core.formats.model_folders import locate

FULL = {"adapter": "full", "learning_rate": 1e-3}


@pytest.fixture
def full_job(tmp_path):
    save_ddpm_pipeline(tmp_path / "pipe")
    save_targets(tmp_path / "targets.safetensors")
    job = quick_job("pipe", "targets.safetensors", config=FULL)
    (tmp_path / "job.json").write_text(json.dumps(job))
    return tmp_path, job


def test_full_fine_tuning_saves_the_trained_weights_under_the_models_own_names(full_job):
    root, job = full_job
    assert main(["run", str(root / "job.json")]) == 0
    output = root / "out" / "forget.safetensors"
    saved = load_file(str(output))
    base = UNet2DModel.from_pretrained(str(root / "pipe" / "unet"))
    assert set(saved) == set(base.state_dict()), "not a drop-in for diffusion_pytorch_model.safetensors"
    # it is exactly the model this job trains: same data (from the training file), same config
    data_file = load_file(str(root / "out" / "forget.training.safetensors"))
    data = UnlearnData(ForgetTargets(data_file["targets"], data_file["surrogates"], noise=data_file["noise"]),
                       RememberSet(data_file["remember"]))  # fmt: skip
    config = UnlearnConfig.from_dict({**job["config"]})
    expected = unlearn_diffusers(base, locate(job["model"], root).process(), data, config).finetuned.state_dict()
    assert all(torch.equal(saved[key], expected[key]) for key in expected)
    assert any(not torch.equal(saved[key], base.state_dict()[key]) for key in saved), "nothing was trained"
    with safe_open(str(output), framework="pt") as handle:
        metadata = handle.metadata()
    assert metadata["unlearn.adapter"] == "full" and set(REPRODUCTION_KEYS) <= set(metadata)
    # loading it as the docs say: the base folder's config and this file
    base.load_state_dict(saved)
    report = json.loads((root / "out" / "forget.report.json").read_text())
    assert report["adapter"] == "full" and report["key_format"] is None


def test_full_fine_tuning_refuses_a_lora_key_format(full_job, caplog):
    root, job = full_job
    (root / "job.json").write_text(json.dumps({**job, "key_format": "comfy"}))
    assert main(["run", str(root / "job.json")]) == 2
    assert "adapter 'full' writes every weight under the model's own diffusers names" in caplog.text
    assert not (root / "out").exists()
