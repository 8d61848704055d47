"""The benchmark scripts still run (a few steps each); their numbers are printed, never asserted."""

import json
import math
import os

import pytest
from conftest import load_benchmark

from unlearn_core import UnlearnConfig
from unlearn_core.demo.run import DemoSettings


@pytest.fixture
def speed():
    return load_benchmark("speed")


def test_speed_benchmark_writes_one_row_per_model(speed, tmp_path, capsys):
    out = tmp_path / "speed.json"
    assert speed.main(["--models", "tiny-sd3", "--steps", "1", "--repeats", "2", "--skip-demo", "--json", str(out)]) == 0
    result = json.loads(out.read_text())
    (row,) = result["rows"]
    assert row["model"] == "tiny-sd3" and len(row["ratios"]) == 2
    assert all(math.isfinite(row[key]) and row[key] > 0 for key in ("plain_step_s", "unlearn_step_s", "ratio", "two_pass_ratio"))
    assert row["plain_saved_mb"] > 0 and result["demo_training"] is None
    assert "| tiny-sd3 | 8 | 8 |" in capsys.readouterr().out


def test_demo_training_is_timed_with_the_demo_settings(speed):
    config = UnlearnConfig(steps=2, learning_rate=1e-3, lora_rank=2, forget_batch_size=2, remember_batch_size=3)
    timed = speed.demo_training_seconds(DemoSettings(config=config))
    assert (timed["steps"], timed["forget_batch"], timed["remember_batch"], timed["rank"]) == (2, 2, 3, 2)
    assert timed["seconds"] > 0


def test_weight_profile_writes_both_halves_per_noise_level(tmp_path):
    load_benchmark("effectiveness")  # weight_profile imports it, as it does beside it in benchmarks/
    weight_profile = load_benchmark("weight_profile")
    out = tmp_path / "profile.json"
    assert weight_profile.main(["--models", "shapes", "--draws", "2", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["models"]["shapes"]["rows"]
    assert set(rows) == {"x0/full", "x0/complement", "native/full", "native/complement"}
    for row in rows.values():
        assert len(row["forget_grad_norm"]) == len(weight_profile.T_GRID) and 0 <= row["forget_share_below_0.5"] <= 1


def test_effectiveness_rule_chooses_sweep_rates_and_defaults_as_written():
    bench = load_benchmark("effectiveness")
    # point 3: among rates that forget every sweep target, the best SSIM; else the lowest similarity
    trials = {1e-3: {"forgets_all": False, "ssim": 0.99, "similarity": 0.95},
              3e-3: {"forgets_all": True, "ssim": 0.80, "similarity": 0.5},
              1e-2: {"forgets_all": True, "ssim": 0.70, "similarity": 0.2}}  # fmt: skip
    assert bench.best(trials) == 3e-3
    assert bench.best({k: {**t, "forgets_all": False} for k, t in trials.items()}) == 1e-2
    assert bench.best({1e-3: {"diverged": True}}) is None

    # point 5: forget on both models first, then the smallest shortfall on the worse model
    def table(per_name):
        return {"sweeps": {n: {"learning_rate": lr, "complete": True,
                               "trials": {f"{lr:g}": {"forgets_all": f, "ssim": s, "similarity": 0.1}}}
                           for n, (lr, f, s) in per_name.items()}}  # fmt: skip

    names = list(bench.OURS_CANDIDATES)[:3]
    tables = {
        "flags": table({names[0]: (1e-3, True, 0.95), names[1]: (3e-3, True, 0.90), names[2]: (1e-3, True, 0.99)}),
        "shapes": table({names[0]: (1e-3, True, 0.60), names[1]: (1e-3, True, 0.70), names[2]: (1e-2, False, 0.90)}),
    }
    defaults = bench.choose_defaults(tables)
    assert names[2] not in defaults["candidates"] or "shortfall" not in defaults["candidates"][names[2]]
    # names[0] falls 0.10 short on shapes; names[1] 0.05 short on flags: the smaller worst case wins
    assert defaults["chosen"] == names[1]
    assert defaults["learning_rate"] == 3e-3
    tables["shapes"]["sweeps"][names[1]]["complete"] = False  # a sweep still running chooses nothing
    assert bench.choose_defaults(tables)["chosen"] == names[0]


def test_gpu_size_benchmark_runs_at_the_tiny_size_on_the_cpu(speed, tmp_path, capsys):
    """The GPU benchmark's smoke run: every trainer and checkpointing setting gives a row."""
    gpu_size = load_benchmark("gpu_size")  # imports speed, as it does beside it in benchmarks/
    out = tmp_path / "gpu_size.json"
    assert gpu_size.main(["--sizes", "tiny", "--device", "cpu", "--batch", "2", "--steps", "1", "--json", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    trainers = ["ours (diffusers)", "plain peft LoRA"]
    if os.environ.get("COMFYUI_PATH"):  # then the node and the stock TrainLoraNode run inside ComfyUI too
        trainers += ["ComfyUI: Instance Unlearn LoRA", "ComfyUI: TrainLoraNode"]
    assert {(r["trainer"], r["checkpointing"]) for r in rows} == {  # ComfyUI's run each trainer twice, interleaved
        (trainer, checkpointing) for trainer in trainers for checkpointing in (False, True)
    }, rows
    assert all(r["batch"] == 2 and math.isfinite(r["seconds_per_step"]) and r["peak_mb"] is None for r in rows)
    assert "| tiny | ours (diffusers) | on | 2 |" in capsys.readouterr().out
