"""Forget sets on disk: the marked outputs (image, latent, mask, provenance, content hash).

Layout under a store root (the pack uses ``<ComfyUI output>/unlearn/forget_sets``)::

    <set name>/manifest.json          {"version": 1, "targets": [...]}
    <set name>/<id>.png               the marked image (RGB)
    <set name>/<id>.latent.safetensors the sampler's latent, when given
    <set name>/<id>.mask.png          the undesired region, when given
    <set name>/<id>.cond.safetensors  the conditioning tensors that produced it, when given

``id`` is the first 16 hex digits of the sha256 of the image pixels, so marking the same image
twice is a no-op. Every file is written atomically and the manifest last, so a crash leaves
the set as it was. Set names are validated (:func:`unlearn_core.formats.files.safe_name`).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from ..errors import InputError
from ..formats.files import (
    atomic_path,
    atomic_write_bytes,
    atomic_write_text,
    safe_child,
    safe_name,
)
from .masks import checked_mask

__all__ = ["ForgetSetStore", "TargetRecord", "check_target", "image_to_png_bytes", "MAX_SIDE"]

MANIFEST = "manifest.json"
VERSION = 1
MAX_SIDE = 8192
_lock = threading.Lock()  # one writer at a time: nodes and web routes share a store


@dataclass
class TargetRecord:
    id: str
    image: str
    width: int
    height: int
    latent: str | None = None
    mask: str | None = None
    conditioning: str | None = None
    provenance: dict = field(default_factory=dict)
    created: float = 0.0


def _to_uint8(image) -> np.ndarray:
    """(H, W, 3) uint8 from a [0, 1] float tensor/array (H, W, C) or an 8-bit array."""
    array = image.detach().cpu().float().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if array.ndim != 3 or array.shape[2] not in (1, 3, 4):
        raise InputError(f"an image must be (height, width, channels), got shape {tuple(array.shape)}; connect a decoded image")
    if array.dtype != np.uint8:
        if not np.isfinite(array).all():
            raise InputError("the image holds NaN/inf values; regenerate it")
        array = (np.clip(array, 0.0, 1.0) * 255.0).round().astype(np.uint8)
    if array.shape[2] == 1:
        array = np.repeat(array, 3, axis=2)
    if array.shape[2] == 4:
        array = array[:, :, :3]
    if max(array.shape[:2]) > MAX_SIDE or min(array.shape[:2]) < 1:
        raise InputError(f"image size {array.shape[1]}x{array.shape[0]} is outside 1..{MAX_SIDE} pixels a side; scale it down")
    return np.ascontiguousarray(array)


def check_target(image, latent=None, mask=None) -> tuple[np.ndarray, torch.Tensor | None, torch.Tensor | None]:
    """Validate one output to mark; return (pixels (H, W, 3) uint8, latent (C, h, w), mask (H, W)).

    Raises :class:`InputError` saying what is wrong and what to change; writes nothing, so a
    caller marking several outputs can check all of them before storing any.
    """
    pixels = _to_uint8(image)
    height, width = pixels.shape[:2]
    if mask is not None:
        mask = checked_mask(torch.as_tensor(mask).cpu(), (height, width), f"the image ({height}, {width})")[0, 0]
    if latent is not None:
        latent = torch.as_tensor(latent).detach().float().cpu()
        if latent.dim() == 4 and len(latent) == 1:
            latent = latent[0]
        if latent.dim() != 3:
            raise InputError(
                f"the latent must be one (C, H, W) tensor, got shape {tuple(latent.shape)}; "
                "connect the sampler's LATENT output"
            )
        if not torch.isfinite(latent).all():
            raise InputError("the latent holds NaN/inf values; sample the image again (lower cfg or use float32)")
    return pixels, latent, mask


def image_to_png_bytes(image) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_to_uint8(image), "RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def _content_id(pixels: np.ndarray) -> str:
    digest = hashlib.sha256(f"{pixels.shape}".encode())
    digest.update(pixels.tobytes())
    return digest.hexdigest()[:16]


class ForgetSetStore:
    """Named forget sets under one root folder."""

    def __init__(self, root: str | Path):
        self.root = Path(root)

    def folder(self, name: str) -> Path:
        return safe_child(self.root, name, what="forget-set name")

    def names(self) -> list[str]:
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / MANIFEST).is_file())

    def records(self, name: str) -> list[TargetRecord]:
        """The targets of set ``name`` (an empty list for a set that does not exist yet)."""
        manifest = self.folder(name) / MANIFEST
        if not manifest.exists():
            return []
        try:
            data = json.loads(manifest.read_text("utf-8"))
            if not isinstance(data, dict) or data.get("version") != VERSION or not isinstance(data.get("targets"), list):
                raise ValueError("unknown version or no target list")
            return [TargetRecord(**entry) for entry in data["targets"]]
        except (OSError, ValueError, TypeError, KeyError) as error:
            raise InputError(
                f"the manifest of forget set {name!r} is damaged ({error}); delete {manifest} "
                "and mark the outputs again"
            ) from None

    def _write_manifest(self, name: str, records: list[TargetRecord]) -> None:
        payload = {"version": VERSION, "name": name, "targets": [asdict(r) for r in records]}
        atomic_write_text(self.folder(name) / MANIFEST, json.dumps(payload, indent=2, sort_keys=True))

    def add(
        self,
        name: str,
        image,
        latent: torch.Tensor | None = None,
        mask: torch.Tensor | None = None,
        provenance: dict | None = None,
        conditioning: dict[str, torch.Tensor] | None = None,
    ) -> tuple[TargetRecord, bool]:
        """Mark one output. Returns (record, added); added is False if it was already marked.

        Everything is validated before the first byte is written; if writing fails part-way,
        the files of this call are removed again and the manifest is unchanged.
        """
        name = safe_name(name, "forget-set name")
        pixels, latent, mask = check_target(image, latent, mask)
        height, width = pixels.shape[:2]
        target_id = _content_id(pixels)
        with _lock:
            records = self.records(name)
            for record in records:
                if record.id == target_id:
                    return record, False
            folder = self.folder(name)
            created = not folder.exists()
            record = TargetRecord(
                id=target_id, image=f"{target_id}.png", width=width, height=height,
                provenance=dict(provenance or {}), created=time.time(),
            )  # fmt: skip
            written: list[Path] = []
            try:
                folder.mkdir(parents=True, exist_ok=True)
                written.append(atomic_write_bytes(folder / record.image, image_to_png_bytes(pixels)))
                if latent is not None:
                    record.latent = f"{target_id}.latent.safetensors"
                    with atomic_path(folder / record.latent) as temporary:
                        save_file({"samples": latent.contiguous()}, str(temporary))
                    written.append(folder / record.latent)
                if mask is not None:
                    record.mask = f"{target_id}.mask.png"
                    mask_pixels = (mask.clamp(0, 1).numpy() * 255).round().astype(np.uint8)
                    buffer = io.BytesIO()
                    Image.fromarray(mask_pixels, "L").save(buffer, format="PNG")
                    written.append(atomic_write_bytes(folder / record.mask, buffer.getvalue()))
                if conditioning:
                    record.conditioning = f"{target_id}.cond.safetensors"
                    tensors = {k: v.detach().cpu().contiguous() for k, v in conditioning.items()}
                    with atomic_path(folder / record.conditioning) as temporary:
                        save_file(tensors, str(temporary))
                    written.append(folder / record.conditioning)
                self._write_manifest(name, [*records, record])
            except BaseException:
                for path in written:
                    path.unlink(missing_ok=True)
                if created:
                    with contextlib.suppress(OSError):
                        folder.rmdir()  # only if nothing else appeared in it meanwhile
                raise
        return record, True

    def remove(self, name: str, target_id: str) -> bool:
        with _lock:
            records = self.records(name)
            kept = [r for r in records if r.id != target_id]
            if len(kept) == len(records):
                return False
            self._write_manifest(name, kept)
        return True

    # --- reading ------------------------------------------------------------------------------

    def image_file(self, name: str, record: TargetRecord) -> Path:
        """The marked image of ``record``; refused if the manifest points outside the set's folder."""
        return self._file(name, record.image)

    def _file(self, name: str, filename: str) -> Path:
        path = safe_child(self.folder(name), filename, what="file name")
        if not path.is_file():
            raise InputError(f"forget set {name!r} lists {filename} but the file is missing; mark that output again")
        return path

    def load_image(self, name: str, record: TargetRecord) -> torch.Tensor:
        """(H, W, 3) float in [0, 1]."""
        with Image.open(self._file(name, record.image)) as image:
            return torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0)

    def load_mask(self, name: str, record: TargetRecord) -> torch.Tensor | None:
        if record.mask is None:
            return None
        with Image.open(self._file(name, record.mask)) as image:
            return torch.from_numpy(np.asarray(image.convert("L"), dtype=np.float32) / 255.0)

    def load_latent(self, name: str, record: TargetRecord) -> torch.Tensor | None:
        if record.latent is None:
            return None
        return load_file(str(self._file(name, record.latent)))["samples"]

    def load_conditioning(self, name: str, record: TargetRecord) -> dict[str, torch.Tensor] | None:
        if record.conditioning is None:
            return None
        return load_file(str(self._file(name, record.conditioning)))
