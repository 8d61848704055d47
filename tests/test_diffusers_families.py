"""Flux, Qwen-Image and SD1.5 / SDXL UNets through the diffusers path: called as their pipelines call
them, trained with the base untouched, and saved so that diffusers' load_lora_adapter takes every key."""

import copy
import json
import math

import pytest
import torch
from conftest import assert_bit_identical, make_data, quick_job, save_targets, snapshot
from diffusers import (
    DDPMScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
    QwenImagePipeline,
    QwenImageTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
)
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file

from unlearn_core import DDPMEpsilon, InputError, RectifiedFlow, UnlearnConfig
from unlearn_core.backends.diffusers_backend import (
    DiffusersDenoiser,
    flux_image_ids,
    lora_attached,
    lora_target_names,
    pack_latents,
    unlearn_diffusers,
    unpack_latents,
)
from unlearn_core.cli import main
from unlearn_core.diffusion.process import DDPMVelocity
from unlearn_core.diffusion.sampling import sample
from unlearn_core.formats.apply import merge_into
from unlearn_core.formats.lora import LoraLayer, LoraWeights, load_lora, save_lora, state_dict_for
from unlearn_core.formats.model_folders import dynamic_shift, locate
from unlearn_core.serve.provider import plan_job

torch.set_num_threads(1)

#: Flux.1 dev's scheduler: the shift follows the image size
DYNAMIC = dict(use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)


def tiny_flux(guidance: bool = True, seed: int = 0):
    torch.manual_seed(seed)
    return FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, pooled_projection_dim=8, guidance_embeds=guidance, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def tiny_qwen(seed: int = 0):
    torch.manual_seed(seed)
    return QwenImageTransformer2DModel(
        patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=16, axes_dims_rope=(2, 2, 4),
    ).eval()  # fmt: skip


def tiny_unet_cond(sdxl: bool, seed: int = 0):
    torch.manual_seed(seed)
    extra = dict(addition_embed_type="text_time", addition_time_embed_dim=4, projection_class_embeddings_input_dim=8 + 6 * 4)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=16, norm_num_groups=4, attention_head_dim=4, **(extra if sdxl else {}),
    ).eval()  # fmt: skip


def cond_for(kind: str):
    """The conditioning each tiny model reads, as a factory of n rows (what a targets file holds)."""

    def make(n: int, seed: int = 1) -> dict[str, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        text = {"encoder_hidden_states": torch.randn(n, 3, 16, generator=g)}
        if kind == "flux":
            return {**text, "pooled_projections": torch.randn(n, 8, generator=g), "guidance": torch.full((n,), 3.5)}
        if kind == "sdxl":
            return {**text, "text_embeds": torch.randn(n, 8, generator=g), "time_ids": torch.tensor([[8.0, 8, 0, 0, 8, 8]] * n)}
        return text

    return make


FLOW = RectifiedFlow(shift=1.5)
DDPM = DDPMEpsilon.from_scheduler(DDPMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012))
#: case -> (model factory, process, the diffusers prefix of its LoRA keys)
CASES = {
    "flux": (tiny_flux, FLOW, "transformer"),
    "qwen_image": (tiny_qwen, FLOW, "transformer"),
    "sd15": (lambda: tiny_unet_cond(sdxl=False), DDPM, "unet"),
    "sdxl": (lambda: tiny_unet_cond(sdxl=True), DDPM, "unet"),
}


def probe(model, process, cond, shape=(2, 4, 8, 8)):
    x = torch.randn(shape, generator=torch.Generator().manual_seed(9))
    with torch.no_grad():
        return DiffusersDenoiser(model, process).predict_x0(x, torch.tensor([0.7, 0.3]), cond)


def quick(**overrides):
    values = dict(steps=3, learning_rate=1e-2, lora_rank=2, forget_batch_size=2, remember_batch_size=2,
                  stop_when_forgotten=False)  # fmt: skip
    return UnlearnConfig(**{**values, **overrides})


