"""Preview grids of what a job trained on: its targets, their surrogates, the remember set.

Tensors are in the model's input space. Three-channel batches are shown as pixels ([-1, 1] to
[0, 1], as the demo does); latents (any other channel count) show their first three channels,
each tile scaled to its own minimum and maximum, which shows structure but not colour: decode
the training file's tensors with the model's VAE to see the images themselves.
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from ..formats.files import atomic_path
from .metrics import to_unit

__all__ = ["preview_tiles", "tile_grid", "save_training_preview"]

#: rows longer than this show their first tiles only
MAX_TILES = 8


def preview_tiles(batch: torch.Tensor, size: int = 64) -> list[torch.Tensor]:
    """(N, C, H, W) -> N tiles (3, h, w) in [0, 1], scaled up (nearest) to about ``size`` pixels."""
    batch = batch.detach().float().cpu()
    if batch.shape[1] == 3:
        tiles = to_unit(batch)
    else:
        channels = batch[:, :3] if batch.shape[1] >= 3 else batch[:, :1].expand(-1, 3, -1, -1)
        low = channels.amin(dim=(1, 2, 3), keepdim=True)
        high = channels.amax(dim=(1, 2, 3), keepdim=True)
        tiles = (channels - low) / (high - low).clamp_min(1e-8)
    scale = max(1, size // max(batch.shape[-2:]))
    return list(F.interpolate(tiles, scale_factor=scale, mode="nearest")) if scale > 1 else list(tiles)


def tile_grid(rows: list[list[torch.Tensor]], gap: int = 2) -> torch.Tensor:
    """Rows of equally sized (3, h, w) tiles -> one (3, H, W) image on white, rows left-aligned."""
    height, width = rows[0][0].shape[1:]
    columns = max(len(row) for row in rows)
    grid = torch.ones(3, len(rows) * (height + gap) + gap, columns * (width + gap) + gap)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = gap + r * (height + gap), gap + c * (width + gap)
            grid[:, top : top + height, left : left + width] = tile
    return grid


def save_png(path: Path, image: torch.Tensor) -> None:
    """(3, H, W) in [0, 1] -> PNG, atomically."""
    pixels = (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    with atomic_path(path) as temporary:
        temporary.write_bytes(buffer.getvalue())


def save_training_preview(path: str | Path, targets: torch.Tensor, surrogates: torch.Tensor, remember: torch.Tensor) -> Path:
    """Row 1: targets; row 2: their surrogates; row 3: remember samples (first 8 of each), as PNG."""
    rows = [preview_tiles(batch[:MAX_TILES]) for batch in (targets, surrogates, remember)]
    save_png(Path(path), tile_grid(rows))
    return Path(path)
