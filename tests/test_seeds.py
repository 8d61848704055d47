import pytest

from unlearn_core.data.seeds import MAX_REMEMBER, preserve_seeds, remember_seeds
from unlearn_core.errors import InputError


@pytest.mark.parametrize("seed", [0, 11, 2**64 - 5])
def test_remember_and_preserve_seeds_never_overlap_and_skip_the_target(seed):
    remember = remember_seeds(seed, MAX_REMEMBER)
    preserve = preserve_seeds(seed, 256)
    assert len(set(remember)) == MAX_REMEMBER and len(set(preserve)) == 256
    assert not set(remember) & set(preserve)
    assert seed not in remember and seed not in preserve
    assert all(0 <= s < 2**64 for s in remember + preserve)


def test_remember_count_is_bounded():
    with pytest.raises(InputError, match="remember count"):
        remember_seeds(0, MAX_REMEMBER + 1)
