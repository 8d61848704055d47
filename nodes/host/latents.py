"""ComfyUI's LATENT samples and the space the network denoises, in the core's (B, C, h, w) layout."""

from __future__ import annotations

import torch


def process_latent_in(patcher, samples: torch.Tensor) -> torch.Tensor:
    """Raw LATENT samples (VAE space) -> the space the network denoises."""
    return image_latent(patcher.model.process_latent_in(model_latent(patcher, samples.detach().clone().float())))


def process_latent_out(patcher, samples: torch.Tensor) -> torch.Tensor:
    """The space the network denoises -> raw LATENT samples (what :func:`process_latent_in` undoes)."""
    return image_latent(patcher.model.process_latent_out(model_latent(patcher, samples.detach().clone().float())))


def image_latent(samples: torch.Tensor) -> torch.Tensor:
    """Raw samples in the core's (B, C, h, w): an image model with a video VAE (Qwen-Image's Wan
    latent format) keeps its latents as (B, C, 1, h, w), one frame; the frame axis is dropped."""
    return samples.squeeze(2) if samples.dim() == 5 and samples.shape[2] == 1 else samples


def model_latent(patcher, samples: torch.Tensor) -> torch.Tensor:
    """The core's (B, C, h, w) in the layout the model takes (the frame axis back where its latent
    format has one)."""
    frames = patcher.get_model_object("latent_format").latent_dimensions == 3
    return samples.unsqueeze(2) if frames and samples.dim() == 4 else samples
