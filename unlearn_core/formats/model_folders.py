"""Find the trainable network and its noise schedule in a diffusers folder, then load them.

A job's ``model`` section names one of:

- a pipeline folder (``model_index.json`` with ``unet/`` or ``transformer/`` and ``scheduler/``,
  as ``save_pretrained`` of DDPMPipeline, StableDiffusionPipeline, StableDiffusionXLPipeline,
  StableDiffusion3Pipeline, FluxPipeline or QwenImagePipeline writes it): the network and its
  schedule are both found inside, and the kind (:data:`COMPONENTS`) from the network's class;
- a model folder inside such a pipeline (``pipeline/unet``): the schedule is its sibling
  ``scheduler/``;
- a lone model folder (``config.json`` and weights) with ``"scheduler": "path"`` naming a folder
  with ``scheduler_config.json`` (or that file).

A UNet without a findable schedule is refused: the beta schedule decides every noise level, and
a guessed one (linear betas for a cosine model) trains towards the wrong targets without any
error. The flow transformers (sd3, flux, qwen_image) take ``model.shift`` when given, else their
scheduler config's: its ``shift``, or with ``use_dynamic_shifting`` (Flux.1 dev, Qwen-Image) the
shift the pipeline computes for the targets' resolution (:func:`dynamic_shift`). Without a
scheduler config an SD3 transformer takes SD3's 3.0; Flux and Qwen-Image are refused.

Sampling clips x0 exactly as the model's own scheduler does (``clip_sample`` and
``clip_sample_range``; a latent UNet's only when its config says so), unless ``model.clip`` says
otherwise (a number, or null for none).

:func:`locate` reads only JSON and checks everything; :func:`load` then loads the weights, and
:class:`ModelCache` keeps the last loaded network for the next job on the same model.
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..diffusion.process import DDPMEpsilon, DDPMVelocity, ForwardProcess, RectifiedFlow
from ..errors import InputError
from .files import file_sha256, job_path

__all__ = ["ModelSource", "LoadedModel", "ModelCache", "locate", "load", "dynamic_shift", "MODEL_KINDS", "COMPONENTS",
           "FLOW_KINDS"]

log = logging.getLogger(__name__)

#: kind -> (the pipeline's component folder, the diffusers class)
COMPONENTS = {
    "sd3": ("transformer", "SD3Transformer2DModel"),
    "flux": ("transformer", "FluxTransformer2DModel"),
    "qwen_image": ("transformer", "QwenImageTransformer2DModel"),
    "unet": ("unet", "UNet2DModel"),
    "unet_cond": ("unet", "UNet2DConditionModel"),
}
MODEL_KINDS = tuple(COMPONENTS)
#: rectified-flow kinds; the others are DDPM UNets with an epsilon or v schedule
FLOW_KINDS = ("sd3", "flux", "qwen_image")
#: the dynamic-shift fields of a flow scheduler config, with the defaults the pipelines use
DYNAMIC_SHIFT_DEFAULTS = {"base_image_seq_len": 256, "max_image_seq_len": 4096, "base_shift": 0.5, "max_shift": 1.15}
MODEL_KEYS = {"path", "kind", "shift", "scheduler", "clip"}
SD3_DEFAULT_SHIFT = 3.0


@dataclass(frozen=True)
class ModelSource:
    """Where a job's network and schedule are, and how to sample from them (nothing loaded)."""

    kind: str
    model_dir: Path
    #: the epsilon or v schedule (UNet kinds); a flow kind's scheduler config when it shifts by
    #: resolution (``shift`` is then None); else None
    scheduler_config: dict | None
    shift: float | None  # flow kinds: the fixed shift, or None for the resolution's (dynamic_shift)
    clip: float | None  # x0 clamp while sampling, as the model's own sampler does

    def flow_shift(self, latent_size: tuple[int, int] | None = None) -> float:
        """The rectified flow's shift: the fixed one, or the pipeline's for latents of ``latent_size``."""
        if self.shift is not None:
            return self.shift
        if latent_size is None:
            raise ValueError(f"the {self.kind} scheduler shifts by resolution: give the latent size (H, W)")
        return dynamic_shift(self.scheduler_config, latent_size)

    def process(self, device: str | torch.device = "cpu", latent_size: tuple[int, int] | None = None) -> ForwardProcess:
        """The forward process; an epsilon schedule's table lives on ``device``, where the noise
        levels it is indexed with are. ``latent_size`` (H, W) sets a resolution-dependent shift."""
        if self.kind in FLOW_KINDS:
            return RectifiedFlow(shift=self.flow_shift(latent_size))
        scheduler = _ddpm_scheduler(self.scheduler_config)
        kind = DDPMVelocity if scheduler.config.prediction_type == "v_prediction" else DDPMEpsilon
        return kind(scheduler.alphas_cumprod.to(device))

    def describe(self, latent_size: tuple[int, int] | None = None) -> dict:
        """What the audit record says about the base model (the shift at ``latent_size``, if it depends on it)."""
        shift = None
        if self.kind in FLOW_KINDS and (self.shift is not None or latent_size is not None):
            shift = self.flow_shift(latent_size)
        record = {"kind": self.kind, "folder": str(self.model_dir), "shift": shift, "clip": self.clip,
                  "schedule": self.scheduler_config}  # fmt: skip
        if self.kind in FLOW_KINDS and self.shift is None:
            record["shift_rule"] = "use_dynamic_shifting" + (f" at {latent_size[0]}x{latent_size[1]} latents" if latent_size else "")
        return record


