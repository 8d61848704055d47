"""Full fine-tuning results (``adapter: "full"``): every weight of the trained model in one file.

The file is a safetensors file keyed exactly like the model folder's own
``diffusion_pytorch_model.safetensors`` (diffusers names, the model's dtype), so it is a drop-in
replacement for that file, and carries the same reproduction metadata as a LoRA plus
``unlearn.adapter = "full"``. It holds full weights, not a delta: loading it needs no base
weights, only the base folder's ``config.json``::

    model = UNet2DModel.from_pretrained("base/unet")
    model.load_state_dict(safetensors.torch.load_file("forget.safetensors"))

or ``unlearn apply --model base/unet --result forget.safetensors --out unlearned/unet`` (see
:mod:`unlearn_core.formats.apply`). Bytes are deterministic (sorted keys and metadata) and the file is
written atomically, one tensor at a time, so a large model is never held twice in memory.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import InputError
from .files import atomic_path, read_safetensors, safetensors_metadata
from .lora import safetensors_header, tensor_bytes

__all__ = ["FULL_WEIGHTS", "FullWeights", "save_full_weights", "load_full_weights", "is_full_weights"]

#: the metadata value that marks a full-weights file
FULL_WEIGHTS = "full"


class FullWeights:
    """The tensors of a full-weights file (diffusers names) and its metadata."""

    def __init__(self, tensors: dict[str, torch.Tensor], metadata: dict[str, str]):
        self.tensors = tensors
        self.metadata = metadata


def save_full_weights(path: str | Path, model: torch.nn.Module, metadata: dict | None = None) -> Path:
    """Write every tensor of ``model.state_dict()`` (on the CPU) with metadata, atomically."""
    state = {key: value.detach() for key, value in model.state_dict().items()}
    if not state:
        raise InputError("the fine-tuned model holds no weights; nothing to save")
    merged = {**(metadata or {}), "unlearn.adapter": FULL_WEIGHTS}
    text = {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True) for key, value in merged.items()}
    header, ordered = safetensors_header(state, text)
    with atomic_path(path) as temporary, open(temporary, "wb") as stream:
        stream.write(header)
        for _, tensor in ordered:
            stream.write(tensor_bytes(tensor))
    return Path(path)


def is_full_weights(path: str | Path) -> bool:
    """Whether a safetensors file is a full-weights result (by its metadata)."""
    return safetensors_metadata(path, "result file").get("unlearn.adapter") == FULL_WEIGHTS


def load_full_weights(path: str | Path) -> FullWeights:
    path = Path(path)
    tensors, metadata = read_safetensors(path, "weights file")
    if metadata.get("unlearn.adapter") != FULL_WEIGHTS:
        raise InputError(f"{path.name} is not a full-weights result (no unlearn.adapter = 'full' in its metadata)")
    return FullWeights(tensors, metadata)
