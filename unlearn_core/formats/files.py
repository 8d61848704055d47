"""Safe file handling: user-given names that cannot escape their folder, atomic writes, hashes."""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import tempfile
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError

__all__ = [
    "safe_name", "safe_child", "atomic_path", "atomic_write_bytes", "atomic_write_text", "tensor_hash", "file_sha256",
    "job_path", "read_safetensors", "safetensors_metadata",
]  # fmt: skip

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9 _.\-]{0,99}$")
_RESERVED = {"con", "prn", "aux", "nul", *(f"com{i}" for i in range(10)), *(f"lpt{i}" for i in range(10))}


def safe_name(name: str, what: str = "name") -> str:
    """Validate a user-given file or folder name; return it stripped.

    Allowed: letters, digits, space, '_', '-', '.', up to 100 characters, starting with a letter
    or digit, no '..'. Anything else (slashes, absolute paths, reserved device names, control
    or shell characters) is refused with a message that says what is allowed.
    """
    if not isinstance(name, str):
        raise InputError(f"the {what} must be text, got {type(name).__name__}")
    stripped = name.strip()
    stem = stripped.split(".")[0].lower()
    if not _NAME.match(stripped) or ".." in stripped or stem in _RESERVED or stripped.endswith("."):
        raise InputError(
            f"the {what} {name!r} is not allowed: use 1-100 letters, digits, spaces, '_', '-' or '.', "
            "starting with a letter or digit (no '..', slashes or reserved names)"
        )
    return stripped


def safe_child(folder: str | os.PathLike, name: str, suffix: str = "", what: str = "name") -> Path:
    """``folder/name+suffix`` for a validated name, guaranteed to stay inside ``folder``.

    ``name`` may contain '/'-separated subfolders, each validated (the stock LoRA loaders list
    files in subfolders too).
    """
    parts = [safe_name(part, what) for part in str(name).replace("\\", "/").split("/")] if name else []
    if not parts:
        raise InputError(f"the {what} is empty; give a file name")
    if suffix and parts[-1].lower().endswith(suffix.lower()):
        parts[-1] = parts[-1][: -len(suffix)]
    root = Path(folder).resolve()
    target = root.joinpath(*parts[:-1], parts[-1] + suffix).resolve()
    if root != target and root not in target.parents:
        raise InputError(f"the {what} {name!r} leaves its folder")
    return target


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success it replaces ``path`` in one rename.

    On any error the temporary file is removed and ``path`` is untouched, so a loader never
    sees a half-written file.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".part", dir=target.parent)
    os.close(handle)
    try:
        os.chmod(temporary, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual permissions
        yield Path(temporary)
        with open(temporary, "rb+") as stream:
            os.fsync(stream.fileno())
        os.replace(temporary, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
        raise


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with atomic_path(path) as temporary:
        temporary.write_bytes(data)
    return Path(path)


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def tensor_hash(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's dtype, shape and bytes (first 16 hex digits)."""
    tensor = tensor.detach().to("cpu").contiguous()
    digest = hashlib.sha256(f"{tensor.dtype}{tuple(tensor.shape)}".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()[:16]


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of a file's bytes (full hex), read in chunks so that model-sized files fit in memory."""
    digest = hashlib.sha256()
    with open(path, "rb") as stream:
        for chunk in iter(lambda: stream.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def sibling(path: Path, suffix: str) -> Path:
    """A file written beside a .safetensors result: its name without the extension, plus ``suffix``
    (``x.safetensors`` -> ``x.report.json``, ``x.merged.safetensors``)."""
    return path.with_name(path.name.removesuffix(".safetensors") + suffix)


def job_path(base_dir: Path, value, what: str) -> Path:
    """A path a job names (relative to the job file's folder), which must exist."""
    if not value:
        raise InputError(f"the job needs {what}")
    if not isinstance(value, str):
        raise InputError(f"{what} must be a path (text), got {type(value).__name__}")
    path = Path(value)
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    return path


@contextlib.contextmanager
def _safetensors(path: str | os.PathLike, what: str, fix: str):
    path = Path(path)
    if not path.is_file():
        raise InputError(f"{what} {str(path)!r} does not exist")
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except InputError:
        raise
    except Exception as error:  # safetensors raises several types for damaged files
        raise InputError(f"{what} {path.name!r} is not a readable safetensors file ({error}); {fix}") from None


def read_safetensors(path: str | os.PathLike, what: str,
                     fix: str = "save it again") -> tuple[dict[str, torch.Tensor], dict[str, str]]:  # fmt: skip
    """A safetensors file's tensors and metadata, or an InputError naming ``what`` was expected and
    ``fix``, what to do."""
    with _safetensors(path, what, fix) as handle:
        return {key: handle.get_tensor(key) for key in handle.keys()}, dict(handle.metadata() or {})


def safetensors_metadata(path: str | os.PathLike, what: str, fix: str = "save it again") -> dict[str, str]:
    """A safetensors file's metadata alone (no tensor is read)."""
    with _safetensors(path, what, fix) as handle:
        return dict(handle.metadata() or {})
