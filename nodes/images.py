"""ComfyUI IMAGE tensors (B, H, W, 3) in [0, 1]: previews and grids, and the core's (3, H, W) layout."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def to_core(image: torch.Tensor) -> torch.Tensor:
    """One IMAGE entry (H, W, C) -> (3, H, W), the layout of unlearn_core's metrics."""
    return image[..., :3].permute(2, 0, 1).float()


def from_core(image: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> an IMAGE batch of one (1, H, W, 3)."""
    return image.permute(1, 2, 0).unsqueeze(0)


def resized(images: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """An IMAGE batch at another size (bilinear, antialiased)."""
    if images.shape[1:3] == (height, width):
        return images
    scaled = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(height, width), mode="bilinear", antialias=True)
    return scaled.permute(0, 2, 3, 1).clamp(0, 1)


def preview_batch(images: list[torch.Tensor]) -> torch.Tensor:
    """Stack (H, W, 3) images of possibly different sizes into one IMAGE batch (padded)."""
    height = max(i.shape[0] for i in images)
    width = max(i.shape[1] for i in images)
    padded = [F.pad(i.permute(2, 0, 1), (0, width - i.shape[1], 0, height - i.shape[0])).permute(1, 2, 0) for i in images]
    return torch.stack(padded)


def grid(top: list[torch.Tensor], bottom: list[torch.Tensor]) -> torch.Tensor:
    """One IMAGE of two rows of IMAGE batches of one image each (same column = same seed)."""
    height = max(i.shape[1] for i in top)
    width = max(i.shape[2] for i in top)

    def row(images):
        return torch.cat([resized(i, height, width) for i in images], dim=2)

    return torch.cat([row(top), row(bottom)], dim=1)
