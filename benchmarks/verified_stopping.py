"""Verified stopping on the embedded models: ours and SISS "+ stop" beside their fixed-step rows.

The fair protocol of ``effectiveness.py`` (its table targets, surrogates, remember set, 64
integrity seeds, robust forgetting by nearby noises and twice the sampler steps, training seeds 0
and 1), with every run given the forgetting check (:mod:`unlearn_core.stopping`): the target is
regenerated every ``check_every`` steps with the table's own detector and threshold, and training
stops once it is forgotten with the margin at two checks in a row; ``--steps`` is the maximum.

Rows (``ROWS``): ours with the remember loss on the data or on the base model's own prediction,
at a fixed rate or starting low and raised while the target is still produced, and SISS at its
main rows' scales with the same stop; beside them the fixed-step main rows of
``effectiveness_<model>.json`` (every method at its swept rate, 100 steps). Each row also records the steps it took, the step the target
was forgotten at, and the check's share of the training time (the stopping overhead).

Every finished run is one JSON line in ``benchmarks/results/verified_stopping/<model>.jsonl``
(effectiveness' record format); a rerun skips them. The report is
``benchmarks/results/verified_stopping.json``.

    python benchmarks/verified_stopping.py --models flags shapes --threads 1     # about an hour on 2 cores
    python benchmarks/verified_stopping.py --report                              # tables from the records
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import time
from pathlib import Path

import torch
from effectiveness import (
    DEFAULT_TARGETS,
    FORGET_THRESHOLD,
    RESULTS,
    SETTINGS,
    SETUPS,
    Bench,
    Setting,
    main_row,
    print_rows,
    targets_for,
    write_json,
)

from unlearn_core import UnlearnConfig
from unlearn_core.metrics import load_lpips

log = logging.getLogger("verified_stopping")

RECORDS = RESULTS / "verified_stopping"
TRAIN_SEEDS = (0, 1)


def _stop(name, objective="surrogate", **overrides):
    return Setting(name, "ours" if objective == "surrogate" else objective, objective, "edit" if objective == "surrogate" else "none",
                   tuple(sorted(overrides.items())))  # fmt: skip


#: row -> (setting, learning rate)
ROWS = {
    "ours_stop_data_3e-3": (_stop("ours + stop, remember on data", remember_target="data"), 3e-3),
    "ours_stop_base_1e-3": (_stop("ours + stop, remember on base", remember_target="base"), 1e-3),
    "ours_stop_base_3e-3": (_stop("ours + stop, remember on base", remember_target="base"), 3e-3),
    "ours_stop_base_raise_3e-4": (_stop("ours + stop + raise, remember on base", remember_target="base", rate_schedule="raise"), 3e-4),
    "ours_stop_base_raise_1e-3": (_stop("ours + stop + raise, remember on base", remember_target="base", rate_schedule="raise"), 1e-3),
    "ours_stop_base_rb16_1e-3": (_stop("ours + stop, remember on base, remember batch 16", remember_target="base",
                                       remember_batch_size=16), 1e-3),
    "ours_stop_base_rb16_raise_3e-4": (_stop("ours + stop + raise, remember on base, remember batch 16", remember_target="base",
                                             remember_batch_size=16, rate_schedule="raise"), 3e-4),
    "ours_stop_base_rb16_raise50_1e-3": (_stop("ours + stop + raise after 50, remember on base, remember batch 16",
                                               remember_target="base", remember_batch_size=16, rate_schedule="raise",
                                               raise_after=50), 1e-3),
    "ours_stop_base_rb16_g2_1e-3": (_stop("ours + stop, remember on base, remember batch 16, gamma 2", remember_target="base",
                                          remember_batch_size=16, gamma=2.0), 1e-3),
    "ours_stop_base_rb16_nearby4_1e-3": (_stop("ours + stop (4 nearby probes), remember on base, remember batch 16",
                                               remember_target="base", remember_batch_size=16, check_nearby=4), 1e-3),
    "ours_stop_base_rb16_g2_nearby4_1e-3": (_stop("ours + stop (4 nearby probes), remember on base, remember batch 16, gamma 2",
                                                  remember_target="base", remember_batch_size=16, gamma=2.0, check_nearby=4), 1e-3),
    "siss_0.1_stop": (_stop("SISS, scale 0.1, + stop", "siss", siss_scale=0.1), 1e-3),
    "siss_0.5_stop": (_stop("SISS, scale 0.5, + stop", "siss", siss_scale=0.5), 1e-2),
}


def row_runs(bench: Bench, name: str, targets, seeds, train: bool) -> list[dict] | None:
    setting, lr = ROWS[name]
    SETTINGS[name] = setting  # Bench.run looks settings up by name
    keys = [bench.key(setting, lr, t, s, bench.final_steps) for s in seeds for t in targets]
    if not train and not all(k in bench.records for k in keys):
        return None
    return [bench.run(name, lr, t, s, robust=True) for s in seeds for t in targets]


def overhead(runs: list[dict]) -> dict:
    """Steps taken, the step the target was forgotten at, and the check's share of training time."""
    ok = [r for r in runs if "diverged" not in r]
    shares = [r["check_seconds"] / r["train_seconds"] for r in ok if r.get("check_seconds") is not None and r.get("train_seconds")]
    forgotten_at = [r["forgotten_at"][0] for r in ok if r.get("forgotten_at") and r["forgotten_at"][0] is not None]
    return {"steps_taken_mean": statistics.fmean(r["steps_taken"] for r in ok) if ok else None,
            "forgotten_at_mean": statistics.fmean(forgotten_at) if forgotten_at else None,
            "check_share_of_training_mean": statistics.fmean(shares) if shares else None}  # fmt: skip


