"""1,000 training steps through the real path: resident memory stays flat, no objects pile up.

The measurement is benchmarks/long_run.py's (run it to print the numbers); this test bounds
the growth between step 100 (after warm-up) and step 1,000. A leak of one object or one small
tensor per step would exceed the bounds several times over.
"""

import pytest
import torch
from conftest import load_benchmark

STEPS = 1000
RSS_GROWTH_MIB = 16  # allocator noise is a few MiB; a leaked (1, 4, 4, 4) activation graph per step is far more
OBJECTS_PER_TYPE = 100  # one leaked object per step would be 900
OBJECTS_TOTAL = 400


@pytest.fixture
def long_run():
    return load_benchmark("long_run")


def test_a_thousand_steps_keep_memory_and_objects_flat(long_run):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one core: faster than two for a model this small, and the suite shares the machine
    try:
        result = long_run.measure(STEPS)
    finally:
        torch.set_num_threads(threads)
    rss = result["rss_mib"]
    summary = f"RSS MiB {rss}, objects {result['objects']}, grew {result['object_growth']}"
    assert result["finite"], summary
    assert rss[STEPS] - rss[100] < RSS_GROWTH_MIB, summary
    assert all(count < OBJECTS_PER_TYPE for count in result["object_growth"].values()), summary
    assert result["objects"][STEPS] - result["objects"][100] < OBJECTS_TOTAL, summary