def load_with_diffusers(model, tensors: dict[str, torch.Tensor], prefix: str):
    """A copy of ``model`` with the file's LoRA loaded by diffusers, after checking that the adapter
    holds exactly the file's tensors: no key of the file left out, none of the model's missing."""
    loaded = copy.deepcopy(model)
    loaded.load_lora_adapter(dict(tensors), adapter_name="check", prefix=prefix)
    held = get_peft_model_state_dict(loaded, adapter_name="check")
    assert set(held) == {key.removeprefix(prefix + ".") for key in tensors}
    for key, value in held.items():
        assert torch.equal(value, tensors[f"{prefix}.{key}"]), key
    return loaded


# --- packing -------------------------------------------------------------------------------------


def test_packing_is_the_pipelines_and_round_trips_exactly():
    latents = torch.randn(2, 4, 6, 10)  # not square: rows and columns must not swap
    tokens = pack_latents(latents)
    assert tokens.shape == (2, 15, 16)
    assert torch.equal(tokens, FluxPipeline._pack_latents(latents, 2, 4, 6, 10))
    assert torch.equal(tokens, QwenImagePipeline._pack_latents(latents.unsqueeze(1), 2, 4, 6, 10))
    assert torch.equal(unpack_latents(tokens, 6, 10), latents)
    assert torch.equal(unpack_latents(tokens, 6, 10), FluxPipeline._unpack_latents(tokens, 48, 80, 8))
    expected_ids = FluxPipeline._prepare_latent_image_ids(2, 3, 5, "cpu", torch.float32)
    assert torch.equal(flux_image_ids(3, 5, "cpu", torch.float32), expected_ids)


@pytest.mark.parametrize("kind", ["flux", "qwen_image"])
def test_the_denoiser_samples_as_the_pipeline_does(kind):
    """Two steps of the diffusers pipeline (its dynamic shift at this size, timestep / 1000, guidance,
    position ids) and of the core's sampler over the denoiser land on the same latents."""
    model = tiny_flux() if kind == "flux" else tiny_qwen()
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0, **DYNAMIC)
    noise = torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(3))
    cond = cond_for(kind)(1)
    if kind == "flux":
        pipe = FluxPipeline(scheduler, None, None, None, None, None, model)
        options = dict(pooled_prompt_embeds=cond["pooled_projections"], guidance_scale=3.5)
    else:
        pipe = QwenImagePipeline(scheduler, None, None, None, model)
        options = dict(prompt_embeds_mask=torch.ones(1, 3, dtype=torch.long), true_cfg_scale=1.0)
    with torch.no_grad():
        tokens = pipe(prompt_embeds=cond["encoder_hidden_states"], latents=pack_latents(noise), height=64, width=96,
                      num_inference_steps=2, output_type="latent", **options).images  # fmt: skip
    process = RectifiedFlow(shift=dynamic_shift(scheduler.config, (8, 12)))
    ours = sample(DiffusersDenoiser(model, process), process, noise, cond, steps=2)
    assert torch.allclose(ours, unpack_latents(tokens, 8, 12), atol=1e-5)


def test_sdxl_gets_its_text_embeds_and_time_ids_as_the_pipeline_passes_them():
    model, cond = tiny_unet_cond(sdxl=True), cond_for("sdxl")(2)
    x, t = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(4)), torch.tensor([0.7, 0.3])
    with torch.no_grad():
        ours = DiffusersDenoiser(model, DDPM).raw_output(x, t, cond)
        added = {"text_embeds": cond["text_embeds"], "time_ids": cond["time_ids"]}
        expected = model(x, DDPM.model_timestep(t), encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added).sample
        other_size = model(x, DDPM.model_timestep(t), encoder_hidden_states=cond["encoder_hidden_states"],
                           added_cond_kwargs={**added, "time_ids": cond["time_ids"] * 2}).sample  # fmt: skip
    assert torch.equal(ours, expected)
    assert not torch.allclose(ours, other_size)  # the time ids reach the network


