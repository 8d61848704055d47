"""Verified stopping on the embedded models: ours and SISS "+ stop" beside their fixed-step rows.

The fair protocol of ``effectiveness.py`` (its table targets, surrogates, remember set, 64
integrity seeds, robust forgetting by nearby noises and twice the sampler steps, training seeds 0
and 1), with every run given the forgetting check (:mod:`unlearn_core.method.stopping`): the target is
regenerated every ``check_every`` steps with the table's own detector and threshold, and training
stops once it is forgotten with the margin at two checks in a row; ``--steps`` is the maximum.

Rows (``ROWS``): ours with the remember loss on the data or on the base model's own prediction,
at a fixed rate or starting low and raised while the target is still produced, with or without
the repair between the forgotten check and the confirming one, and SISS, NegGrad and EraseDiff
at their main rows' settings and swept rates with the same stop; beside them the fixed-step main
rows of ``effectiveness_<model>.json`` (every method at its swept rate, 100 steps). Each row also
records the steps it took, the step the target was forgotten at, and the check's share of the
training time (the stopping overhead). With ``--cond-probes`` the robustness probes also perturb
the conditioning embedding (models whose conditioning is one: flags); runs recorded without that
probe are rerun. ``--only-targets`` trains some table targets only (a screening): a row is
reported once all its runs are recorded.

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
from unlearn_core.verify.metrics import load_lpips

log = logging.getLogger("verified_stopping")

RECORDS = RESULTS / "verified_stopping"
TRAIN_SEEDS = (0, 1)


def _stop(name, objective="surrogate", **overrides):
    # every row but those that say otherwise ran when two checks in a row stopped training (the default then)
    overrides.setdefault("check_confirmations", 2)
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
    "ours_stop_base_rb16_spread5_1e-3": (_stop("ours + stop, remember on base, remember batch 16, own noise spread 0.5",
                                               remember_target="base", remember_batch_size=16, own_noise_spread=0.5), 1e-3),
    "ours_stop_base_rb16_g2_spread5_1e-3": (_stop("ours + stop, remember on base, remember batch 16, gamma 2, own noise spread 0.5",
                                                  remember_target="base", remember_batch_size=16, gamma=2.0, own_noise_spread=0.5), 1e-3),
    "ours_stop_base_rb16_repair_1e-3": (_stop("ours + stop + repair, remember on base, remember batch 16", remember_target="base",
                                              remember_batch_size=16, repair_when_forgotten=True), 1e-3),
    "neggrad_stop_3e-4": (_stop("NegGrad + stop", "neggrad"), 3e-4),
    "neggrad_stop_1e-3": (_stop("NegGrad + stop", "neggrad"), 1e-3),
    "neggrad_stop_3e-3": (_stop("NegGrad + stop", "neggrad"), 3e-3),
    "erasediff_stop_1e-3": (_stop("EraseDiff, eta 1, + stop", "erasediff", erasediff_eta=1.0), 1e-3),
    "erasediff_stop_3e-3": (_stop("EraseDiff, eta 1, + stop", "erasediff", erasediff_eta=1.0), 3e-3),
    "erasediff_eta0.1_stop_1e-3": (_stop("EraseDiff, eta 0.1, + stop", "erasediff", erasediff_eta=0.1), 1e-3),
    "ours_stop_base_rb16_g2_repair_1e-3": (_stop("ours + stop + repair, remember on base, remember batch 16, gamma 2",
                                                 remember_target="base", remember_batch_size=16, gamma=2.0,
                                                 repair_when_forgotten=True), 1e-3),
    "ours_stop_base_rb16_x0_repair_1e-3": (_stop("ours + stop + repair, remember on base, remember batch 16, forget in x0",
                                                 remember_target="base", remember_batch_size=16, forget_space="x0",
                                                 repair_when_forgotten=True), 1e-3),
    "ours_stop_base_rb16_repair_nearby4_1e-3": (_stop("ours + stop (4 nearby probes) + repair, remember on base, remember batch 16",
                                                      remember_target="base", remember_batch_size=16, check_nearby=4,
                                                      repair_when_forgotten=True), 1e-3),
    "ours_stop_base_rb16_repair_margin15_1e-3": (_stop("ours + stop (margin 0.15) + repair, remember on base, remember batch 16",
                                                       remember_target="base", remember_batch_size=16, check_margin=0.15,
                                                       repair_when_forgotten=True), 1e-3),
    "ours_stop_base_rb32_repair_1e-3": (_stop("ours + stop + repair, remember on base, remember batch 32", remember_target="base",
                                              remember_batch_size=32, repair_when_forgotten=True), 1e-3),
    "ours_stop_base_rb16_repair_c3_1e-3": (_stop("ours + stop after 3 checks + repair, remember on base, remember batch 16",
                                                 remember_target="base", remember_batch_size=16, check_confirmations=3,
                                                 repair_when_forgotten=True), 1e-3),
    "siss_0.1_stop": (_stop("SISS, scale 0.1, + stop", "siss", siss_scale=0.1), 1e-3),
    "siss_0.5_stop": (_stop("SISS, scale 0.5, + stop", "siss", siss_scale=0.5), 1e-2),
    "siss_0.1_stop_c3": (_stop("SISS, scale 0.1, + stop after 3 checks", "siss", siss_scale=0.1, check_confirmations=3), 1e-3),
}


#: ours' rows the defaults are chosen from: each a whole setting of the verified method at its rate
CANDIDATES = ("ours_stop_base_rb16_1e-3", "ours_stop_base_rb16_repair_1e-3", "ours_stop_base_rb16_g2_1e-3",
              "ours_stop_base_rb16_g2_repair_1e-3", "ours_stop_base_rb32_repair_1e-3", "ours_stop_base_rb16_repair_c3_1e-3")  # fmt: skip
#: robust forgetting is judged to the benchmark's resolution: one run in each model's 8 to 12, where
#: a single run's nearby probe lands either side of the threshold (0.62 against 0.6) from one
#: training seed to the next
ROBUST_RESOLUTION = 1


def choose_default(models: dict) -> dict:
    """The defaults' rule over the candidates that have rows on every model: (1) every run forgets
    its target, on every model; (2) on every model, at most ROBUST_RESOLUTION fewer runs robustly
    forgotten than the best candidate there; (3) of those, the smallest SSIM shortfall to the best
    of them on its worst model (what holds on every model over what wins one)."""
    rows = {n: {m: v["rows"][n]["summary"] for m, v in models.items()} for n in CANDIDATES
            if all(n in v["rows"] for v in models.values())}  # fmt: skip

    def robust_runs(summary):
        return round((summary.get("robust_forgotten_fraction") or 0) * summary["runs"])

    forgetting = {n: r for n, r in rows.items() if all(s.get("forgotten_fraction") == 1 for s in r.values())}
    best_robust = {m: max((robust_runs(r[m]) for r in forgetting.values()), default=0) for m in models}
    robust = {n: r for n, r in forgetting.items() if all(robust_runs(r[m]) >= best_robust[m] - ROBUST_RESOLUTION for m in models)}
    best_ssim = {m: max((r[m]["ssim"]["mean"] for r in robust.values()), default=None) for m in models}
    shortfall = {n: max(best_ssim[m] - r[m]["ssim"]["mean"] for m in models) for n, r in robust.items()}
    chosen = min(shortfall, key=shortfall.get) if shortfall else None
    return {"rule": "verified_stopping.choose_default", "models": list(models), "candidates": list(rows),
            "forget_every_target": list(forgetting), "robust_within_resolution": list(robust),
            "robust_runs": {n: {m: robust_runs(s) for m, s in r.items()} for n, r in rows.items()},
            "ssim_shortfall": shortfall, "chosen": chosen}  # fmt: skip


def row_runs(bench: Bench, name: str, targets, seeds, train: bool, only: list[int] | None = None) -> list[dict] | None:
    """A row's runs, or None when some are not recorded yet. ``only`` trains just those targets
    (by index; a screening) and reports the row only once every target has its runs."""
    setting, lr = ROWS[name]
    SETTINGS[name] = setting  # Bench.run looks settings up by name
    if train:
        for s in seeds:
            for i, t in enumerate(targets):
                if only is None or i in only:
                    bench.run(name, lr, t, s, robust=True)
    keys = [bench.key(setting, lr, t, s, bench.final_steps) for s in seeds for t in targets]
    if not all(k in bench.records for k in keys):
        return None
    return [bench.records[k] for k in keys]


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


#: the README's table: per model, its rows (a ROWS key, or ("fixed", a main row of
#: effectiveness_<model>.json)) with their labels, in order
README_ROWS = (
    ("ours_stop_base_rb16_repair_1e-3", "ours + stop + repair"),
    ("ours_stop_base_rb16_repair_c3_1e-3", "ours + stop after 3 checks + repair"),
    ("ours_stop_base_rb32_repair_1e-3", "ours + stop + repair, 32 remember samples a step"),
    ("ours_stop_base_rb16_1e-3", "ours + stop, no repair (the previous defaults)"),
    ("ours_stop_base_rb16_g2_1e-3", "ours + stop, no repair, γ = 2"),
    ("ours_stop_base_rb16_g2_repair_1e-3", "ours + stop + repair, γ = 2"),
    ("ours_stop_data_3e-3", "ours + stop, remember on data (4 a step)"),
    ("siss_0.1_stop", "SISS 0.1 + stop"),
    ("siss_0.1_stop_c3", "SISS 0.1 + stop after 3 checks"),
    ("siss_0.5_stop", "SISS 0.5 + stop"),
    ("neggrad_stop_3e-4", "NegGrad + stop"),
    ("neggrad_stop_1e-3", "NegGrad + stop"),
    ("neggrad_stop_3e-3", "NegGrad + stop"),
    ("erasediff_stop_3e-3", "EraseDiff + stop"),
    ("erasediff_stop_1e-3", "EraseDiff + stop"),
    ("erasediff_eta0.1_stop_1e-3", "EraseDiff η 0.1 + stop"),
    (("fixed", "siss_0.1"), "SISS 0.1 (fixed, its best swept)"),
    (("fixed", "siss_0.5"), "SISS 0.5 (fixed, its best swept)"),
    (("fixed", "neggrad"), "NegGrad (fixed, its swept rate)"),
    (("fixed", "erasediff"), "EraseDiff η 1 (fixed, its swept rate)"),
    (("fixed", "erasediff_eta_0.1"), "EraseDiff η 0.1 (fixed, its swept rate)"),
    (("fixed", "ours"), "ours, earlier options (fixed, its swept rate)"),
)


def _mean_spread(stat, digits: int) -> str:
    return "n/a" if stat is None else f"{stat['mean']:.{digits}f} ± {stat['spread']:.{digits}f}"


def _rate(lr: float) -> str:
    mantissa, exponent = f"{lr:.0e}".split("e")
    return f"{mantissa}e{int(exponent)}"


def print_readme_table(report: dict) -> None:
    """The README's table, from the report alone."""
    print("\n| model | row | lr | forgotten | robustly | perturbed prompt | SSIM | PSNR dB | Fréchet | steps taken | "
          "check time / training |\n|---|---|---|---|---|---|---|---|---|---|---|")  # fmt: skip
    for model_name, model in report["models"].items():
        for key, label in README_ROWS:
            entry = model["fixed_step_rows"].get(key[1]) if isinstance(key, tuple) else model["rows"].get(key)
            if entry is None or "ssim" not in entry["summary"]:
                continue
            s = entry["summary"]
            if key == report["defaults"]["chosen"]:
                label = f"**{label} (the defaults)**"
            robust = "n/a" if s["robust_forgotten_fraction"] is None else f"{s['robust_forgotten_fraction']:.0%}"
            cond = "n/a" if s.get("cond_robust_forgotten_fraction") is None else f"{s['cond_robust_forgotten_fraction']:.0%}"
            steps = "100" if isinstance(key, tuple) else f"{entry['steps_taken_mean']:.0f}"
            share = "" if isinstance(key, tuple) else f"{entry['check_share_of_training_mean']:.2f}"
            print(f"| {model_name} | {label} | {_rate(entry['learning_rate'])} | {s['forgotten_fraction']:.0%} | {robust} | {cond} | "
                  f"{_mean_spread(s['ssim'], 3)} | {_mean_spread(s['psnr'], 2)} | {_mean_spread(s['frechet'], 2)} | {steps} | "
                  f"{share} |")  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["flags", "shapes"], choices=list(SETUPS))
    parser.add_argument("--rows", nargs="+", default=list(ROWS), choices=list(ROWS))
    parser.add_argument("--steps", type=int, default=200, help="the most steps a run may take")
    parser.add_argument("--only-targets", type=int, nargs="+", help="train only these table targets (indices; a screening)")
    parser.add_argument("--cond-probes", action="store_true",
                        help="also probe perturbed conditioning (reruns the runs recorded without it)")
    parser.add_argument("--report", action="store_true", help="only read the records and write the report")
    parser.add_argument("--records", type=Path, default=RECORDS)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    base = UnlearnConfig(steps=args.steps, lora_rank=8, forget_batch_size=4, remember_batch_size=4, seed=0,
                         remember_target="data", repair_when_forgotten=False)  # its runs predate both defaults
    lpips_model = load_lpips()
    path = RESULTS / "verified_stopping.json"
    earlier = json.loads(path.read_text())["models"] if path.is_file() else {}  # a run of some models keeps the others'
    report = {"date": time.strftime("%Y-%m-%d"), "max_steps": args.steps, "config": base.to_dict(), "models": earlier}
    for model_name in args.models:
        setup = SETUPS[model_name]()
        targets, _ = targets_for(setup, RESULTS / "effectiveness", DEFAULT_TARGETS[model_name])
        bench = Bench(setup, args.records, base, setup.steps_sample, lpips_model, verified=True)
        bench.cond_probes = args.cond_probes
        # the surrogate seeds effectiveness chose (read, never re-chosen)
        effectiveness_seeds = RESULTS / "effectiveness" / f"{model_name}_surrogate_seeds.json"
        if effectiveness_seeds.is_file():
            bench.edit_seeds = json.loads(effectiveness_seeds.read_text())
        rows = dict(earlier.get(model_name, {}).get("rows", {}))  # rows not asked for this time stay as recorded
        for name in args.rows:
            runs = row_runs(bench, name, targets, TRAIN_SEEDS, train=not args.report, only=args.only_targets)
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
    report["models"] = {m: report["models"][m] for m in SETUPS if m in report["models"]}  # the setups' order
    report["defaults"] = choose_default(report["models"])
    print(f"\ndefaults by the rule over {', '.join(report['models'])}: {report['defaults']['chosen']}")
    print_readme_table(report)
    write_json(path, report)
    print(f"\nwrote {path}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
