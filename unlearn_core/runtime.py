"""Process-wide torch settings that every run shares, so that the CLI and queue workers agree bit for bit."""

from __future__ import annotations

import torch

__all__ = ["configure_torch"]


def configure_torch(threads: int) -> None:
    """CPU threads, and denormal floats flushed to zero (which changes results, so everyone sets it)."""
    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)  # tiny LoRA values are denormal floats that slow CPU kernels many-fold