def fixed_rows(model_name: str) -> dict:
    """The fixed-step main rows these are compared with (each method at its swept rate, 100 steps):
    effectiveness_<model>.json's, as that script wrote them."""
    path = RESULTS / f"effectiveness_{model_name}.json"
    return json.loads(path.read_text())["main"] if path.is_file() else {}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["flags", "shapes"], choices=list(SETUPS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=200, help="the most steps a run may take")
    parser.add_argument("--report", action="store_true", help="only read the records and write the report")
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    base = UnlearnConfig(steps=args.steps, lora_rank=8, forget_batch_size=4, remember_batch_size=4, seed=0,
                         remember_target="data")  # its runs predate the base default: their keys hold "data"
    lpips_model = load_lpips()
    report = {"date": time.strftime("%Y-%m-%d"), "max_steps": args.steps, "config": base.to_dict(), "models": {}}
    for model_name in args.models:
        setup = SETUPS[model_name]()
        targets, _ = targets_for(setup, RESULTS / "effectiveness", DEFAULT_TARGETS[model_name])
        bench = Bench(setup, args.records, base, setup.steps_sample, lpips_model, verified=True)
        # the surrogate seeds effectiveness chose (read, never re-chosen)
        effectiveness_seeds = RESULTS / "effectiveness" / f"{model_name}_surrogate_seeds.json"
        if effectiveness_seeds.is_file():
            bench.edit_seeds = json.loads(effectiveness_seeds.read_text())
        rows = {}
        for name in args.rows:
            runs = row_runs(bench, name, targets, TRAIN_SEEDS, train=not args.report)
            if runs is None:
                continue
            rows[name] = {**main_row(ROWS[name][0].name, ROWS[name][1], runs), **overhead(runs)}
        fixed = fixed_rows(model_name)
        report["models"][model_name] = {"targets": targets, "threshold": FORGET_THRESHOLD[model_name], "rows": rows,
                                        "fixed_step_rows": fixed}  # fmt: skip
        print(f"\n### {model_name}: {len(targets)} targets, + stop (at most {args.steps} steps); fixed-step main rows below\n")
        print_rows([*rows.values(), *fixed.values()])
        print("\n| row | steps taken | forgotten at | check time / training time |\n|---|---|---|---|")
        for entry in rows.values():
            cells = [entry["steps_taken_mean"], entry["forgotten_at_mean"], entry["check_share_of_training_mean"]]
            print(f"| {entry['name']} @ {entry['learning_rate']:g} | " + " | ".join("n/a" if c is None else f"{c:.2f}" for c in cells) + " |")
    write_json(RESULTS / "verified_stopping.json", report)
    print(f"\nwrote {RESULTS / 'verified_stopping.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
