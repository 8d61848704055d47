"""Unlearning on your own diffusers model, outside ComfyUI, from a JSON job file.

A job names a model folder (``SD3Transformer2DModel`` or ``UNet2DModel``, as written by
``save_pretrained``), a safetensors file with the targets in the model's input space and their
conditioning, optionally surrogates and a remember set, the training config, and the output::

    {
      "model": {"path": "sd35/transformer", "kind": "sd3", "shift": 3.0},
      "targets": "targets.safetensors",
      "surrogate": {"method": "sdedit", "strength": 0.5, "steps": 28},
      "remember": {"generate": 32, "steps": 28},
      "config": {"steps": 100, "learning_rate": 1e-4, "lora_rank": 16},
      "output": "forget_target.safetensors",
      "key_format": "comfy"
    }

The targets file holds ``targets`` (N, C, H, W), optionally ``surrogates`` of the same shape and
``remember`` (M, C, H, W), and conditioning tensors with a batch dimension of N (for the targets)
and, prefixed with ``remember.``, of M. SD3 needs ``encoder_hidden_states`` and
``pooled_projections``; unconditional UNets need none. Relative paths are read from the job
file's folder; the output path must stay inside it.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch
from safetensors.torch import load_file

from .backends.diffusers_backend import DiffusersDenoiser, unlearn_diffusers
from .config import UnlearnConfig
from .data import ForgetTargets, RememberSet, UnlearnData
from .errors import InputError
from .files import safe_child, tensor_hash
from .lora import KEY_FORMATS, save_lora
from .process import DDPMEpsilon, RectifiedFlow
from .sampling import sample, seeded_noise
from .surrogate import sdedit

__all__ = ["run_job", "load_model"]

log = logging.getLogger(__name__)
KNOWN_KEYS = {"model", "targets", "surrogate", "remember", "config", "output", "key_format"}


def load_model(spec: dict, base_dir: Path):
    """(model, process) from the job's model spec."""
    kind = spec.get("kind")
    path = _path(base_dir, spec.get("path"), "model.path")
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel

        model = SD3Transformer2DModel.from_pretrained(str(path))
        process = RectifiedFlow(shift=float(spec.get("shift", 3.0)))
    elif kind == "unet":
        from diffusers import DDPMScheduler, UNet2DModel

        model = UNet2DModel.from_pretrained(str(path))
        scheduler_path = spec.get("scheduler")
        scheduler = DDPMScheduler.from_pretrained(str(_path(base_dir, scheduler_path, "model.scheduler"))) if scheduler_path else DDPMScheduler()
        process = DDPMEpsilon.from_scheduler(scheduler)
    else:
        raise InputError(f"model.kind must be 'sd3' or 'unet', got {kind!r}")
    return model.eval().requires_grad_(False), process


def _path(base_dir: Path, value, what: str) -> Path:
    if not value:
        raise InputError(f"the job needs {what}")
    path = Path(value)
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    return path


def run_job(job: dict, base_dir: Path, callback=None) -> dict:
    unknown = sorted(set(job) - KNOWN_KEYS)
    if unknown:
        raise InputError(f"unknown job keys {unknown}; known: {sorted(KNOWN_KEYS)}")
    config = UnlearnConfig.from_dict(job.get("config", {}))
    key_format = job.get("key_format", "comfy")
    if key_format not in KEY_FORMATS:
        raise InputError(f"key_format must be one of {KEY_FORMATS}")
    output = safe_child(base_dir, job.get("output", "unlearn_lora.safetensors"), ".safetensors", what="output name")
    model, process = load_model(job.get("model", {}), base_dir)
    tensors = load_file(str(_path(base_dir, job.get("targets"), "targets")))
    if "targets" not in tensors:
        raise InputError("the targets file needs a 'targets' tensor (N, C, H, W) in the model's input space")
    targets = tensors["targets"].float()
    forget_cond = {k: v.float() for k, v in tensors.items() if k not in ("targets", "surrogates", "remember") and not k.startswith("remember.")}
    denoiser = DiffusersDenoiser(model, process)

    if "surrogates" in tensors:
        surrogates = tensors["surrogates"].float()
    else:
        spec = job.get("surrogate", {"method": "sdedit"})
        if spec.get("method", "sdedit") != "sdedit":
            raise InputError("without surrogates in the targets file, surrogate.method must be 'sdedit'")
        surrogates = sdedit(denoiser, process, targets, forget_cond, float(spec.get("strength", 0.5)),
                            int(spec.get("steps", 28)), int(spec.get("seed", 0)))  # fmt: skip

    remember_spec = job.get("remember", {"generate": 32})
    if "remember" in tensors:
        remember = tensors["remember"].float()
        remember_cond = {k.removeprefix("remember."): v.float() for k, v in tensors.items() if k.startswith("remember.")}
    else:
        count = int(remember_spec.get("generate", 32))
        if count < 1:
            raise InputError("remember.generate must be at least 1 (or put a 'remember' tensor in the targets file)")
        picks = torch.arange(count) % len(targets)  # other seeds of the targets' own conditioning
        remember_cond = {k: v[picks] for k, v in forget_cond.items()}
        noise = seeded_noise([10_000 + i for i in range(count)], tuple(targets.shape[1:]))
        remember = sample(denoiser, process, noise, remember_cond, int(remember_spec.get("steps", 28)))

    data = UnlearnData(ForgetTargets(targets, surrogates, forget_cond), RememberSet(remember, remember_cond))
    outcome = unlearn_diffusers(model, process, data, config, callback=callback)
    metadata = {
        "unlearn.method": config.method,
        "unlearn.config": json.dumps(config.to_dict(), sort_keys=True),
        "unlearn.target_hashes": json.dumps([tensor_hash(t) for t in targets]),
        "unlearn.surrogate_hashes": json.dumps([tensor_hash(s) for s in surrogates]),
        "unlearn.base_model": str(job["model"].get("path")),
    }
    path = save_lora(output, outcome.lora, key_format, metadata)
    final = outcome.training.final
    return {"lora": str(path), "steps": outcome.training.steps, "seconds": outcome.training.seconds,
            "final_forget_loss": final.get("forget_loss"), "final_remember_loss": final.get("remember_loss")}  # fmt: skip
