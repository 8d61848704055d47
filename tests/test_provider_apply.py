"""Applying a result outside ComfyUI: every key format the pack writes, merged into a diffusers
model or pipeline, gives the outputs of the model with the LoRA attached."""

import json

import pytest
import torch
from conftest import make_data, make_tiny_sd3, make_tiny_unet, save_ddpm_pipeline, sd3_cond
from diffusers import DDPMPipeline, DDPMScheduler, SD3Transformer2DModel, UNet2DModel

from unlearn_core import DDPMEpsilon, InputError, RectifiedFlow, UnlearnConfig, save_lora
from unlearn_core.backends.diffusers_backend import (
    DiffusersDenoiser,
    lora_attached,
    unlearn_diffusers,
)
from unlearn_core.cli import main
from unlearn_core.formats.apply import (
    APPLIED_RECORD,
    apply_to_folder,
    apply_to_pipeline,
    merge_into,
)
from unlearn_core.formats.full_weights import save_full_weights
from unlearn_core.formats.lora import KEY_FORMATS

CONFIG = UnlearnConfig(steps=3, learning_rate=5e-2, lora_rank=2, forget_batch_size=1, remember_batch_size=2)


def predict(model, process, cond, seed=9):
    x = torch.randn(2, model.config.in_channels, 8, 8, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return DiffusersDenoiser(model, process).predict_x0(x, torch.full((2,), 0.6), cond)


CASES = {
    "sd3": (make_tiny_sd3, RectifiedFlow(), lambda: make_data(4, 8, sd3_cond), lambda: sd3_cond(2, seed=4)),
    "unet": (make_tiny_unet, DDPMEpsilon.from_scheduler(DDPMScheduler()), lambda: make_data(3, 8), lambda: {}),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def trained(request):
    """A base model, a LoRA trained on it (moved well away from zero) and the outputs with it attached."""
    build, process, data, cond = CASES[request.param]
    model = build()
    lora = unlearn_diffusers(model, process, data(), CONFIG).lora
    with lora_attached(model, weights=lora):
        attached = predict(model, process, cond())
    base = predict(model, process, cond())
    assert not torch.allclose(attached, base, atol=1e-4), "the LoRA does not change the outputs; the test would prove nothing"
    return request.param, build, process, cond, lora, attached


@pytest.mark.parametrize("key_format", KEY_FORMATS)
def test_merging_a_saved_lora_equals_attaching_it(trained, key_format, tmp_path):
    kind, build, process, cond, lora, attached = trained
    path = save_lora(tmp_path / "lora.safetensors", lora, key_format)
    merged = merge_into(build(), path)
    assert torch.allclose(predict(merged, process, cond()), attached, atol=1e-5)


@pytest.mark.parametrize("key_format", KEY_FORMATS)
def test_apply_writes_a_model_folder_that_from_pretrained_loads(trained, key_format, tmp_path):
    kind, build, process, cond, lora, attached = trained
    build().save_pretrained(tmp_path / "base")
    path = save_lora(tmp_path / "lora.safetensors", lora, key_format)
    assert main(["apply", "--model", str(tmp_path / "base"), "--result", str(path), "--out", str(tmp_path / "merged")]) == 0
    cls = SD3Transformer2DModel if kind == "sd3" else UNet2DModel
    assert torch.allclose(predict(cls.from_pretrained(str(tmp_path / "merged")), process, cond()), attached, atol=1e-5)
    record = json.loads((tmp_path / "merged" / APPLIED_RECORD).read_text())
    assert record["scale"] == 1.0 and record["result_metadata"]["unlearn.key_format"] == key_format
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "a staging folder was left behind"


def test_scale_zero_is_the_base_model_and_a_full_weights_file_replaces_it(tmp_path):
    _, process, data, _ = CASES["unet"]
    base = make_tiny_unet()
    outcome = unlearn_diffusers(base, process, data(), UnlearnConfig(steps=2, adapter="full", learning_rate=1e-2))
    lora = unlearn_diffusers(base, process, data(), CONFIG).lora
    zero = merge_into(make_tiny_unet(), save_lora(tmp_path / "l.safetensors", lora), scale=0.0)
    assert torch.equal(predict(zero, process, {}), predict(base, process, {}))
    full = save_full_weights(tmp_path / "full.safetensors", outcome.finetuned)
    assert torch.equal(predict(merge_into(make_tiny_unet(), full), process, {}), predict(outcome.finetuned, process, {}))
    with pytest.raises(InputError, match="has no strength: use scale 1"):
        merge_into(make_tiny_unet(), full, scale=0.5)


def test_apply_to_a_pipeline_folder_merges_the_unet_and_copies_the_rest(tmp_path):
    _, process, data, _ = CASES["unet"]
    save_ddpm_pipeline(tmp_path / "pipe")
    pipeline = DDPMPipeline.from_pretrained(str(tmp_path / "pipe"))
    lora = unlearn_diffusers(pipeline.unet, process, data(), CONFIG).lora
    path = save_lora(tmp_path / "lora.safetensors", lora, "comfy")
    apply_to_folder(tmp_path / "pipe", path, tmp_path / "merged")
    from_folder = DDPMPipeline.from_pretrained(str(tmp_path / "merged"))
    in_memory = apply_to_pipeline(pipeline, path)
    assert torch.equal(predict(from_folder.unet, process, {}), predict(in_memory.unet, process, {}))
    assert from_folder.scheduler.config.beta_schedule == "squaredcos_cap_v2"
    assert (tmp_path / "merged" / "scheduler" / "scheduler_config.json").read_bytes() == (
        tmp_path / "pipe" / "scheduler" / "scheduler_config.json").read_bytes()  # fmt: skip


def test_a_lora_for_another_model_changes_nothing_and_says_so(trained, tmp_path):
    kind, build, process, cond, lora, attached = trained
    other = make_tiny_unet() if kind == "sd3" else make_tiny_sd3()
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(InputError, match="apply the LoRA to the model it was trained on"):
        merge_into(other, save_lora(tmp_path / "l.safetensors", lora, "diffusers"))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_apply_refuses_an_existing_output_and_leaves_nothing_when_it_fails(tmp_path, monkeypatch):
    make_tiny_unet().save_pretrained(tmp_path / "base")
    _, process, data, _ = CASES["unet"]
    path = save_lora(tmp_path / "l.safetensors", unlearn_diffusers(make_tiny_unet(), process, data(), CONFIG).lora)
    (tmp_path / "taken").mkdir()
    with pytest.raises(InputError, match="already exists; give a new folder"):
        apply_to_folder(tmp_path / "base", path, tmp_path / "taken")

    def disk_full(self, *args, **kwargs):
        raise OSError(28, "No space left on device (injected)")

    monkeypatch.setattr(UNet2DModel, "save_pretrained", disk_full)
    with pytest.raises(OSError, match="No space left"):
        apply_to_folder(tmp_path / "base", path, tmp_path / "merged")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["base", "l.safetensors", "taken"]