@dataclass
class LoadedModel:
    source: ModelSource
    model: torch.nn.Module
    fingerprint: dict = field(default_factory=dict)  # file name -> sha256 of the folder's files


def _read_json(path: Path, what: str) -> dict:
    try:
        value = json.loads(path.read_text("utf-8"))
    except (OSError, ValueError) as error:
        raise InputError(f"{what} {str(path)!r} is not readable JSON ({error}); save the folder again") from None
    if not isinstance(value, dict):
        raise InputError(f"{what} {str(path)!r} must hold a JSON object")
    return value


def _component(pipeline_dir: Path, index: dict, kind: str | None) -> tuple[str, Path]:
    """(kind, model folder) of a pipeline folder, from its model_index.json."""
    found = [k for k, (folder, cls) in COMPONENTS.items() if isinstance(index.get(folder), list) and cls in index[folder]]
    if kind is None:
        if len(found) != 1:
            known = ", ".join(f"{folder}/ {cls}" for folder, cls in COMPONENTS.values())
            raise InputError(
                f"pipeline {str(pipeline_dir)!r} ({index.get('_class_name')}) has no component unlearning trains ({known}); "
                "set model.kind and point model.path at the model folder"
            )
        kind = found[0]
    folder = COMPONENTS[kind][0]
    if kind not in found or not (pipeline_dir / folder).is_dir():
        raise InputError(
            f"pipeline {str(pipeline_dir)!r} has no {folder}/ folder with a {COMPONENTS[kind][1]}; check model.kind "
            f"({kind!r}) or point model.path at the model folder itself"
        )
    return kind, pipeline_dir / folder


def _check_model_folder(model_dir: Path, kind: str) -> None:
    cls = COMPONENTS[kind][1]
    config_file = model_dir / "config.json"
    if not config_file.is_file():
        raise InputError(
            f"model.path {str(model_dir)!r} is not a {cls} folder (no file named config.json in it); give the folder "
            "that save_pretrained wrote (with config.json and the weights), or a pipeline folder with model_index.json"
        )
    name = _read_json(config_file, "model config").get("_class_name")
    if name is not None and name != cls:
        raise InputError(f"model.path {str(model_dir)!r} holds a {name}, not a {cls}; check model.kind ({kind!r})")


def _scheduler_config(base_dir: Path, spec: dict, pipeline_dir: Path | None, model_dir: Path, kind: str) -> dict | None:
    """The scheduler config: model.scheduler, else the pipeline's scheduler/ folder."""
    if spec.get("scheduler"):
        path = job_path(base_dir, spec["scheduler"], "model.scheduler")
        path = path / "scheduler_config.json" if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"model.scheduler {str(path.parent)!r} has no scheduler_config.json; give the scheduler folder "
                             "a pipeline's save_pretrained wrote (or the scheduler_config.json file)")  # fmt: skip
        return _read_json(path, "model.scheduler")
    if pipeline_dir is not None and (pipeline_dir / "scheduler" / "scheduler_config.json").is_file():
        return _read_json(pipeline_dir / "scheduler" / "scheduler_config.json", "the pipeline's scheduler config")
    if kind not in FLOW_KINDS:
        raise InputError(
            f"no noise schedule for the UNet at {str(model_dir)!r}: add \"scheduler\": \"path/to/scheduler\" (the folder "
            "with scheduler_config.json) to the job's model section, or give the pipeline folder (model_index.json, "
            "unet/, scheduler/) as model.path"
        )
    return None


def _ddpm_scheduler(config: dict):
    """A DDPMScheduler with the config's betas (DDIM, PNDM and kin share these fields)."""
    from diffusers import DDPMScheduler

    accepted = set(inspect.signature(DDPMScheduler.__init__).parameters) - {"self"}
    try:
        return DDPMScheduler(**{key: value for key, value in config.items() if key in accepted})
    except (TypeError, ValueError, NotImplementedError) as error:
        raise InputError(f"the UNet's scheduler config cannot be read as a DDPM schedule ({error})") from None


