"""ComfyUI's VAE and CLIP vision model: IMAGE <-> raw LATENT samples, and an embedder for the metrics."""

from __future__ import annotations

import logging

import torch

from ...unlearn_core.verify.metrics import CopyDetector
from .latents import image_latent

log = logging.getLogger(__name__)


def decoder(vae):
    """Raw LATENT samples -> images (B, 3, H, W) in [0, 1], the core's layout."""
    return lambda samples: decode(vae, samples).movedim(-1, 1).float()


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> raw LATENT samples.

    ComfyUI's VAE silently centre-crops sides that are not a multiple of its scale; the whole
    image is resized to the nearest multiple instead (with a warning), so nothing of the target
    is cut away.
    """
    images = images[:, :, :, :3]
    scale = vae_scale(vae)
    height, width = images.shape[1:3]
    size = (max(scale, round(height / scale) * scale), max(scale, round(width / scale) * scale))
    if size != (height, width) and getattr(vae, "crop_input", True):
        log.warning(
            "image %dx%d is not a multiple of the VAE's scale %d: resized to %dx%d (not cropped); "
            "mark images whose sides are multiples of %d to avoid resizing", width, height, scale, size[1], size[0], scale,
        )  # fmt: skip
        resized = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=size, mode="bilinear", antialias=True)
        images = resized.movedim(1, -1).clamp(0, 1)
    return image_latent(vae.encode(images))


def vae_scale(vae) -> int:
    """How many pixels one latent cell covers (8 for SD3's VAE)."""
    spatial = getattr(vae, "spacial_compression_encode", None)
    scale = spatial() if callable(spatial) else getattr(vae, "downscale_ratio", 8)
    return scale if isinstance(scale, int) and scale > 0 else 8


def decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """Raw LATENT samples -> IMAGE (B, H, W, 3)."""
    if getattr(vae, "latent_dim", 2) == 3 and samples.dim() == 4:  # a video VAE: one frame
        samples = samples.unsqueeze(2)
    images = vae.decode(samples)
    if images.dim() == 5:  # video VAEs return (B, T, H, W, C)
        images = images.reshape(-1, *images.shape[-3:])
    return images.clamp(0, 1)


class ClipVisionEmbedder(CopyDetector):
    """A CLIP_VISION model as an image embedder for the core's metrics (a semantic similarity column)."""

    name = "clip"

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_vision.encode_image(images.permute(0, 2, 3, 1)).image_embeds.float()
