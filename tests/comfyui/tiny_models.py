"""Tiny random-weight model parts for tests: the MMDiT of SD3 (diffusers keys), Flux.1 dev and an SD1.5
UNet (ComfyUI keys), an SD3-style VAE (16 latent channels, or 4 for SD1.5), conditioning."""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT_DIM = 64
POOLED_DIM = 32
TOKENS = 8
SD15_TEXT_DIM = 768  # CLIP-L's width, which SD1.5's detection requires
SDXL_TEXT_DIM, SDXL_POOLED_DIM = 2048, 1280  # CLIP-L + CLIP-G tokens and CLIP-G's pooled output


def write_tiny_sd3(path: Path) -> Path:
    """Depth-2 MMDiT (hidden 128 = 64 x depth, as ComfyUI's detection expects)."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=TEXT_DIM, caption_projection_dim=128,
        pooled_projection_dim=POOLED_DIM, pos_embed_max_size=32,
    )  # fmt: skip
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def write_tiny_flux(path: Path, guidance: bool = True) -> Path:
    """Flux.1 dev's layout (guidance input, one double and one single block, hidden 128: ComfyUI's
    detection fixes the rotary axes at 16 + 56 + 56, so one head of 128) in ComfyUI's own keys,
    which UNETLoader detects as Flux; the text and pooled widths of :func:`conditioning`. Without
    ``guidance``: Flux.1 schnell's layout (no guidance input)."""
    import dataclasses

    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    params = dict(in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM, context_in_dim=TEXT_DIM, hidden_size=128,
                  mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, guidance_embed=guidance, txt_ids_dims=[])  # fmt: skip
    known = {f.name for f in dataclasses.fields(FluxParams)}  # 0.3.x has fewer (no txt_ids_dims)
    network = Flux(image_model="flux", operations=comfy.ops.disable_weight_init, **{k: v for k, v in params.items() if k in known})
    save_file(_random_values(network, seed=2), str(path))
    return path


def write_tiny_flux_schnell(path: Path) -> Path:
    """Flux.1 schnell's layout: :func:`write_tiny_flux` without the guidance input."""
    return write_tiny_flux(path, guidance=False)


def write_tiny_flux2(path: Path) -> Path:
    """Flux.2 dev's layout (global modulation, SiLU-gated MLPs, no biases, guidance input, no pooled
    text, 128-channel latents in patches of one) with one double and one single block at hidden 128
    (one head over the rotary axes 4 x 32), in ComfyUI's keys, which UNETLoader detects as Flux.2."""
    import comfy.ops
    from comfy.ldm.flux.model import Flux

    network = Flux(image_model="flux2", operations=comfy.ops.disable_weight_init, in_channels=128, out_channels=128,
                   vec_in_dim=None, context_in_dim=TEXT_DIM, hidden_size=128, mlp_ratio=3.0, num_heads=1, depth=1,
                   depth_single_blocks=1, axes_dim=[32, 32, 32, 32], theta=2000, patch_size=1, qkv_bias=False,
                   guidance_embed=True, txt_ids_dims=[3], global_modulation=True, mlp_silu_act=True, ops_bias=False,
                   default_ref_method="index", ref_index_scale=10.0)  # fmt: skip
    save_file(_random_values(network, seed=10), str(path))
    return path


def write_tiny_sd15(path: Path) -> Path:
    """An SD1.5-layout UNet (4 latent channels, context 768, model channels 320: what ComfyUI's
    detection matches SD1.5 by) with one level, one res block and one transformer block, in
    ComfyUI's own keys; fp16 on disk (about 50 MB)."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    network = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1],
                        channel_mult=(1,), transformer_depth=[1], transformer_depth_output=[1, 1], transformer_depth_middle=1,
                        num_heads=8, context_dim=SD15_TEXT_DIM, use_linear_in_transformer=False, use_spatial_transformer=True,
                        operations=comfy.ops.disable_weight_init)  # fmt: skip
    save_file(_random_values(network, seed=4, dtype=torch.float16), str(path))
    return path


def write_tiny_sdxl(path: Path) -> Path:
    """An SDXL-layout UNet that ComfyUI detects as the SDXL family (model_base.SDXL): context 2048,
    the pooled and size conditioning (adm 2816) and linear transformer projections as SDXL, with the
    transformer depths of KOALA-700M (an SDXL distillation ComfyUI knows: 0, 2 and 5 blocks per
    level), one res block per level and every level 320 wide, so that it is about 80M parameters
    instead of SDXL's 2.6B; fp16 on disk."""
    import comfy.ops
    from comfy.ldm.modules.diffusionmodules.openaimodel import UNetModel

    network = UNetModel(image_size=32, in_channels=4, out_channels=4, model_channels=320, num_res_blocks=[1, 1, 1],
                        channel_mult=(1, 1, 1), transformer_depth=[0, 2, 5], transformer_depth_output=[0, 0, 1, 1, 1, 1],
                        transformer_depth_middle=1, num_head_channels=64, context_dim=SDXL_TEXT_DIM,
                        use_linear_in_transformer=True, use_spatial_transformer=True, adm_in_channels=2816,
                        num_classes="sequential", operations=comfy.ops.disable_weight_init)  # fmt: skip
    save_file(_random_values(network, seed=5, dtype=torch.float16), str(path))
    return path


