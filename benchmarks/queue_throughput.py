"""Request queue throughput: requests per minute with 1 and 2 Ray workers, and the time a worker
that keeps the base model loaded saves over one ``unlearn run`` process per request.

The same K requests (the embedded flags model saved as a diffusers folder, one target, SDEdit
surrogate, a generated remember set, a short training) run three ways:

- ``process``: one ``python -m unlearn_core --threads 1 run job.json`` after another (each
  process imports torch and diffusers and loads the model);
- ``serve1`` / ``serve2``: ``unlearn serve`` on a local Ray cluster with 1 or 2 workers (one
  CPU and one thread each). Throughput counts from the first claim to the last finish (the
  queue's own records), so the Ray and worker start-up, paid once per fleet, is reported apart.

The saving per request is the mean wall time of a process run minus the mean time a warm
worker spends on a request. Results go to ``benchmarks/results/queue_throughput.json``, one key
per phase; a rerun skips phases already there with the same settings (``--fresh`` reruns all).

    python benchmarks/queue_throughput.py                      # 6 requests, about 3 minutes on 2 cores
    python benchmarks/queue_throughput.py --phases serve2 --requests 12

``--model sd3-medium --device cuda`` runs the same on an SD3-Medium-size transformer with
random weights (a GPU machine: 2 B parameters, 128x128 latents).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

from unlearn_core.formats.files import atomic_write_text
from unlearn_core.serve.cluster import ServeSettings, serve
from unlearn_core.serve.request_queue import RequestQueue

RESULTS = Path(__file__).resolve().parent / "results" / "queue_throughput.json"
PHASES = ("process", "serve1", "serve2")
ROOT = Path(__file__).resolve().parents[1]


def build_inputs(folder: Path, model_name: str) -> dict:
    """The model folder and targets file the requests share; returns the model section of a job."""
    from unlearn_core.demo import models as demo_model

    if model_name == "flags":
        model, _ = demo_model.load_flags_model()
        label = demo_model.FLAG_CLASSES.index("ireland")
        target = demo_model.draw_flag("ireland")[None]
        cond = demo_model.flags_conditioning([label])
    else:  # SD3-Medium's transformer config, random weights
        from diffusers import SD3Transformer2DModel

        torch.manual_seed(0)
        model = SD3Transformer2DModel(sample_size=128, patch_size=2, in_channels=16, out_channels=16, num_layers=24,
                                      attention_head_dim=64, num_attention_heads=24, joint_attention_dim=4096,
                                      caption_projection_dim=1536, pooled_projection_dim=2048, pos_embed_max_size=192)  # fmt: skip
        generator = torch.Generator().manual_seed(0)
        target = torch.randn(1, 16, 128, 128, generator=generator)
        cond = {"encoder_hidden_states": torch.randn(1, 154, 4096, generator=generator) * 0.1,
                "pooled_projections": torch.randn(1, 2048, generator=generator) * 0.1}  # fmt: skip
    model.save_pretrained(folder / "transformer")
    save_file({"targets": target.float().contiguous(), **cond}, str(folder / "targets.safetensors"))
    return {"path": str(folder / "transformer"), "kind": "sd3", "shift": 3.0}


def request(inputs: Path, model_section: dict, steps: int, seed: int) -> dict:
    """A request of ``steps`` training steps exactly (throughput is measured per step, so verified
    stopping is off). The flags target is the canonical flag, which every edit under its prompt
    copies pixel for pixel: the copy threshold sits just under 1 so that its surrogate is accepted."""
    return {"model": model_section, "targets": str(inputs / "targets.safetensors"),
            "surrogate": {"method": "sdedit", "strength": 0.6, "steps": 10}, "remember": {"generate": 8, "steps": 10},
            "check": {"forget_below": 0.999},
            "config": {"steps": steps, "lora_rank": 4, "learning_rate": 1e-3, "seed": seed, "stop_when_forgotten": False},
            "output": "lora.safetensors"}  # fmt: skip


def run_processes(inputs: Path, jobs: list[dict], device: str) -> dict:
    walls, training = [], []
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    for index, job in enumerate(jobs):
        folder = inputs / f"process-{index}"
        folder.mkdir()
        (folder / "job.json").write_text(json.dumps(job))
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "unlearn_core", "--threads", "1", "run", str(folder / "job.json"),
                               "--device", device], capture_output=True, text=True, env=env)  # fmt: skip
        walls.append(time.perf_counter() - started)
        if done.returncode != 0:
            raise RuntimeError(f"unlearn run failed: {done.stderr[-2000:]}")
        training.append(json.loads(done.stdout)["seconds"])
        print(f"  process {index + 1}/{len(jobs)}: {walls[-1]:.1f} s (training {training[-1]:.1f} s)", flush=True)
    return {"seconds_per_request": walls, "mean_seconds_per_request": sum(walls) / len(walls),
            "training_seconds": training, "requests_per_minute": 60 * len(walls) / sum(walls)}  # fmt: skip


def run_serve(inputs: Path, jobs: list[dict], workers: int, gpus: float) -> dict:
    queue = RequestQueue(inputs / f"queue-{workers}")
    for index, job in enumerate(jobs):
        queue.submit(job, f"r{index:03d}")
    started = time.time()
    counts = serve(queue.root, ServeSettings(workers=workers, local_cpus=workers, gpus_per_worker=gpus, until_empty=True,
                                             poll_seconds=0.1))  # fmt: skip
    total = time.time() - started
    if counts["done"] != len(jobs):
        raise RuntimeError(f"serve finished {counts}, not {len(jobs)} requests")
    attempts = [queue.record(f"r{index:03d}")["attempts"][-1] for index in range(len(jobs))]
    first, last = min(a["claimed_at"] for a in attempts), max(a["finished_at"] for a in attempts)
    per_request = [a["finished_at"] - a["claimed_at"] for a in attempts]
    loads = [json.loads((queue.outputs(f"r{i:03d}") / "audit.json").read_text())["attempt"]["model_loaded_for_it"]
             for i in range(len(jobs))]  # fmt: skip
    return {"workers": workers, "total_seconds": total, "busy_seconds": last - first, "startup_seconds": total - (last - first),
            "requests_per_minute": 60 * len(jobs) / (last - first), "seconds_per_request": per_request,
            "mean_seconds_per_request": sum(per_request) / len(per_request), "model_loads": sum(loads)}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--steps", type=int, default=20, help="training steps per request")
    parser.add_argument("--phases", default=",".join(PHASES), help=f"comma-separated, of {', '.join(PHASES)}")
    parser.add_argument("--model", choices=("flags", "sd3-medium"), default="flags")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: one GPU per worker")
    parser.add_argument("--json", type=Path, default=RESULTS)
    parser.add_argument("--fresh", action="store_true", help="rerun phases the JSON already holds")
    args = parser.parse_args(argv)
    phases = [p for p in args.phases.split(",") if p]
    if unknown := sorted(set(phases) - set(PHASES)):
        parser.error(f"unknown phases {unknown}; choose from {', '.join(PHASES)}")
    settings = {"requests": args.requests, "steps": args.steps, "model": args.model, "device": args.device}
    results = json.loads(args.json.read_text()) if args.json.is_file() and not args.fresh else {}
    if results.get("settings") != settings:
        results = {"settings": settings}
    results["machine"] = {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
                          "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None}  # fmt: skip
    with tempfile.TemporaryDirectory() as scratch:
        inputs = Path(scratch)
        model_section = build_inputs(inputs, args.model)
        jobs = [request(inputs, model_section, args.steps, seed) for seed in range(args.requests)]
        for phase in phases:
            if phase in results:
                print(f"{phase}: kept from {args.json}")
                continue
            print(f"{phase}: {args.requests} requests", flush=True)
            load_before = os.getloadavg()[0]  # other work on the machine skews the figures; keep how busy it was
            if phase == "process":
                results[phase] = run_processes(inputs, jobs, args.device)
            else:
                results[phase] = run_serve(inputs, jobs, int(phase[-1]), 1.0 if args.device == "cuda" else 0.0)
            results[phase]["load_average_1min"] = {"before": load_before, "after": os.getloadavg()[0]}
            atomic_write_text(args.json, json.dumps(results, indent=1))
    if "process" in results and "serve1" in results:
        process, warm = results["process"]["mean_seconds_per_request"], results["serve1"]["mean_seconds_per_request"]
        results["load_once_saving"] = {"seconds_per_request": process - warm, "fraction_of_process_time": (process - warm) / process}
    if "serve1" in results and "serve2" in results:
        results["speedup_2_workers"] = results["serve2"]["requests_per_minute"] / results["serve1"]["requests_per_minute"]
    atomic_write_text(args.json, json.dumps(results, indent=1))
    for phase in PHASES:
        if phase in results:
            row = results[phase]
            print(f"{phase:8s} {row['requests_per_minute']:6.1f} requests/min, {row['mean_seconds_per_request']:.2f} s/request"
                  + (f", start-up {row['startup_seconds']:.1f} s, model loads {row['model_loads']}" if phase != "process" else ""))
    if "load_once_saving" in results:
        saving = results["load_once_saving"]
        print(f"keeping the model loaded saves {saving['seconds_per_request']:.2f} s per request "
              f"({100 * saving['fraction_of_process_time']:.0f}% of a process run)")
    if "speedup_2_workers" in results:
        print(f"2 workers vs 1: {results['speedup_2_workers']:.2f}x requests per minute")
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