def test_dynamic_shift_is_the_schedulers_time_shift_at_that_size():
    from diffusers.pipelines.flux.pipeline_flux import calculate_shift

    for time_shift_type in ("exponential", "linear"):
        scheduler = FlowMatchEulerDiscreteScheduler(time_shift_type=time_shift_type, **DYNAMIC)
        for size in ((64, 64), (128, 96)):
            mu = calculate_shift(size[0] // 2 * size[1] // 2, 256, 4096, 0.5, 1.15)
            scheduler.set_timesteps(sigmas=[0.9, 0.5, 0.2], mu=mu)
            shifted = RectifiedFlow(shift=dynamic_shift(scheduler.config, size)).shifted(torch.tensor([0.9, 0.5, 0.2]))
            assert torch.allclose(shifted, scheduler.sigmas[:3], atol=1e-6), (time_shift_type, size)
    assert dynamic_shift(dict(DYNAMIC), (128, 128)) == pytest.approx(math.exp(1.15))  # 4096 tokens: max_shift


# --- conditioning --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "make, change, message",
    [
        (tiny_flux, {"guidance": None}, r"Flux conditioning lacks \['guidance'\].*guidance-distilled"),
        (lambda: tiny_flux(guidance=False), {}, r"has unknown \['guidance'\].*no guidance embedding.*remove guidance"),
        (tiny_qwen, {"pooled_projections": torch.zeros(2, 8)}, r"Qwen-Image conditioning has unknown \['pooled_projections'\]: "
                                                               r"this model reads encoder_hidden_states \(optionally encoder_hidden_states_mask\)"),
        (lambda: tiny_unet_cond(sdxl=True), {"time_ids": None}, r"lacks \['time_ids'\]: this model reads encoder_hidden_states, "
                                                                r"text_embeds, time_ids"),
        (lambda: tiny_unet_cond(sdxl=False), {"encoder_hidden_states": None, "prompt_embeds": torch.zeros(2, 3, 16)},
         r"lacks \['encoder_hidden_states'\] and has unknown \['prompt_embeds'\]"),
    ],
    ids=["flux dev without guidance", "flux schnell with guidance", "qwen with a pooled embedding", "sdxl without time_ids",
         "sd15 with a misnamed prompt"],
)  # fmt: skip
def test_wrong_or_missing_conditioning_is_refused_with_what_the_kind_reads(make, change, message):
    model = make()
    kind = {"FluxTransformer2DModel": "flux", "QwenImageTransformer2DModel": "qwen_image"}.get(type(model).__name__)
    kind = kind or ("sdxl" if model.config.addition_embed_type else "sd15")
    cond = {**cond_for(kind)(2), "guidance": torch.full((2,), 3.5)} if kind == "flux" else cond_for(kind)(2)
    cond = {key: value for key, value in {**cond, **change}.items() if value is not None}
    with pytest.raises(InputError, match=message + ".*targets file"):
        probe(model, FLOW, cond)


def test_packed_latents_need_even_sides_and_the_models_channels():
    with pytest.raises(InputError, match=r"latents must be \(B, 4, H, W\) with H and W even, got \(2, 4, 7, 8\)"):
        probe(tiny_flux(), FLOW, cond_for("flux")(2), shape=(2, 4, 7, 8))
    with pytest.raises(InputError, match=r"\(B, 4, H, W\).*got \(2, 16, 8, 8\)"):
        probe(tiny_qwen(), FLOW, cond_for("qwen_image")(2), shape=(2, 16, 8, 8))


# --- training and saving -------------------------------------------------------------------------


