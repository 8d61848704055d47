"""Tiny random-weight model parts for tests: the MMDiT of SD3 (diffusers keys), Flux.1 dev and an SD1.5
UNet (ComfyUI keys), an SD3-style VAE (16 latent channels, or 4 for SD1.5), conditioning."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file

TEXT_DIM = 64
POOLED_DIM = 32
TOKENS = 8
SD15_TEXT_DIM = 768  # CLIP-L's width, which SD1.5's detection requires


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


def write_tiny_flux(path: Path) -> Path:
    """Flux.1 dev's layout (guidance input, one double and one single block, hidden 128: ComfyUI's
    detection fixes the rotary axes at 16 + 56 + 56, so one head of 128) in ComfyUI's own keys,
    which UNETLoader detects as Flux; the text and pooled widths of :func:`conditioning`."""
    import dataclasses

    import comfy.ops
    from comfy.ldm.flux.model import Flux, FluxParams

    params = dict(in_channels=16, out_channels=16, vec_in_dim=POOLED_DIM, context_in_dim=TEXT_DIM, hidden_size=128,
                  mlp_ratio=4.0, num_heads=1, depth=1, depth_single_blocks=1, axes_dim=[16, 56, 56], theta=10000,
                  patch_size=2, qkv_bias=True, guidance_embed=True, txt_ids_dims=[])  # fmt: skip
    known = {f.name for f in dataclasses.fields(FluxParams)}  # 0.3.x has fewer (no txt_ids_dims)
    network = Flux(image_model="flux", operations=comfy.ops.disable_weight_init, **{k: v for k, v in params.items() if k in known})
    save_file(_random_values(network, seed=2), str(path))
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


def conditioning(seed: int, batch: int = 1, text_dim: int = TEXT_DIM):
    """SD3-shaped CONDITIONING for the tiny model (what a text encoder would give); ``text_dim``
    sets the token width (SD1.5's is CLIP-L's 768)."""
    generator = torch.Generator().manual_seed(seed)
    return [[torch.randn(batch, TOKENS, text_dim, generator=generator),
             {"pooled_output": torch.randn(batch, POOLED_DIM, generator=generator)}]]  # fmt: skip
