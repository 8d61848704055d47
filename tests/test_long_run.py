"""1,000 training steps through the real path: resident memory stays flat, no objects pile up.

The measurement is benchmarks/long_run.py's, run here in a process of its own: objects that
earlier tests left in this interpreter (a ComfyUI import, say) must not count as growth, so the
result does not depend on which tests ran before. The bounds are on the growth between step 100
(after warm-up) and step 1,000; a leak of one object or one small tensor per step would exceed
them several times over.
"""

import json
import os
import subprocess
import sys

from conftest import ROOT

STEPS = 1000
RSS_GROWTH_MIB = 16  # allocator noise is a few MiB; a leaked (1, 4, 4, 4) activation graph per step is far more
OBJECTS_PER_TYPE = 100  # one leaked object per step would be 900
OBJECTS_TOTAL = 400


def test_a_thousand_steps_keep_memory_and_objects_flat(tmp_path):
    out = tmp_path / "long_run.json"
    # one thread: faster than two for a model this small, and the suite shares the machine
    # the repository on the child's path too, for a Python that has not installed the project (ComfyUI's)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "long_run.py"), "--steps", str(STEPS), "--threads", "1",
                           "--json", str(out)], capture_output=True, text=True, timeout=600, env=env)  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(out.read_text())
    rss, objects = result["rss_mib"], result["objects"]
    summary = f"RSS MiB {rss}, objects {objects}, grew {result['object_growth']}"
    assert result["finite"], summary
    assert rss[str(STEPS)] - rss["100"] < RSS_GROWTH_MIB, summary
    assert all(count < OBJECTS_PER_TYPE for count in result["object_growth"].values()), summary
    assert objects[str(STEPS)] - objects["100"] < OBJECTS_TOTAL, summary
