"""Table-I-style comparison: our surrogate unlearning vs NegGrad, EraseDiff, SISS and ablations.

On both embedded models (flags: conditional rectified flow, SD3 architecture; shapes:
unconditional epsilon DDPM), every method unlearns each target on its own (single instance)
with the same step budget, batch sizes and rank, and is judged on the same seeds:

- forgetting: copy similarity between the target and the same-seed output after unlearning
  (cosine of flag-classifier features for flags, of mean-centred 8x8 pixels for shapes), and
  the fraction of targets below the stated threshold;
- integrity: SSIM, PSNR (and LPIPS when its backbone is available) between base and unlearned
  outputs on 64 non-target seeds;
- distribution: Fréchet distance between base and unlearned samples in the same feature space.

Targets (the rule): flags: generate seeds 0..799 of the three confusable prompts (Ireland, Italy,
Ivory Coast) and take the outputs most confidently classified as another flag (the wrong flags),
topped up with the least confident ones; shapes: seeds 0..5. The next target by the same rule
(``--sweep-targets`` of them, default 1) is the learning-rate sweep set.

Learning rate: ours and every baseline get the same sweep {3e-4, 1e-3, 3e-3} on the sweep
targets; the chosen rate is the one with the best integrity SSIM among those that forget every
sweep target, or, if none does, the one with the lowest mean copy similarity. Ablations use
ours' chosen rate, so each differs from ours in exactly one thing.

    python benchmarks/effectiveness.py                 # both models, all methods (over an hour per model on 2 cores)
    python benchmarks/effectiveness.py --models flags --methods ours neggrad --quick

Investigating one knob (no sweep; targets reused from an earlier run to skip the flags scan)::

    python benchmarks/effectiveness.py --models flags --methods ours --gamma 2 --learning-rate 1e-3 \
        --targets-from benchmarks/results/effectiveness_flags.json --targets 3
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from unlearn_core import (  # noqa: E402
    ForgetTargets,
    RememberSet,
    UnlearnConfig,
    UnlearnData,
    demo_model,  # noqa: E402
)
from unlearn_core.backends.diffusers_backend import DiffusersDenoiser, unlearn_diffusers  # noqa: E402
from unlearn_core.metrics import PixelCopyDetector, load_lpips  # noqa: E402
from unlearn_core.pipeline import evaluate, find_undesired, generate  # noqa: E402
from unlearn_core.surrogate import flipped, noised, repaint, sdedit  # noqa: E402

log = logging.getLogger("effectiveness")

LEARNING_RATES = (3e-4, 1e-3, 3e-3)
FORGET_THRESHOLD = {"flags": 0.9, "shapes": 0.6}  # flags: see DemoSettings.forget_threshold


@dataclass(frozen=True)
class Method:
    name: str
    objective: str = "surrogate"
    surrogate: str = "sdedit"
    overrides: tuple = ()


ABLATIONS = ("no_projection", "pcgrad_both", "constant_lambda", "flip_surrogate", "noise_surrogate")
METHODS = {
    "ours": Method("ours"),
    "neggrad": Method("NegGrad", objective="neggrad", surrogate="none"),
    "erasediff": Method("EraseDiff", objective="erasediff", surrogate="none"),
    "siss": Method("SISS", objective="siss", surrogate="none"),
    "no_projection": Method("ours, no projection", overrides=(("surgery", "none"),)),
    "pcgrad_both": Method("ours, PCGrad both", overrides=(("surgery", "pcgrad_both"),)),
    "constant_lambda": Method("ours, constant lambda 0.5", overrides=(("weighting", "constant"),)),
    "flip_surrogate": Method("ours, flip surrogate", surrogate="flip"),
    "noise_surrogate": Method("ours, noise surrogate", surrogate="noise"),
}


class Setup:
    """One embedded model with its target rule, conditioning and feature space."""

    name: str
    steps_sample = 20
    clip: float | None = None  # x0 clamp while sampling (the small pixel DDPM needs it)

    def generate(self, pairs, lora=None):
        return generate(self.model, self.process, self.cond, [p[0] for p in pairs], [p[1] for p in pairs],
                        self.steps_sample, lora, clip=self.clip)  # fmt: skip

    def remember_pairs(self, target_label):
        raise NotImplementedError


class FlagsSetup(Setup):
    name = "flags"

    def __init__(self):
        self.model, self.process = demo_model.load_flags_model()
        self.classifier = demo_model.load_flags_classifier()
        self.detector = demo_model.flag_copy_detector(self.classifier)
        self.classes = demo_model.FLAG_CLASSES

    def cond(self, labels):
        return demo_model.flags_conditioning(labels)

    def candidates(self, count):
        """Wrong flags: seeds 0..799 of the three confusable prompts, most confidently wrong first."""
        trio = [self.classes.index(name) for name in ("ireland", "italy", "ivory_coast")]
        labels = [c for c in trio for _ in range(1000)]
        seeds = [s for _ in trio for s in range(1000)]
        images = self.generate(list(zip(labels, seeds, strict=True)))
        predicted, confidence = demo_model.classify_flags(self.classifier, images)
        chosen = []
        remaining = list(range(len(seeds)))
        while len(chosen) < count:
            index = remaining[find_undesired([labels[i] for i in remaining], predicted[remaining], confidence[remaining])]
            chosen.append(index)
            remaining.remove(index)
        log.info("flags: %d of %d scanned outputs are wrong flags", int((predicted != torch.tensor(labels)).sum()), len(labels))
        return [(labels[i], seeds[i]) for i in chosen]

    def remember_pairs(self, target_label):
        pairs = [(target_label, 10_000 + s) for s in range(24)]
        pairs += [(c, 20_000 + 100 * c + s) for c in range(len(self.classes)) if c != target_label for s in range(4)]
        return pairs

    def integrity_pairs(self, target):
        return [(s % len(self.classes), 50_000 + s) for s in range(64)]


class ShapesSetup(Setup):
    name = "shapes"
    steps_sample = 50
    clip = 1.0

    def __init__(self):
        self.model, self.process = demo_model.load_shapes_model()
        self.detector = PixelCopyDetector(8)

    def cond(self, labels):
        return {}

    def candidates(self, count):
        return [(0, seed) for seed in range(count)]

    def remember_pairs(self, target_label):
        return [(0, 10_000 + s) for s in range(48)]

    def integrity_pairs(self, target):
        return [(0, 50_000 + s) for s in range(64)]


def build_surrogate(setup, kind, target, label):
    """The edit surrogate is the demo's: flags repaint their outer bands under the prompt (SDEdit
    keeps a wrong tricolour's colours even at strength 0.9); shapes use SDEdit at 0.6."""
    if kind == "flip":
        return flipped(target)
    if kind == "noise":
        return noised(target, 0.1, seed=1).clamp(-1, 1)
    denoiser = DiffusersDenoiser(setup.model, setup.process)
    if setup.name == "flags":
        mask = demo_model.outer_bands_mask(*target.shape[-2:])
        return repaint(denoiser, setup.process, target, mask, setup.cond([label]), 1.0, setup.steps_sample, seed=1).clamp(-1, 1)
    return sdedit(denoiser, setup.process, target, setup.cond([label]), 0.6, setup.steps_sample, seed=1,
                  clip=setup.clip).clamp(-1, 1)  # fmt: skip


