"""A long unlearning run on a tiny model: resident memory and live Python objects along the way.

Trains 1,000 steps (the default) through the real path (``unlearn_diffusers``: peft LoRA
attached to a diffusers SD3 transformer, one-pass split gradients, surgery, AdamW) and records
the resident set size (from /proc/self/statm, else the peak from ``resource``) and the count of
gc-tracked objects by type before the first step, at step 100 and at the last step. A leak of
one object or one activation per step shows up as steady growth between step 100 and the end.
The result is written as JSON (``--json``, default ``benchmarks/results/long_run.json``).
``tests/test_long_run.py`` runs this script in a process of its own (so what other tests left
in the interpreter cannot count as growth) and bounds the growth.

    python benchmarks/long_run.py                 # 1,000 steps, about 20-30 s on one core
    python benchmarks/long_run.py --steps 5000 --json out/long_run_5000.json
"""

from __future__ import annotations

import argparse
import collections
import gc
import json
import os
import resource
import sys
import time
from pathlib import Path

import torch

from unlearn_core import ForgetTargets, RectifiedFlow, RememberSet, UnlearnConfig, UnlearnData
from unlearn_core.backends.diffusers_backend import unlearn_diffusers
from unlearn_core.formats.files import atomic_write_text

MIB = 1024 * 1024


def resident_bytes() -> int:
    """Current resident set size (Linux), else the peak (other systems)."""
    try:
        with open("/proc/self/statm") as statm:
            return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


def object_counts() -> collections.Counter:
    gc.collect()
    return collections.Counter(type(o).__name__ for o in gc.get_objects())


def tiny_setup(seed: int = 0):
    """A one-block SD3 transformer (4x4 latents, 4 channels) and a small forget/remember set."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    model = SD3Transformer2DModel(
        sample_size=4, patch_size=2, in_channels=4, out_channels=4, num_layers=1, attention_head_dim=8,
        num_attention_heads=1, joint_attention_dim=16, caption_projection_dim=8, pooled_projection_dim=8,
        pos_embed_max_size=4,
    ).eval()  # fmt: skip
    generator = torch.Generator().manual_seed(seed + 1)

    def cond(n):
        return {"encoder_hidden_states": torch.randn(n, 3, 16, generator=generator),
                "pooled_projections": torch.randn(n, 8, generator=generator)}  # fmt: skip

    targets = torch.rand(1, 4, 4, 4, generator=generator) * 2 - 1
    surrogates = (targets + 0.5 * torch.randn(targets.shape, generator=generator)).clamp(-1, 1)
    remember = torch.rand(4, 4, 4, 4, generator=generator) * 2 - 1
    data = UnlearnData(ForgetTargets(targets, surrogates, cond(1)), RememberSet(remember, cond(4)))
    return model, data


def measure(steps: int = 1000, early: int = 100) -> dict:
    """Train ``steps`` steps; RSS and object counts before step 1, at ``early`` and at ``steps``."""
    model, data = tiny_setup()
    config = UnlearnConfig(steps=steps, learning_rate=1e-4, lora_rank=2, forget_batch_size=1, remember_batch_size=1)
    points: dict[int, dict] = {0: {"rss": resident_bytes()}}
    counts: dict[int, collections.Counter] = {}

    def record(step, total, metrics):
        if step in (early, total):
            counts[step] = object_counts()
            points[step] = {"rss": resident_bytes(), "forget_loss": metrics["forget_loss"]}

    outcome = unlearn_diffusers(model, RectifiedFlow(), data, config, callback=record)
    growth = counts[steps] - counts[early]  # only the types that grew
    return {
        "steps": steps,
        "seconds": outcome.training.seconds,
        "rss_mib": {step: round(point["rss"] / MIB, 1) for step, point in points.items()},
        "objects": {step: sum(count.values()) for step, count in counts.items()},
        "object_growth": dict(growth.most_common(10)),
        "finite": all(torch.isfinite(layer.up).all() for layer in outcome.lora.layers.values()),
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", type=Path, default=Path(__file__).resolve().parent / "results" / "long_run.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    result = measure(args.steps)
    rss = result["rss_mib"]
    print(f"{result['steps']} steps in {result['seconds']:.1f} s")
    print(f"resident memory: step 0 {rss[0]} MiB, step 100 {rss[100]} MiB, step {args.steps} {rss[args.steps]} MiB")
    print(f"gc-tracked objects: step 100 {result['objects'][100]}, step {args.steps} {result['objects'][args.steps]}")
    print(f"types that grew between step 100 and {args.steps}: {json.dumps(result['object_growth'])}")
    result = {"date": time.strftime("%Y-%m-%d"), "threads": args.threads, **result}
    args.json.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.json, json.dumps(result, indent=2))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