#: The widths ComfyUI's detection fixes at the full models' sizes (it reads only the family, the
#: input channels and the depth from a Qwen-Image or Lumina 2 / Z-Image file), replaced for the tiny
#: ones: one head of 128 (the rotary axes' sum) and narrow text. Everything else the detection reads
#: from the file, and its matching picks the family's model config as for a real file.
TINY_WIDTHS = {
    "qwen_image": {"attention_head_dim": 128, "num_attention_heads": 1, "joint_attention_dim": TEXT_DIM},
    # Chroma's modulation approximator (fixed at 5 layers of 5120 for a 3072-wide network)
    "chroma": {"out_dim": 128, "hidden_dim": 256, "n_layers": 1},
    # HiDream I1: one double and one single block, two experts, narrow Llama and T5 tokens
    "hidream": {"attention_head_dim": 128, "num_attention_heads": 1, "caption_channels": [TEXT_DIM, TEXT_DIM],
                "llama_layers": [0, 1], "num_layers": 1, "num_single_layers": 1, "text_emb_dim": POOLED_DIM,
                "num_routed_experts": 2, "num_activated_experts": 1},
    # Z-Image's settings (detection's dim-3840 branch) at width 256: two heads of 128
    "lumina2": {"n_heads": 2, "n_kv_heads": 2, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32},
}  # fmt: skip


@contextmanager
def tiny_widths():
    """ComfyUI's detection with :data:`TINY_WIDTHS` added to what it reads from a file."""
    import comfy.model_detection as detection

    detect = detection.detect_unet_config

    def with_tiny_widths(state_dict, key_prefix, metadata=None):
        config = detect(state_dict, key_prefix, metadata=metadata)
        return {**config, **TINY_WIDTHS.get(config.get("image_model"), {})} if config else config

    detection.detect_unet_config = with_tiny_widths
    try:
        yield
    finally:
        detection.detect_unet_config = detect


def write_tiny_chroma(path: Path) -> Path:
    """Chroma's network (Flux.1 schnell's blocks, no pooled text or guidance input, modulation from
    its approximator) with one double and one single block at hidden 128 and the approximator of
    :data:`TINY_WIDTHS`, in ComfyUI's keys."""
    import dataclasses

    import comfy.ops
    from comfy.ldm.chroma.model import Chroma, ChromaParams

    params = dict(in_channels=64, out_channels=64, context_in_dim=TEXT_DIM, hidden_size=128, mlp_ratio=4.0, num_heads=1, depth=1,
                  depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000, patch_size=2, qkv_bias=True, in_dim=64,
                  txt_ids_dims=[], vec_in_dim=None, **TINY_WIDTHS["chroma"])  # fmt: skip
    known = {f.name for f in dataclasses.fields(ChromaParams)}  # 0.3.x has fewer
    network = Chroma(operations=comfy.ops.disable_weight_init, **{k: v for k, v in params.items() if k in known})
    save_file(_random_values(network, seed=9), str(path))
    return path


def write_tiny_hidream(path: Path) -> Path:
    """HiDream I1's network (comfy.ldm.hidream: double and single blocks with mixture-of-experts
    MLPs, conditioned on T5 tokens, Llama hidden states and a pooled CLIP vector) at
    :data:`TINY_WIDTHS`, in ComfyUI's keys."""
    import comfy.ops
    from comfy.ldm.hidream.model import HiDreamImageTransformer2DModel

    network = HiDreamImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=16, axes_dims_rope=[64, 32, 32],
                                             max_resolution=[128, 128], operations=comfy.ops.disable_weight_init,
                                             **TINY_WIDTHS["hidream"])  # fmt: skip
    save_file(_random_values(network, seed=12), str(path))
    return path


def hidream_llama(seed: int, batch: int = 1) -> torch.Tensor:
    """The Llama hidden states HiDream's text encoder adds to a CONDITIONING (conditioning_llama3):
    (batch, layers, tokens, width), for the tiny network's two layers."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, len(TINY_WIDTHS["hidream"]["llama_layers"]), TOKENS, TEXT_DIM, generator=generator)


def write_tiny_qwen_image(path: Path) -> Path:
    """Qwen-Image's network (comfy.ldm.qwen_image) with one block at :data:`TINY_WIDTHS`, in
    ComfyUI's keys."""
    import comfy.ops
    from comfy.ldm.qwen_image.model import QwenImageTransformer2DModel

    network = QwenImageTransformer2DModel(num_layers=1, operations=comfy.ops.disable_weight_init, **TINY_WIDTHS["qwen_image"])
    save_file(_random_values(network, seed=6), str(path))
    return path


def write_tiny_z_image(path: Path) -> Path:
    """Z-Image's network (Lumina 2's NextDiT with Z-Image's modulation) with one layer and the two
    refiners at width 256 (:data:`TINY_WIDTHS`), in ComfyUI's keys."""
    import comfy.ops
    from comfy.ldm.lumina.model import NextDiT

    network = NextDiT(patch_size=2, in_channels=16, dim=256, n_layers=1, qk_norm=True, cap_feat_dim=TEXT_DIM,
                      operations=comfy.ops.disable_weight_init, **TINY_WIDTHS["lumina2"])  # fmt: skip
    save_file(_random_values(network, seed=7), str(path))
    return path