def test_flux_default_targets_are_the_block_layers_comfyui_trains():
    names = set(lora_target_names(tiny_flux(), None, 2))
    double = {f"transformer_blocks.0.attn.{p}" for p in ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj",
                                                          "add_v_proj", "to_add_out")}  # fmt: skip
    single = {f"single_transformer_blocks.0.{p}" for p in ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp", "proj_out")}
    assert names == double | single  # not the final layer, which is also called proj_out
    assert "proj_out" in lora_target_names(tiny_flux(), ("proj_out",), 2)  # a target the user names is taken as named


@pytest.mark.parametrize("case", list(CASES))
def test_trained_lora_loads_in_diffusers_with_every_key_and_the_same_output(tmp_path, case):
    make, process, prefix = CASES[case]
    model = make()
    cond = cond_for(case)
    data = make_data(4, 8, cond)
    before, base_output = snapshot(model), probe(model, process, cond(2))

    outcome = unlearn_diffusers(model, process, data, quick())
    assert_bit_identical(model, before)
    assert outcome.lora.kind == ("flux" if case == "flux" else "qwen_image" if case == "qwen_image" else "unet_cond")
    assert set(outcome.lora.layers) == set(lora_target_names(model, None, 2))
    with lora_attached(model, weights=outcome.lora):
        trained_output = probe(model, process, cond(2))
    assert not torch.allclose(trained_output, base_output, atol=1e-4), "training did not move the LoRA"

    path = save_lora(tmp_path / "lora.safetensors", outcome.lora, "diffusers")
    tensors = load_file(str(path))
    assert all(key.startswith(prefix + ".") for key in tensors)
    loaded = load_with_diffusers(model, tensors, prefix)
    assert torch.allclose(probe(loaded, process, cond(2)), trained_output, atol=1e-5)
    assert_bit_identical(model, before)


def test_comfy_keys_per_family(tmp_path):
    """Flux has no 'comfy' keys here (the error names 'diffusers'); Qwen-Image's are its diffusers
    names under diffusion_model. (never SD3's joint blocks, though the names read alike); SD1.5 /
    SDXL's are kohya names, which the apply path maps back onto the model exactly."""
    g = torch.Generator().manual_seed(0)
    layer = LoraLayer(torch.randn(2, 16, generator=g), torch.randn(16, 2, generator=g), 2.0)
    flux = LoraWeights({"transformer_blocks.0.attn.to_q": layer}, kind="flux")
    with pytest.raises(InputError, match="save with key format 'diffusers'"):
        save_lora(tmp_path / "flux.safetensors", flux, "comfy")
    qwen = LoraWeights({"transformer_blocks.0.attn.to_q": layer}, kind="qwen_image")
    path = save_lora(tmp_path / "qwen.safetensors", qwen, "diffusers")
    reloaded = load_lora(path)  # the kind travels in the file, so a re-save does not become SD3's keys
    assert reloaded.kind == "qwen_image"
    assert set(state_dict_for(reloaded, "comfy")) == {f"diffusion_model.transformer_blocks.0.attn.to_q.{part}"
                                                      for part in ("lora_down.weight", "lora_up.weight", "alpha")}  # fmt: skip

    model, cond = tiny_unet_cond(sdxl=True), cond_for("sdxl")
    outcome = unlearn_diffusers(model, DDPM, make_data(4, 8, cond), quick())
    path = save_lora(tmp_path / "sdxl.safetensors", outcome.lora, "comfy")
    keys = load_file(str(path))
    assert "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_out_0.lora_down.weight" in keys
    assert all(key.startswith("lora_unet_") for key in keys)
    with lora_attached(model, weights=outcome.lora):
        trained_output = probe(model, DDPM, cond(2))
    merged = merge_into(copy.deepcopy(model), path)
    assert torch.allclose(probe(merged, DDPM, cond(2)), trained_output, atol=1e-5)


# --- model folders and the CLI -------------------------------------------------------------------


def save_pipeline(folder, kind: str, **scheduler_options):
    """A pipeline folder as save_pretrained writes it, with the tiny network and no text encoders or VAE."""
    if kind == "flux":
        FluxPipeline(FlowMatchEulerDiscreteScheduler(**scheduler_options), None, None, None, None, None, tiny_flux()).save_pretrained(folder)
    elif kind == "qwen_image":
        QwenImagePipeline(FlowMatchEulerDiscreteScheduler(**scheduler_options), None, None, None, tiny_qwen()).save_pretrained(folder)
    elif kind == "sd15":
        StableDiffusionPipeline(None, None, None, tiny_unet_cond(sdxl=False), DDPMScheduler(**scheduler_options), None, None,
                                requires_safety_checker=False).save_pretrained(folder)  # fmt: skip
    else:
        StableDiffusionXLPipeline(None, None, None, None, None, tiny_unet_cond(sdxl=True),
                                  EulerDiscreteScheduler(**scheduler_options)).save_pretrained(folder)  # fmt: skip
    return folder


def test_pipeline_folders_of_each_family_are_located_with_their_schedule(tmp_path):
    flux = locate({"path": str(save_pipeline(tmp_path / "flux", "flux", shift=3.0, **DYNAMIC))}, tmp_path)
    assert flux.kind == "flux" and flux.shift is None and flux.model_dir.name == "transformer"
    record = flux.describe((8, 8))
    assert record["kind"] == "flux" and record["shift"] == pytest.approx(dynamic_shift(DYNAMIC, (8, 8)))
    assert flux.process(latent_size=(8, 8)).shift == pytest.approx(math.exp(0.5 + 0.65 / 3840 * (16 - 256)))

    qwen = locate({"path": str(save_pipeline(tmp_path / "qwen", "qwen_image", shift=2.0))}, tmp_path)
    assert qwen.kind == "qwen_image" and qwen.process().shift == 2.0 and qwen.describe()["kind"] == "qwen_image"

    betas = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    sd15 = locate({"path": str(save_pipeline(tmp_path / "sd15", "sd15", clip_sample=False, steps_offset=1, **betas))}, tmp_path)
    assert sd15.kind == "unet_cond" and sd15.model_dir.name == "unet" and sd15.clip is None
    assert torch.equal(sd15.process().alphas_cumprod, DDPMScheduler(**betas).alphas_cumprod.double())
    sdxl = locate({"path": str(save_pipeline(tmp_path / "sdxl", "sdxl", prediction_type="v_prediction", **betas))}, tmp_path)
    assert sdxl.kind == "unet_cond" and type(sdxl.process()) is DDPMVelocity
    assert sdxl.clip is None  # Euler does not clip latents (DDPMScheduler's default would clamp them to +-1)


def test_a_flux_transformer_without_a_scheduler_is_refused_with_the_fix(tmp_path):
    tiny_flux().save_pretrained(tmp_path / "transformer")
    with pytest.raises(InputError, match="no scheduler config for the FluxTransformer2DModel") as caught:
        locate({"path": "transformer", "kind": "flux"}, tmp_path)
    assert '"scheduler"' in str(caught.value) and '"shift"' in str(caught.value)
    assert locate({"path": "transformer", "kind": "flux", "shift": 1.0}, tmp_path).shift == 1.0


def test_a_cli_job_on_a_flux_pipeline_folder_runs_end_to_end(tmp_path):
    save_pipeline(tmp_path / "pipe", "flux", shift=3.0, **DYNAMIC)
    save_targets(tmp_path / "targets.safetensors", channels=4, cond=cond_for("flux")(1))
    job = quick_job("pipe", "targets.safetensors", config={"stop_when_forgotten": False})
    with pytest.raises(InputError, match="key format 'comfy' is not written for a flux LoRA.*'diffusers'"):
        plan_job({**job, "key_format": "comfy"}, tmp_path)  # refused before any work
    (tmp_path / "job.json").write_text(json.dumps(job))
    assert main(["run", str(tmp_path / "job.json")]) == 0

    report = json.loads((tmp_path / "out" / "forget.report.json").read_text())
    assert report["key_format"] == "diffusers" and report["base_model"]["kind"] == "flux"
    assert report["base_model"]["shift"] == pytest.approx(dynamic_shift(DYNAMIC, (8, 8)))  # not the config's 3.0
    lora = load_lora(tmp_path / "out" / "forget.safetensors")
    assert lora.kind == "flux"
    model = FluxTransformer2DModel.from_pretrained(tmp_path / "pipe" / "transformer").eval()
    assert set(lora.layers) == set(lora_target_names(model, None, 2))
    tensors = load_file(str(tmp_path / "out" / "forget.safetensors"))
    loaded = load_with_diffusers(model, tensors, "transformer")
    cond = cond_for("flux")(2)
    with lora_attached(model, weights=lora):
        attached = probe(model, FLOW, cond)
    assert torch.allclose(probe(loaded, FLOW, cond), attached, atol=1e-5)
