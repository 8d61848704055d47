"""Where each half of ours' loss acts over the noise level t, on both embedded models.

For the base model with a fresh LoRA, the gradient norm of the forget half (one target, its
surrogate) and of the remember half (the benchmark's remember set) at fixed noise fractions t,
averaged over noise draws, for each ``forget_space`` and ``remember_weight``. The share of the
forget gradient that comes from t < 0.5 says whether forgetting acts at high noise (the paper's
idea) or at low noise. See ``unlearn_core/method/weighting.py`` for the maths.

    python benchmarks/weight_profile.py            # both models, about a minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from effectiveness import RESULTS, FlagsSetup, ShapesSetup, make_surrogate, write_json

from unlearn_core import UnlearnConfig
from unlearn_core.backends.diffusers_backend import DiffusersDenoiser, lora_attached
from unlearn_core.data.sets import ForgetTargets, RememberSet, UnlearnData
from unlearn_core.method.trainer import make_objective

T_GRID = (0.02, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0)
DRAWS = 8


def profile(setup, pair, draws: int = DRAWS) -> dict:
    label, _ = pair
    target = setup.generate([pair])
    surrogate = make_surrogate(setup, "edit", target, label)
    remember_pairs = setup.remember_pairs(label)[:draws]
    data = UnlearnData(ForgetTargets(target, surrogate, setup.cond([label])),
                       RememberSet(setup.generate(remember_pairs), setup.cond([p[0] for p in remember_pairs])))  # fmt: skip
    rows = {}
    with lora_attached(setup.model, rank=8) as attached:
        params = attached.parameters()
        denoiser = DiffusersDenoiser(setup.model, setup.process)
        for forget_space in ("x0", "native"):
            for remember_weight in ("full", "complement"):
                config = UnlearnConfig(forget_batch_size=draws, remember_batch_size=draws, forget_space=forget_space,
                                       remember_weight=remember_weight)  # fmt: skip
                objective = make_objective(config, setup.process)
                forget_norms, remember_norms = [], []
                for t in T_GRID:
                    plan = objective.plan(data, torch.Generator().manual_seed(0))
                    plan.forget_t = torch.full((draws,), t)
                    plan.remember_t = torch.full((draws,), t)
                    norms = []
                    for half in (objective.forget_half(data, plan), objective.remember_half(data, plan)):
                        loss, _ = half.loss(denoiser)
                        grads = torch.autograd.grad(loss, params, allow_unused=True)
                        norms.append(float(torch.sqrt(sum((g.double() ** 2).sum() for g in grads if g is not None))))
                    forget_norms.append(norms[0])
                    remember_norms.append(norms[1])
                low = sum(n for t, n in zip(T_GRID, forget_norms, strict=True) if t < 0.5)
                rows[f"{forget_space}/{remember_weight}"] = {
                    "forget_grad_norm": forget_norms, "remember_grad_norm": remember_norms,
                    "forget_share_below_0.5": low / sum(forget_norms),
                }  # fmt: skip
    return {"target": list(pair), "t": list(T_GRID), "rows": rows}


def print_profile(name: str, result: dict) -> None:
    print(f"\n### {name}: gradient norm of each half at fixed t (target {result['target']})\n")
    print("| forget space / remember weight | half | " + " | ".join(f"t={t:g}" for t in result["t"]) + " | forget share t<0.5 |")
    print("|---|---|" + "---|" * len(result["t"]) + "---|")
    for key, row in result["rows"].items():
        for half in ("forget", "remember"):
            values = " | ".join(f"{v:.3g}" for v in row[f"{half}_grad_norm"])
            share = f"{row['forget_share_below_0.5']:.0%}" if half == "forget" else ""
            print(f"| {key} | {half} | {values} | {share} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["flags", "shapes"], choices=["flags", "shapes"])
    parser.add_argument("--draws", type=int, default=DRAWS)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path, default=RESULTS / "weight_profile.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    results = {"date": time.strftime("%Y-%m-%d"), "draws": args.draws, "models": {}}
    for name in args.models:
        setup = FlagsSetup() if name == "flags" else ShapesSetup()
        candidates = json.loads((RESULTS / "effectiveness" / f"{name}_candidates.json").read_text())["candidates"]
        results["models"][name] = profile(setup, tuple(candidates[0]), args.draws)
        print_profile(name, results["models"][name])
    write_json(args.json, results)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