def _random_values(network: torch.nn.Module, seed: int, dtype: torch.dtype = torch.float32) -> dict[str, torch.Tensor]:
    """Defined values for every tensor of a network built with ComfyUI's layers, which skip
    initialisation: small random matrices, unit norm scales and weights, zero biases."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, tensor in network.state_dict().items():
        if tensor.dim() > 1:
            value = torch.randn(tensor.shape, generator=generator) * 0.02
        else:
            value = torch.ones(tensor.shape) if name.endswith(("scale", "weight")) else torch.zeros(tensor.shape)
        tensors[name] = value.to(dtype).contiguous()
    return tensors


def write_tiny_vae(path: Path, latent_channels: int = 16) -> Path:
    """An SD3-layout VAE (16 latent channels, 8x downscale), random weights, with a slim decoder
    where the host's VAE loader reads the decoder's width from the weights (ComfyUI 0.33), else
    with the full-width decoder its fixed SD3 configuration expects (0.3.x)."""
    _write_vae(path, decoder_ch=32, latent_channels=latent_channels)
    try:
        import comfy.sd
        import comfy.utils

        comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
    except RuntimeError:  # size mismatch: this host builds the decoder at the encoder's width
        _write_vae(path, decoder_ch=128, latent_channels=latent_channels)
    return path


def _write_vae(path: Path, decoder_ch: int, latent_channels: int = 16) -> None:
    from comfy.ldm.models.autoencoder import AutoencodingEngine

    torch.manual_seed(1)
    config = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}  # fmt: skip
    decoder = dict(config, ch=decoder_ch)
    engine = AutoencodingEngine(
        regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
        encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": config},
        decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": decoder},
    )
    with torch.no_grad():  # ComfyUI's layers skip initialisation: give every tensor defined values
        for name, tensor in engine.state_dict().items():
            if tensor.dim() > 1:
                torch.nn.init.kaiming_uniform_(tensor, a=5**0.5)
            elif name.endswith("weight"):
                tensor.fill_(1.0)
            else:
                tensor.zero_()
    save_file({k: v.detach().half().contiguous() for k, v in engine.state_dict().items()}, str(path))


def write_tiny_flux2_vae(path: Path) -> Path:
    """Flux.2's VAE layout (32 latent channels, batch-normalised in 2x2 patches into 128 channels at
    16x downscale), random weights, with a slim decoder (ComfyUI 0.33 reads its width)."""
    from comfy.ldm.models.autoencoder import AutoencoderKL

    config = {"double_z": True, "z_channels": 32, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
              "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0, "batch_norm_latent": True}  # fmt: skip
    network = AutoencoderKL(ddconfig=config, embed_dim=32, decoder_ddconfig=dict(config, ch=32))
    tensors = _random_values(network, seed=11, dtype=torch.float16)
    tensors["bn.running_var"] = torch.ones_like(tensors["bn.running_var"])  # unit variance: latents as encoded
    tensors["bn.num_batches_tracked"] = torch.tensor(0)
    save_file(tensors, str(path))
    return path


def write_tiny_wan_vae(path: Path) -> Path:
    """Qwen-Image's VAE layout (Wan 2.1: 16 latent channels, 8x downscale, latents with a time
    axis), random weights at width 16, which ComfyUI 0.33's VAE loader reads from the weights."""
    import inspect

    from comfy.ldm.wan.vae import WanVAE

    for dim in (16, 96):  # 0.3.x's VAE loader fixes the width at the real VAE's 96
        options = dict(dim=dim, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2, attn_scales=[],
                       temperal_downsample=[False, True, True], image_channels=3, conv_out_channels=3, dropout=0.0)  # fmt: skip
        known = inspect.signature(WanVAE).parameters  # 0.3.x's has no image or output channel options
        network = WanVAE(**{k: v for k, v in options.items() if k in known})
        save_file(_random_values(network, seed=8, dtype=torch.float16), str(path))
        try:
            import comfy.sd
            import comfy.utils

            comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))
            break
        except RuntimeError:  # size mismatch: write it at the width this host builds
            continue
    return path


def conditioning(seed: int, batch: int = 1, text_dim: int = TEXT_DIM, pooled_dim: int = POOLED_DIM):
    """SD3-shaped CONDITIONING for the tiny model (what a text encoder would give); ``text_dim``
    and ``pooled_dim`` set the token and pooled widths of other families (SD1.5's tokens are
    CLIP-L's 768 wide; 0: no pooled output)."""
    generator = torch.Generator().manual_seed(seed)
    text = torch.randn(batch, TOKENS, text_dim, generator=generator)
    if not pooled_dim:  # LLM text encoders (Qwen-Image, Z-Image) give tokens only
        return [[text, {}]]
    return [[text, {"pooled_output": torch.randn(batch, pooled_dim, generator=generator)}]]