def _unet_clip(config: dict, kind: str) -> float | None:
    scheduler = _ddpm_scheduler(config).config  # its defaults for fields the file leaves out
    if scheduler.prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(
            f"the UNet's schedule predicts {scheduler.prediction_type!r}; unlearning trains epsilon- and v-prediction "
            "UNets (prediction_type epsilon or v_prediction)"
        )
    if kind == "unet_cond" and not (config.get("clip_sample") or config.get("thresholding")):
        # SD/SDXL pipelines' schedulers (PNDM, Euler, DDIM with clip_sample false) leave latents
        # unclipped; DDPMScheduler's default clip_sample=True would clamp them to +-1
        return None
    if scheduler.thresholding:
        log.warning("the schedule uses dynamic thresholding, which this sampler does not reproduce; samples are clipped "
                    "to +-%s (sample_max_value) instead", scheduler.sample_max_value)  # fmt: skip
        return float(scheduler.sample_max_value)
    return float(scheduler.clip_sample_range) if scheduler.clip_sample else None


def dynamic_shift(config: dict, latent_size: tuple[int, int]) -> float:
    r"""The shift k (of s = k u / (1 + (k - 1) u)) a pipeline uses for latents of ``latent_size``
    when its scheduler has ``use_dynamic_shifting`` (Flux.1 dev, Qwen-Image).

    As FluxPipeline / QwenImagePipeline (diffusers' ``calculate_shift``; StableDiffusion3Pipeline
    counts its 2x2 patches alike): mu is linear in the number of image tokens, (H/2)(W/2), through
    (base_image_seq_len, base_shift) and (max_image_seq_len, max_shift); the scheduler's time shift
    exp(mu) / (exp(mu) + 1/s - 1) is the shift above with k = exp(mu) (``time_shift_type``
    "exponential", the default), and mu / (mu + 1/s - 1) has k = mu ("linear"). ``shift_terminal``
    (Qwen-Image) only stretches the pipeline's inference grid and does not enter training; the
    core's sampler keeps its own grid down to 0.
    """
    fields = {key: config.get(key, default) for key, default in DYNAMIC_SHIFT_DEFAULTS.items()}
    tokens = (latent_size[0] // 2) * (latent_size[1] // 2)
    slope = (fields["max_shift"] - fields["base_shift"]) / (fields["max_image_seq_len"] - fields["base_image_seq_len"])
    mu = fields["base_shift"] + slope * (tokens - fields["base_image_seq_len"])
    if config.get("time_shift_type", "exponential") == "linear":
        if mu <= 0:
            raise InputError(f"the scheduler's linear dynamic shift gives mu={mu:.4g} at {latent_size[0]}x{latent_size[1]} "
                             "latents, which is no shift; give model.shift")  # fmt: skip
        return float(mu)
    return math.exp(mu)


def _check_dynamic_shift(config: dict) -> None:
    for key in DYNAMIC_SHIFT_DEFAULTS:
        value = config.get(key, 0)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise InputError(f"the scheduler config's {key}={value!r} must be a number (use_dynamic_shifting reads it); "
                             "fix scheduler_config.json or give model.shift")  # fmt: skip
    if config.get("max_image_seq_len", 4096) == config.get("base_image_seq_len", 256):
        raise InputError("the scheduler config's base_image_seq_len and max_image_seq_len are equal, so its dynamic shift "
                         "is undefined; fix scheduler_config.json or give model.shift")  # fmt: skip
    if config.get("time_shift_type", "exponential") not in ("exponential", "linear"):
        raise InputError(f"the scheduler config's time_shift_type={config.get('time_shift_type')!r} is neither "
                         "'exponential' nor 'linear'; fix scheduler_config.json or give model.shift")  # fmt: skip


def _flow_shift(spec: dict, config: dict | None, kind: str, model_dir: Path) -> tuple[float | None, dict | None]:
    """(the fixed shift or None, the scheduler config when the shift depends on the resolution)."""
    given = spec.get("shift")
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int | float) or not (math.isfinite(given) and 0.01 <= given <= 100):
            raise InputError(f"model.shift={given!r} is outside [0.01, 100.0]; give a value in that range")
        given = float(given)
    if config is not None and config.get("use_dynamic_shifting"):
        if given is not None:
            log.warning("model.shift=%s overrides the pipeline scheduler's resolution-dependent shift", given)
            return given, None
        _check_dynamic_shift(config)
        return None, config
    if config is not None:
        found = float(config.get("shift", 1.0))
        if given is not None and given != found:
            log.warning("model.shift=%s overrides the pipeline scheduler's shift %s", given, found)
        return (given if given is not None else found), None
    if given is not None:
        return given, None
    if kind == "sd3":
        log.info("no scheduler config beside the transformer: using SD3's shift %s (set model.shift to change it)",
                 SD3_DEFAULT_SHIFT)  # fmt: skip
        return SD3_DEFAULT_SHIFT, None
    raise InputError(
        f"no scheduler config for the {COMPONENTS[kind][1]} at {str(model_dir)!r}, so its shift is unknown: give the "
        "pipeline folder (model_index.json, transformer/, scheduler/) as model.path, or add \"scheduler\": "
        "\"path/to/scheduler\" or \"shift\" to the job's model section"
    )


