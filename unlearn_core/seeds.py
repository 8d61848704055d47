"""The one seed rule for regenerating outputs around a target: remember seeds and preserve seeds.

For a target made from seed ``s``:

- remember seeds (training keeps these outputs): ``s + 1, s + 2, ..., s + n``, n <= MAX_REMEMBER;
- preserve seeds (held out, the preserve check judges integrity on them): ``s + MAX_REMEMBER + 1, ...``.

The two ranges never overlap, so integrity is never measured on an output training saw. Seeds
wrap at 2^64 as ComfyUI's seed widget does.
"""

from __future__ import annotations

from .errors import InputError

__all__ = ["MAX_REMEMBER", "remember_seeds", "preserve_seeds"]

MAX_REMEMBER = 1000
_WRAP = 2**64


def remember_seeds(target_seed: int, count: int) -> list[int]:
    if not 0 <= count <= MAX_REMEMBER:
        raise InputError(f"remember count {count} must lie in [0, {MAX_REMEMBER}]")
    return [(int(target_seed) + 1 + i) % _WRAP for i in range(count)]


def preserve_seeds(target_seed: int, count: int) -> list[int]:
    return [(int(target_seed) + MAX_REMEMBER + 1 + i) % _WRAP for i in range(count)]