def unlearn_one(setup, method: Method, base: UnlearnConfig, learning_rate, target_pair, cache, lpips_model):
    label, seed = target_pair
    key = (label, seed)
    if key not in cache:
        target = setup.generate([key])
        remember_pairs = setup.remember_pairs(label)
        remember = setup.generate(remember_pairs)
        integrity = setup.integrity_pairs(key)
        base_others = setup.generate(integrity)
        cache[key] = {"target": target, "remember": remember, "remember_labels": [p[0] for p in remember_pairs],
                      "integrity": integrity, "base_others": base_others, "surrogates": {}}  # fmt: skip
    entry = cache[key]
    kind = method.surrogate
    if kind not in entry["surrogates"]:
        entry["surrogates"][kind] = entry["target"] if kind == "none" else build_surrogate(setup, kind, entry["target"], label)
    surrogate = entry["surrogates"][kind]
    config = replace(base, method=method.objective, learning_rate=learning_rate, **dict(method.overrides))
    data = UnlearnData(ForgetTargets(entry["target"], surrogate, setup.cond([label])),
                       RememberSet(entry["remember"], setup.cond(entry["remember_labels"])))  # fmt: skip
    started = time.perf_counter()
    try:
        lora = unlearn_diffusers(setup.model, setup.process, data, config).lora
    except Exception as error:  # a diverging baseline is a result, not a crash
        log.warning("%s on %s diverged: %s", method.name, key, error)
        return None
    seconds = time.perf_counter() - started
    after_target = setup.generate([key], lora)
    after_others = setup.generate(entry["integrity"], lora)
    evaluation = evaluate(entry["target"], after_target, entry["base_others"], after_others, setup.detector,
                          FORGET_THRESHOLD[setup.name], lpips_model)  # fmt: skip
    return {"target": list(key), "seconds": seconds, "copy_similarity": evaluation.target_copy_similarity[0],
            "forgotten": evaluation.forgotten[0], "ssim": evaluation.integrity_ssim, "psnr": evaluation.integrity_psnr,
            "lpips": evaluation.integrity_lpips, "frechet": evaluation.feature_distance}  # fmt: skip


def choose_learning_rate(setup, method, base, sweep_targets, cache, lpips_model):
    trials = []
    for lr in LEARNING_RATES:
        runs = [unlearn_one(setup, method, base, lr, t, cache, lpips_model) for t in sweep_targets]
        if any(r is None for r in runs):
            trials.append({"lr": lr, "diverged": True})
            continue
        trials.append({"lr": lr, "forgets_all": all(r["forgotten"] for r in runs),
                       "ssim": statistics.fmean(r["ssim"] for r in runs),
                       "similarity": statistics.fmean(r["copy_similarity"] for r in runs)})  # fmt: skip
    usable = [t for t in trials if not t.get("diverged")]
    if not usable:
        return LEARNING_RATES[0], trials
    forgetting = [t for t in usable if t["forgets_all"]]
    best = max(forgetting, key=lambda t: t["ssim"]) if forgetting else min(usable, key=lambda t: t["similarity"])
    return best["lr"], trials


