"""Command line: the offline demo, one job on your own model, applying a result, and the queue.

    python -m unlearn_core demo --out out/demo
    python -m unlearn_core run my_job.json
    python -m unlearn_core apply --model ddpm-pipeline --result forget.safetensors --out ddpm-unlearned
    python -m unlearn_core queue /shared/queue request.json      # submit
    python -m unlearn_core serve /shared/queue --address auto    # process on Ray (one worker per GPU)
    python -m unlearn_core status /shared/queue
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

from tqdm.auto import tqdm

from .data.surrogate import SAMPLED_KINDS
from .errors import InputError, UnlearnError
from .method.config import UnlearnConfig
from .runtime import configure_torch

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
            self.close()

    def close(self) -> None:
        """Ends the bar, also when verified stopping ended training before the maximum."""
        if self.bar is not None:
            self.bar.close()


def _demo(args) -> int:
    from .demo.run import DemoSettings, run_demo

    overrides = {name: value for name, value in (("steps", args.steps), ("gamma", args.gamma)) if value is not None}
    config = UnlearnConfig(**{**DemoSettings().config.to_dict(), **overrides})
    settings = DemoSettings(target=args.target, surrogate=args.surrogate, strength=args.strength, config=config)
    progress = _ProgressBar("unlearning")
    report = run_demo(args.out, settings, callback=progress)
    progress.close()
    evaluation = report["evaluation"]
    print(f"target: prompt '{report['target']['prompt']}' seed {report['target']['seed']} "
          f"(looked like {report['target']['classified_as']}); after: looks like {report['after']['classified_as']}")
    print(f"forgetting: copy similarity {evaluation['target_copy_similarity'][0]:.3f} "
          f"(forgotten below {report['thresholds']['forget_copy_similarity_below']})")
    lpips = evaluation["integrity_lpips"]
    lpips_text = f"LPIPS {lpips:.4f}" if isinstance(lpips, float) else lpips
    print(f"integrity on {report['integrity_seeds']} other seeds: SSIM "
          f"{evaluation['integrity_ssim']:.4f}, PSNR {evaluation['integrity_psnr']:.2f} dB; {lpips_text}")
    print(f"training: {report['training']['steps']} of at most {report['training']['max_steps']} steps in "
          f"{report['training']['seconds']:.1f} s ({report['training']['verification'].get('status')})")
    for name, passed in report["checks"].items():
        print(f"  {name}: {'pass' if passed else 'FAIL'}")
    print(f"wrote {Path(args.out) / 'report.html'}, grid.png, {report['files']['lora']}")
    return 0 if report["passed"] else 1


def _run(args) -> int:
    job = read_job(Path(args.config))  # before importing the model libraries: a bad file fails at once
    from .formats.model_folders import ModelCache
    from .serve.provider import run_job

    progress = _ProgressBar("unlearning")
    result = run_job(job, base_dir=Path(args.config).parent, callback=progress, models=ModelCache(args.device))
    progress.close()
    print(json.dumps(result, indent=2))
    return 0


def _apply(args) -> int:
    from .formats.apply import apply_to_folder

    out = apply_to_folder(args.model, args.result, args.out, scale=args.scale)
    print(f"wrote {out} (load it with from_pretrained)")
    return 0


def _submit(args) -> int:
    from .formats.files import safe_name
    from .serve.provider import plan_job
    from .serve.request_queue import RequestQueue

    if args.name and len(args.requests) > 1:
        raise InputError("--name names one request; submit several files without it (each takes its file's name)")
    queue = RequestQueue(args.root)
    for path in map(Path, args.requests):
        request_id = safe_name(args.name or path.stem, "request name")
        # the checks `unlearn run` makes, with paths read from the queue folder as a worker reads them
        plan_job(read_job(path), base_dir=queue.root, out_dir=queue.outputs(request_id))
        print(f"queued {queue.submit(path.read_bytes(), request_id)}")
    return 0


def _status(args) -> int:
    from .serve.request_queue import STATES, RequestQueue

    root = Path(args.root)
    if not (root / "pending").is_dir():
        raise InputError(f"{str(root)!r} is not a request queue (no pending/ folder); give the folder `unlearn queue` made")
    report = RequestQueue(root).status()
    if args.json:
        print(json.dumps(report, indent=2, sort_keys=True))
        return 0
    for state in STATES:
        print(f"{state}: {len(report[state])}")
        for entry in report[state]:
            detail = {"running": lambda e: f"on {e['worker']}", "failed": lambda e: e["error"],
                      "done": lambda e: e["outputs"], "pending": lambda e: ""}[state](entry)  # fmt: skip
            print(f"  {entry['id']}  attempts {entry['attempts']}  {detail}".rstrip())
    return 0


def _serve(args) -> int:
    from .serve.cluster import ServeSettings, serve

    settings = ServeSettings(workers=args.workers, address=args.address, gpus_per_worker=args.gpus_per_worker,
                             cpus_per_worker=args.cpus_per_worker, local_cpus=args.local_cpus,
                             max_attempts=args.max_attempts, lease_seconds=args.lease_seconds,
                             grace_seconds=args.grace_seconds, until_empty=args.until_empty)  # fmt: skip
    counts = serve(args.root, settings, handle_signals=True)
    print(json.dumps(counts))
    return 0 if counts["failed"] == 0 else 1


def read_job(path: Path) -> dict:
    """The job file as a dict, or an :class:`InputError` saying what is wrong with it."""
    try:
        job = json.loads(path.read_text("utf-8"))
    except FileNotFoundError:
        raise InputError(f"job file {str(path)!r} does not exist; give the path of your job .json") from None
    except (OSError, ValueError) as error:
        raise InputError(f"job file {str(path)!r} is not readable JSON ({error}); fix it (see docs/PROVIDERS.md)") from None
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


def _default_threads() -> int:
    """OMP_NUM_THREADS where it says a whole number, as the machine's owner set it for torch; else 2."""
    value = os.environ.get("OMP_NUM_THREADS", "")
    return int(value) if value.isdigit() and int(value) > 0 else 2


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="unlearn", description="Prompt-free instance unlearning for diffusion models.")
    parser.add_argument("--threads", type=_positive, default=_default_threads(),
                        help="CPU threads for torch (default: OMP_NUM_THREADS, else 2)")  # fmt: skip
    parser.add_argument("-v", "--verbose", action="store_true")
    commands = parser.add_subparsers(dest="command", required=True)
    demo = commands.add_parser("demo", help="the whole job on the embedded flags model, offline")
    demo.add_argument("--out", default="out/demo", help="output folder (default out/demo)")
    demo.add_argument("--target", help="CLASS:SEED to unlearn (default: the most confidently wrong flag)")
    demo.add_argument("--surrogate", choices=list(SAMPLED_KINDS), default="inpaint",
                      help="inpaint the outer bands (default) or sdedit the whole flag")
    demo.add_argument("--strength", type=float, default=1.0, help="surrogate edit strength (0.3-0.7 for sdedit)")
    demo.add_argument("--steps", type=int, help="training steps (default from the demo settings)")
    demo.add_argument("--gamma", type=float, help="exponent of lambda(t) = t^gamma (default 1; 4 keeps other seeds closer here)")
    demo.set_defaults(handler=_demo)
    run = commands.add_parser("run", help="unlearn on your own diffusers model, described by a JSON job file")
    run.add_argument("config", help="job file (see docs/PROVIDERS.md)")
    run.add_argument("--device", default="cpu", help="torch device to train on: cpu (default) or cuda")
    run.set_defaults(handler=_run)
    apply = commands.add_parser("apply", help="merge a result (LoRA or full weights) into a diffusers model or pipeline folder")
    apply.add_argument("--model", required=True, help="the base model folder, or a pipeline folder (model_index.json)")
    apply.add_argument("--result", required=True, help="the .safetensors an unlearning job wrote (any key format)")
    apply.add_argument("--out", required=True, help="new folder to write (must not exist)")
    apply.add_argument("--scale", type=float, default=1.0, help="LoRA strength (default 1, as trained)")
    apply.set_defaults(handler=_apply)
    submit = commands.add_parser("queue", help="submit job files as requests to a queue folder")
    submit.add_argument("root", help="the queue folder (made if missing)")
    submit.add_argument("requests", nargs="+", help="job files; relative paths in them are read from the queue folder")
    submit.add_argument("--name", help="request id (default: the file's name without .json)")
    submit.set_defaults(handler=_submit)
    status = commands.add_parser("status", help="list a queue's pending, running, done and failed requests")
    status.add_argument("root", help="the queue folder")
    status.add_argument("--json", action="store_true", help="print the status as JSON")
    status.set_defaults(handler=_status)
    serve = commands.add_parser("serve", help="process a queue on Ray: one worker per GPU, base models kept loaded")
    serve.add_argument("root", help="the queue folder (on a file system every node reaches)")
    serve.add_argument("--address", help="Ray cluster to join: auto, or HEAD:6379 (default: start a local one)")
    serve.add_argument("--workers", type=_positive, help="worker count (default: one per GPU, else one per CPU slot)")
    serve.add_argument("--gpus-per-worker", type=float, help="GPUs per worker (default 1 if the cluster has GPUs, else 0)")
    serve.add_argument("--cpus-per-worker", type=_positive, default=1, help="CPUs (and torch threads) per worker (default 1)")
    serve.add_argument("--local-cpus", type=_positive, help="CPUs of a local cluster (default: all)")
    serve.add_argument("--max-attempts", type=_positive, default=3, help="starts before a crashing request fails (default 3)")
    serve.add_argument("--lease-seconds", type=float, default=600.0, help="claim lease, renewed while running (default 600)")
    serve.add_argument("--grace-seconds", type=float, default=600.0,
                       help="on SIGINT/SIGTERM, time running requests get to finish before release (default 600)")
    serve.add_argument("--until-empty", action="store_true", help="exit when nothing is pending or running")
    serve.set_defaults(handler=_serve)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    # bitsandbytes, when installed, looks up a CPU 4-bit kernel on import (peft imports it) and warns
    # when it cannot fetch one; nothing here uses 4-bit layers, adamw_8bit included
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    configure_torch(args.threads)
    try:
        return args.handler(args)
    except UnlearnError as error:
        log.error("%s", error)
        return 2