def _clip(spec: dict, default: float | None) -> float | None:
    if "clip" not in spec:
        return default
    value = spec["clip"]
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not (math.isfinite(value) and value > 0):
        raise InputError(f"model.clip={value!r} must be a positive number (the x0 clamp while sampling) or null for none")
    return float(value)


def locate(spec, base_dir: Path) -> ModelSource:
    """Check the job's model section against the folders on disk; read configs only."""
    if not isinstance(spec, dict):
        raise InputError(f"the job's 'model' must be a JSON object, got {type(spec).__name__}")
    unknown = sorted(set(spec) - MODEL_KEYS)
    if unknown:
        raise InputError(f"unknown model keys {unknown}; known: {sorted(MODEL_KEYS)}")
    kind = spec.get("kind")
    if kind is not None and kind not in MODEL_KINDS:
        raise InputError(f"model.kind must be one of {', '.join(MODEL_KINDS)}, got {kind!r}")
    path = job_path(base_dir, spec.get("path"), "model.path")
    pipeline_dir = None
    if (path / "model_index.json").is_file():
        pipeline_dir = path
        kind, model_dir = _component(path, _read_json(path / "model_index.json", "model_index.json"), kind)
    else:
        model_dir = path
        if (path.parent / "model_index.json").is_file():  # a model folder inside a pipeline: its schedule is beside it
            pipeline_dir = path.parent
        if kind is None:
            raise InputError(f"model.kind must be one of {', '.join(MODEL_KINDS)} (or point model.path at a pipeline "
                             "folder), got None")  # fmt: skip
    _check_model_folder(model_dir, kind)
    config = _scheduler_config(base_dir, spec, pipeline_dir, model_dir, kind)
    if kind not in FLOW_KINDS:
        if spec.get("shift") is not None:
            raise InputError(f"model.shift shifts a rectified flow; a {kind} model's noise levels come from its DDPM "
                             "schedule: remove shift from the job's model section")  # fmt: skip
        return ModelSource(kind, model_dir, config, None, _clip(spec, _unet_clip(config, kind)))
    shift, dynamic_config = _flow_shift(spec, config, kind, model_dir)
    return ModelSource(kind, model_dir, dynamic_config, shift, _clip(spec, None))


def _load_pretrained(source: ModelSource) -> torch.nn.Module:
    import diffusers

    cls = getattr(diffusers, COMPONENTS[source.kind][1])
    try:
        model = cls.from_pretrained(str(source.model_dir))
    except (OSError, ValueError, TypeError, KeyError) as error:  # diffusers' errors for a folder it cannot read
        raise InputError(
            f"model.path {str(source.model_dir)!r} is not a {cls.__name__} folder ({error}); give the folder that "
            "save_pretrained wrote (with config.json and the weights)"
        ) from None
    return model.eval().requires_grad_(False)


def fingerprint(folder: Path) -> dict[str, str]:
    """sha256 of every file in a model folder (the audit record's proof of which weights ran)."""
    return {path.relative_to(folder).as_posix(): file_sha256(path) for path in sorted(folder.rglob("*")) if path.is_file()}


def load(source: ModelSource, device: str = "cpu") -> LoadedModel:
    model = _load_pretrained(source).to(device)
    return LoadedModel(source, model, fingerprint(source.model_dir))


class ModelCache:
    """Keeps the last loaded network, so a worker loads a base model once for many jobs.

    Training never changes the cached network (a LoRA is removed after each job, full
    fine-tuning trains a copy), so a cached model gives the same results as a fresh load.
    """

    def __init__(self, device: str = "cpu"):
        self.device = device
        self.loads = 0
        self._key = None
        self._loaded: LoadedModel | None = None

    def get(self, source: ModelSource) -> tuple[LoadedModel, bool]:
        """(the loaded model, whether this call loaded it)."""
        files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in source.model_dir.iterdir() if p.is_file())
        key = (source.kind, str(source.model_dir.resolve()), tuple(files))  # replaced weights load again
        if self._loaded is not None and self._key == key:  # same weights; this job's schedule and clip
            return LoadedModel(source, self._loaded.model, self._loaded.fingerprint), False
        self._loaded = None  # free the previous model before loading the next
        self._loaded = load(source, self.device)
        self._key = key
        self.loads += 1
        log.info("loaded %s from %s (load %d of this worker)", source.kind, source.model_dir, self.loads)
        return self._loaded, True