def summarise(runs):
    ok = [r for r in runs if r is not None]
    if not ok:
        return {"diverged": len(runs)}
    lpips_values = [r["lpips"] for r in ok if isinstance(r["lpips"], float)]
    return {
        "copy_similarity": statistics.fmean(r["copy_similarity"] for r in ok),
        "forgotten_fraction": sum(r["forgotten"] for r in ok) / len(runs),
        "ssim": statistics.fmean(r["ssim"] for r in ok),
        "psnr": statistics.fmean(r["psnr"] for r in ok),
        "lpips": statistics.fmean(lpips_values) if lpips_values else None,
        "frechet": statistics.fmean(r["frechet"] for r in ok),
        "seconds": statistics.fmean(r["seconds"] for r in ok),
        "diverged": len(runs) - len(ok),
    }


def write_json(path: Path, results: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(results, indent=2))
    partial.replace(path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["flags", "shapes"], choices=["flags", "shapes"])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--targets", type=int, default=6)
    parser.add_argument("--sweep-targets", type=int, default=1, help="targets of the learning-rate sweep")
    parser.add_argument("--steps", type=int, default=100, help="equal step budget for every method")
    parser.add_argument("--quick", action="store_true", help="2 targets, 1 sweep target, 40 steps (smoke run)")
    parser.add_argument("--gamma", type=float, default=1.0, help="lambda(t) = t**gamma for ours and its ablations")
    parser.add_argument("--learning-rate", type=float, help="use this rate for every method instead of the sweep")
    parser.add_argument("--targets-from", type=Path, help="reuse the targets of an earlier results JSON")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=Path("out/benchmarks/effectiveness.json"))
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal LoRA values slow CPU kernels many-fold
    n_targets, n_sweep, steps = (2, 1, 40) if args.quick else (args.targets, args.sweep_targets, args.steps)
    base = UnlearnConfig(steps=steps, lora_rank=8, forget_batch_size=4, remember_batch_size=4, gamma=args.gamma, seed=0)
    earlier = json.loads(args.targets_from.read_text())["models"] if args.targets_from else {}
    lpips_model = load_lpips()
    results = {"date": time.strftime("%Y-%m-%d"), "steps": steps, "gamma": args.gamma,
               "learning_rates": [args.learning_rate] if args.learning_rate else LEARNING_RATES,
               "thresholds": FORGET_THRESHOLD, "lpips": getattr(lpips_model, "reason", "available"), "models": {}}  # fmt: skip
    for model_name in args.models:
        setup = FlagsSetup() if model_name == "flags" else ShapesSetup()
        if model_name in earlier:
            targets = [tuple(t) for t in earlier[model_name]["targets"][:n_targets]]
            sweep = [tuple(t) for t in earlier[model_name]["sweep_targets"][:n_sweep]]
        else:
            candidates = setup.candidates(n_targets + n_sweep)
            targets, sweep = candidates[:n_targets], candidates[n_targets:]
        log.info("%s: targets %s, sweep %s", model_name, targets, sweep)
        cache: dict = {}
        table = {}
        for key in args.methods:
            method = METHODS[key]
            if args.learning_rate:
                lr, trials = args.learning_rate, "fixed by --learning-rate"
            elif key in ABLATIONS and "ours" in table:
                lr, trials = table["ours"]["learning_rate"], "ours' rate"
            else:
                lr, trials = choose_learning_rate(setup, method, base, sweep, cache, lpips_model)
            runs = [unlearn_one(setup, method, base, lr, t, cache, lpips_model) for t in targets]
            table[key] = {"name": method.name, "learning_rate": lr, "sweep": trials, "summary": summarise(runs), "runs": runs}
            log.info("%s %s lr=%g %s", model_name, method.name, lr, table[key]["summary"])
            results["models"][model_name] = {"targets": targets, "sweep_targets": sweep, "methods": table}
            write_json(args.json, results)  # after every method, so a long run stopped early keeps its rows
        print(f"\n### {model_name} ({len(targets)} targets, {steps} steps, forgotten = copy similarity < {FORGET_THRESHOLD[model_name]})\n")
        print("| method | lr | copy sim. to target (lower = forgotten) | forgotten | SSIM (higher better) | PSNR dB | LPIPS | Fréchet (features) |")
        print("|---|---|---|---|---|---|---|---|")
        for entry in table.values():
            s = entry["summary"]
            if "copy_similarity" not in s:
                print(f"| {entry['name']} | {entry['learning_rate']:g} | diverged | | | | | |")
                continue
            lpips_text = "n/a" if s["lpips"] is None else f"{s['lpips']:.3f}"
            print(f"| {entry['name']} | {entry['learning_rate']:g} | {s['copy_similarity']:.3f} | {s['forgotten_fraction']:.0%} | "
                  f"{s['ssim']:.3f} | {s['psnr']:.1f} | {lpips_text} | {s['frechet']:.3f} |")  # fmt: skip
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
