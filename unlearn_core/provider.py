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

import logging
import math
from pathlib import Path

import torch
from safetensors.torch import load_file

from .backends.diffusers_backend import DiffusersDenoiser, unlearn_diffusers
from .config import UnlearnConfig
from .data import ForgetTargets, RememberSet, UnlearnData
from .errors import InputError
from .files import safe_child, tensor_hash
from .lora import KEY_FORMATS, reproduction_metadata, save_lora
from .process import DDPMEpsilon, RectifiedFlow
from .sampling import sample, seeded_noise
from .surrogate import sdedit

__all__ = ["run_job", "load_model"]

log = logging.getLogger(__name__)
KNOWN_KEYS = {"model", "targets", "surrogate", "remember", "config", "output", "key_format"}


def load_model(spec: dict, base_dir: Path):
    """(model, process) from the job's model spec."""
    spec = _section(spec, "model")
    kind = spec.get("kind")
    if kind not in ("sd3", "unet"):
        raise InputError(f"model.kind must be 'sd3' or 'unet', got {kind!r}")
    path = _path(base_dir, spec.get("path"), "model.path")
    if kind == "sd3":
        from diffusers import SD3Transformer2DModel

        shift = _number(spec, "shift", 3.0, float, "model", 0.01, 100.0)
        model = _load_pretrained(SD3Transformer2DModel, path, "model.path")
        process = RectifiedFlow(shift=shift)
    else:
        from diffusers import DDPMScheduler, UNet2DModel

        model = _load_pretrained(UNet2DModel, path, "model.path")
        scheduler_path = spec.get("scheduler")
        if scheduler_path:
            scheduler = _load_pretrained(DDPMScheduler, _path(base_dir, scheduler_path, "model.scheduler"), "model.scheduler")
        else:
            scheduler = DDPMScheduler()
        process = DDPMEpsilon.from_scheduler(scheduler)
    return model.eval().requires_grad_(False), process


def _load_pretrained(cls, path: Path, what: str):
    try:
        return cls.from_pretrained(str(path))
    except (OSError, ValueError, TypeError, KeyError) as error:  # diffusers' errors for a folder it cannot read
        raise InputError(
            f"{what} {str(path)!r} is not a {cls.__name__} folder ({error}); give the folder that "
            "save_pretrained wrote (with config.json and the weights)"
        ) from None


def _section(value, what: str) -> dict:
    if not isinstance(value, dict):
        raise InputError(f"the job's {what!r} must be a JSON object, got {type(value).__name__}")
    return value


def _number(spec: dict, key: str, default, kind, what: str, low, high):
    """``spec[key]`` as int or float within [low, high], or an error naming the field and its range."""
    value = spec.get(key, default)
    whole = isinstance(value, int) and not isinstance(value, bool)
    finite = isinstance(value, float) and math.isfinite(value)
    if not (whole or (finite and (kind is float or value.is_integer()))):
        raise InputError(f"{what}.{key}={value!r} must be a {'whole ' if kind is int else ''}number in [{low}, {high}]")
    if not low <= value <= high:
        raise InputError(f"{what}.{key}={value!r} is outside [{low}, {high}]; give a value in that range")
    return kind(value)


def _load_tensors(path: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(path))
    except Exception as error:  # safetensors raises several types for damaged files
        raise InputError(
            f"targets file {path.name!r} is not a readable safetensors file ({error}); write it with "
            "safetensors.torch.save_file"
        ) from None


def _path(base_dir: Path, value, what: str) -> Path:
    if not value:
        raise InputError(f"the job needs {what}")
    path = Path(value)
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    return path


