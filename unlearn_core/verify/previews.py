"""Preview grids of what a job trained on: its targets, their surrogates, the remember set.

Tensors are in the model's input space. Three-channel batches are shown as pixels ([-1, 1] to
[0, 1], as the demo does); latents (any other channel count) show their first three channels,
each tile scaled to its own minimum and maximum, which shows structure but not colour: decode
the training file's tensors with the model's VAE to see the images themselves.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont

from ..formats.files import atomic_path
from .metrics import to_unit

__all__ = ["preview_tiles", "tile_grid", "save_training_preview"]

#: rows longer than this show their first tiles only
MAX_TILES = 8
#: space around a label in its band, in pixels, and the labels' colour (dark grey on white)
LABEL_PADDING = 3
LABEL_COLOUR = (40, 40, 40)


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


def tile_grid(rows: list[list[torch.Tensor]], gap: int = 2, column_labels: Sequence[str] = (),
              row_labels: Sequence[str] = ()) -> torch.Tensor:  # fmt: skip
    """Rows of equally sized (3, h, w) tiles -> one (3, H, W) image on white, rows left-aligned.

    ``column_labels`` are written in a band above the tiles, centred on their columns, and
    ``row_labels`` in a band left of them (an empty label leaves its place blank); the tiles sit
    below and right of the bands exactly as they would without them.
    """
    height, width = rows[0][0].shape[1:]
    columns = max(len(row) for row in rows)
    grid = torch.ones(3, len(rows) * (height + gap) + gap, columns * (width + gap) + gap)
    for r, row in enumerate(rows):
        for c, tile in enumerate(row):
            top, left = gap + r * (height + gap), gap + c * (width + gap)
            grid[:, top : top + height, left : left + width] = tile
    if not any(column_labels) and not any(row_labels):
        return grid
    return _with_labels(grid, (height, width), gap, column_labels, row_labels)


def _with_labels(grid: torch.Tensor, tile: tuple[int, int], gap: int, column_labels: Sequence[str],
                 row_labels: Sequence[str]) -> torch.Tensor:  # fmt: skip
    """``grid`` below a band of column labels and right of a band of row labels (PIL's default font)."""
    font = ImageFont.load_default()
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    texts = [text for text in (*column_labels, *row_labels) if text]
    widths = {text: measure.textbbox((0, 0), text, font=font)[2] for text in texts}
    _, line_top, _, line_bottom = measure.textbbox((0, 0), "".join(texts), font=font)  # one baseline for all
    band_top = line_bottom + 2 * LABEL_PADDING if any(column_labels) else 0
    band_left = max(widths[text] for text in row_labels if text) + 2 * LABEL_PADDING if any(row_labels) else 0
    canvas = Image.new("RGB", (band_left + grid.shape[2], band_top + grid.shape[1]), "white")
    draw = ImageDraw.Draw(canvas)

    def centred(text: str, x: float, y: float) -> None:
        draw.text((round(x - widths[text] / 2), round(y - (line_top + line_bottom) / 2)), text, fill=LABEL_COLOUR, font=font)

    height, width = tile
    for c, text in enumerate(column_labels):
        if text:
            centred(text, band_left + gap + c * (width + gap) + width / 2, band_top / 2)
    for r, text in enumerate(row_labels):
        if text:
            centred(text, band_left / 2, band_top + gap + r * (height + gap) + height / 2)
    labelled = torch.from_numpy(np.asarray(canvas, dtype=np.float32) / 255).permute(2, 0, 1).contiguous()
    labelled[:, band_top:, band_left:] = grid  # the tiles as they are, not through 8-bit
    return labelled


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
