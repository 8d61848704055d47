"""How often the benchmark's copy detector calls another output of the same prompt a copy of the target.

Robust forgetting (``effectiveness.py``) asks every nearby-noise probe of a forgotten target to
score below the table's threshold. That only means "the target did not come back" if the
detector separates the target from the model's *other* outputs of the same class: where many
different seeds already score above the threshold against the target, a probe above it may be
one of those siblings rather than the target. This script measures it on each model's table
targets: the base model's outputs of 64 other seeds of the target's class (seeds 90,000 +,
disjoint from the remember, integrity and probe seeds), their copy similarity to the target in
the table's detector, and the share at or above the table's threshold.

    python benchmarks/detector_siblings.py --models flags shapes vshapes lshapes --threads 1   # minutes

Writes ``benchmarks/results/detector_siblings.json``.
"""

from __future__ import annotations

import argparse
import logging

import torch
from effectiveness import (
    DEFAULT_TARGETS,
    FORGET_THRESHOLD,
    RESULTS,
    SETUPS,
    similarity_to,
    targets_for,
    write_json,
)

SIBLINGS = 64
SIBLING_SEED = 90_000


def siblings(setup, targets: list[tuple[int, int]], threshold: float) -> dict:
    """Per target: the copy similarity of SIBLINGS other same-class outputs to it, summarised."""
    out = {}
    for label, seed in targets:
        target = setup.generate([(label, seed)])
        others = setup.generate([(label, SIBLING_SEED + s) for s in range(SIBLINGS)])
        scores = torch.tensor([similarity_to(setup, others[i : i + 1], target) for i in range(len(others))])
        out[f"{label},{seed}"] = {
            "at_or_above_threshold": float((scores >= threshold).float().mean()),
            "q90": float(scores.quantile(0.9)),
            "max": float(scores.max()),
            "median": float(scores.median()),
        }
        logging.info("%s target %s: %s", setup.name, (label, seed), {k: round(v, 3) for k, v in out[f"{label},{seed}"].items()})
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["flags", "shapes", "vshapes", "lshapes"], choices=list(SETUPS))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    report = {"siblings": SIBLINGS, "sibling_seeds": f"{SIBLING_SEED} + 0..{SIBLINGS - 1}", "models": {}}
    for name in args.models:
        setup = SETUPS[name]()
        targets, _ = targets_for(setup, None, DEFAULT_TARGETS[name])
        threshold = FORGET_THRESHOLD[name]
        report["models"][name] = {"threshold": threshold, "targets": siblings(setup, targets, threshold)}
    write_json(RESULTS / "detector_siblings.json", report)
    for name, model in report["models"].items():
        print(f"\n{name} (threshold {model['threshold']:g}): share of {SIBLINGS} same-class siblings the detector calls a copy")
        for target, row in model["targets"].items():
            print(f"  target {target}: {row['at_or_above_threshold']:.0%} (median {row['median']:.3f}, 90th percentile {row['q90']:.3f}, "
                  f"max {row['max']:.3f})")


if __name__ == "__main__":
    main()
