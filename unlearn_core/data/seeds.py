"""The one seed rule for regenerating outputs around a target: remember seeds and preserve seeds.

For a target made from seed ``s``:

- remember seeds (training keeps these outputs): ``s + 1, s + 2, ..., s + n``, n <= MAX_REMEMBER;
- preserve seeds (held out, the preserve check judges integrity on them): ``s + MAX_REMEMBER + 1, ...``.

The two ranges never overlap, so integrity is never measured on an output training saw. Seeds
wrap at 2^64 as ComfyUI's seed widget does. A target whose seed was not recorded (an image
marked without its sampler, a provider's targets file) counts as seed :data:`UNRECORDED_SEED`.
"""

from __future__ import annotations

from ..errors import InputError

__all__ = ["MAX_REMEMBER", "UNRECORDED_SEED", "target_seed", "remember_seeds", "preserve_seeds"]

MAX_REMEMBER = 1000
UNRECORDED_SEED = 9_999  # its remember seeds are 10000, 10001, ...
_WRAP = 2**64


def target_seed(recorded) -> int:
    """The seed the rule starts from: the recorded one, else :data:`UNRECORDED_SEED`."""
    return UNRECORDED_SEED if recorded is None else int(recorded)


def remember_seeds(target_seed: int, count: int) -> list[int]:
    if not 0 <= count <= MAX_REMEMBER:
        raise InputError(f"remember count {count} must lie in [0, {MAX_REMEMBER}]")
    return [(int(target_seed) + 1 + i) % _WRAP for i in range(count)]


def preserve_seeds(target_seed: int, count: int) -> list[int]:
    return [(int(target_seed) + MAX_REMEMBER + 1 + i) % _WRAP for i in range(count)]
