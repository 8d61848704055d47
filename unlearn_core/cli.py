"""Command line: ``unlearn demo`` (the offline demo) and ``unlearn run CONFIG`` (your own model).

    python -m unlearn_core demo --out out/demo
    python -m unlearn_core run my_job.json
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .config import UnlearnConfig
from .errors import InputError, UnlearnError

log = logging.getLogger("unlearn_core")


class _ProgressBar:
    """callback(step, total, metrics) -> a tqdm bar with the current losses."""

    def __init__(self, description: str):
        self.description = description
        self.bar = None

    def __call__(self, step: int, total: int, metrics: dict) -> None:
        if self.bar is None:
            self.bar = tqdm(total=total, desc=self.description, unit="step", file=sys.stderr, mininterval=1.0)
        self.bar.set_postfix(forget=f"{metrics['forget_loss']:.4f}", remember=f"{metrics['remember_loss']:.4f}", refresh=False)
        self.bar.update(step - self.bar.n)
        if step == total:
            self.bar.close()


def _demo(args) -> int:
    from .pipeline import DemoSettings, run_demo

    overrides = {name: value for name, value in (("steps", args.steps), ("gamma", args.gamma)) if value is not None}
    config = UnlearnConfig(**{**DemoSettings().config.to_dict(), **overrides})
    settings = DemoSettings(target=args.target, surrogate=args.surrogate, strength=args.strength, config=config)
    report = run_demo(args.out, settings, callback=_ProgressBar("unlearning"))
    evaluation = report["evaluation"]
    print(f"target: prompt '{report['target']['prompt']}' seed {report['target']['seed']} "
          f"(looked like {report['target']['classified_as']}); after: looks like {report['after']['classified_as']}")
    print(f"forgetting: copy similarity {evaluation['target_copy_similarity'][0]:.3f} "
          f"(forgotten below {report['thresholds']['forget_copy_similarity_below']})")
    lpips = evaluation["integrity_lpips"]
    lpips_text = f"LPIPS {lpips:.4f}" if isinstance(lpips, float) else lpips
    print(f"integrity on {report['integrity_seeds']} other seeds: SSIM "
          f"{evaluation['integrity_ssim']:.4f}, PSNR {evaluation['integrity_psnr']:.2f} dB; {lpips_text}")
    print(f"training: {report['training']['steps']} steps in {report['training']['seconds']:.1f} s")
    for name, passed in report["checks"].items():
        print(f"  {name}: {'pass' if passed else 'FAIL'}")
    print(f"wrote {Path(args.out) / 'report.html'}, grid.png, {report['files']['lora']}")
    return 0 if report["passed"] else 1


def _run(args) -> int:
    job = read_job(Path(args.config))  # before importing the model libraries: a bad file fails at once
    from .provider import run_job

    result = run_job(job, base_dir=Path(args.config).parent, callback=_ProgressBar("unlearning"))
    print(json.dumps(result, indent=2))
    return 0


def read_job(path: Path) -> dict:
    """The job file as a dict, or an :class:`InputError` saying what is wrong with it."""
    try:
        job = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"job file {str(path)!r} does not exist; give the path of your job .json") from None
    except (OSError, ValueError) as error:
        raise InputError(f"job file {str(path)!r} is not readable JSON ({error}); fix it (see README: 'Your own model')") from None
    if not isinstance(job, dict):
        raise InputError(f"job file {str(path)!r} must hold one JSON object with model, targets, config and output")
    return job


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number of at least 1")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn", description="Prompt-free instance unlearning for diffusion models.")
    parser.add_argument("--threads", type=_positive, default=2, help="CPU threads for torch (default 2)")
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole job on the embedded flags model, offline")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--target", help="CLASS:SEED to unlearn (default: the most confidently wrong flag)")
    demo.add_argument("--surrogate", choices=["repaint", "sdedit"], default="repaint",
                      help="repaint the outer bands (default) or SDEdit the whole flag")
    demo.add_argument("--strength", type=float, default=1.0, help="surrogate edit strength (0.3-0.7 for sdedit)")
    demo.add_argument("--steps", type=int, help="training steps (default from the demo settings)")
    demo.add_argument("--gamma", type=float, help="exponent of lambda(t) = t^gamma (default 1; 4 keeps other seeds closer here)")
    demo.set_defaults(handler=_demo)
    run = commands.add_parser("run", help="unlearn on your own diffusers model, described by a JSON job file")
    run.add_argument("config", help="job file (see README: 'Your own model')")
    run.set_defaults(handler=_run)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny LoRA values are denormal floats that slow CPU kernels many-fold
    try:
        return args.handler(args)
    except UnlearnError as error:
        log.error("%s", error)
        return 2