def run_job(job: dict, base_dir: Path, callback=None) -> dict:
    """Run one job; everything is validated before the model is loaded, and the LoRA is written last."""
    job = _section(job, "job")
    unknown = sorted(set(job) - KNOWN_KEYS)
    if unknown:
        raise InputError(f"unknown job keys {unknown}; known: {sorted(KNOWN_KEYS)}")
    config = UnlearnConfig.from_dict(_section(job.get("config", {}), "config"))
    key_format = job.get("key_format", "comfy")
    if key_format not in KEY_FORMATS:
        raise InputError(f"key_format={key_format!r} is not one of: {', '.join(KEY_FORMATS)}")
    output = safe_child(base_dir, job.get("output", "unlearn_lora.safetensors"), ".safetensors", what="output name")
    surrogate_spec = _section(job.get("surrogate", {"method": "sdedit"}), "surrogate")
    remember_spec = _section(job.get("remember", {"generate": 32}), "remember")
    strength = _number(surrogate_spec, "strength", 0.5, float, "surrogate", 0.01, 1.0)
    surrogate_steps = _number(surrogate_spec, "steps", 28, int, "surrogate", 1, 1000)
    surrogate_seed = _number(surrogate_spec, "seed", 0, int, "surrogate", 0, 2**63 - 1)
    remember_count = _number(remember_spec, "generate", 32, int, "remember", 1, 10_000)
    remember_steps = _number(remember_spec, "steps", 28, int, "remember", 1, 1000)
    targets_path = _path(base_dir, job.get("targets"), "targets")
    model, process = load_model(job.get("model", {}), base_dir)
    tensors = _load_tensors(targets_path)
    if "targets" not in tensors:
        raise InputError("the targets file needs a 'targets' tensor (N, C, H, W) in the model's input space")
    targets = tensors["targets"].float()
    if targets.dim() != 4 or len(targets) == 0:
        raise InputError(f"'targets' must be a non-empty (N, C, H, W) batch, got shape {tuple(targets.shape)}; put at least one target in the file")
    if not torch.isfinite(targets).all():
        raise InputError("'targets' holds NaN/inf values; re-encode the target images")  # before sampling from them
    forget_cond = {k: v.float() for k, v in tensors.items() if k not in ("targets", "surrogates", "remember") and not k.startswith("remember.")}
    denoiser = DiffusersDenoiser(model, process)

    if "surrogates" in tensors:
        surrogates = tensors["surrogates"].float()
    else:
        if surrogate_spec.get("method", "sdedit") != "sdedit":
            raise InputError("without surrogates in the targets file, surrogate.method must be 'sdedit'")
        surrogates = sdedit(denoiser, process, targets, forget_cond, strength, surrogate_steps, surrogate_seed)

    if "remember" in tensors:
        remember = tensors["remember"].float()
        remember_cond = {k.removeprefix("remember."): v.float() for k, v in tensors.items() if k.startswith("remember.")}
    else:
        picks = torch.arange(remember_count) % len(targets)  # other seeds of the targets' own conditioning
        remember_cond = {k: v[picks] for k, v in forget_cond.items()}
        noise = seeded_noise([10_000 + i for i in range(remember_count)], tuple(targets.shape[1:]))
        remember = sample(denoiser, process, noise, remember_cond, remember_steps)

    data = UnlearnData(ForgetTargets(targets, surrogates, forget_cond), RememberSet(remember, remember_cond))
    outcome = unlearn_diffusers(model, process, data, config, callback=callback)
    remember_source = {"given": tensor_hash(remember)} if "remember" in tensors else {
        "generate": remember_count, "steps": remember_steps}  # fmt: skip
    surrogate_source = "given" if "surrogates" in tensors else {
        "method": "sdedit", "strength": strength, "steps": surrogate_steps, "seed": surrogate_seed}  # fmt: skip
    metadata = reproduction_metadata(
        config, [tensor_hash(t) for t in targets], [tensor_hash(s) for s in surrogates], str(job["model"].get("path")),
        base_model_kind=job["model"].get("kind"), surrogate=surrogate_source, remember=remember_source,
    )  # fmt: skip
    path = save_lora(output, outcome.lora, key_format, metadata)
    final = outcome.training.final
    return {"lora": str(path), "steps": outcome.training.steps, "seconds": outcome.training.seconds,
            "final_forget_loss": final.get("forget_loss"), "final_remember_loss": final.get("remember_loss")}  # fmt: skip
