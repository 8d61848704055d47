"""Find the trainable network and its noise schedule in a diffusers folder, then load them.

A job's ``model`` section names one of:

- a pipeline folder (``model_index.json`` with ``unet/`` or ``transformer/`` and ``scheduler/``,
  as ``DDPMPipeline.save_pretrained`` or ``StableDiffusion3Pipeline.save_pretrained`` write it):
  the network and its schedule are both found inside;
- a model folder inside such a pipeline (``pipeline/unet``): the schedule is its sibling
  ``scheduler/``;
- a lone model folder (``config.json`` and weights) with ``"scheduler": "path"`` naming a folder
  with ``scheduler_config.json`` (or that file).

An epsilon UNet without a findable schedule is refused: the beta schedule decides every noise
level, and a guessed one (linear betas for a cosine model) trains towards the wrong targets
without any error. SD3 transformers take the pipeline's ``shift`` when there is a scheduler
config, else ``model.shift`` or SD3's 3.0.

Sampling clips x0 exactly as the model's own scheduler does (``clip_sample`` and
``clip_sample_range``), unless ``model.clip`` says otherwise (a number, or null for none).

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

from .errors import InputError
from .files import file_sha256
from .process import DDPMEpsilon, DDPMVelocity, ForwardProcess, RectifiedFlow

__all__ = ["ModelSource", "LoadedModel", "ModelCache", "locate", "load", "MODEL_KINDS", "COMPONENTS"]

log = logging.getLogger(__name__)

MODEL_KINDS = ("sd3", "unet")
#: kind -> (the pipeline's component folder, the diffusers class)
COMPONENTS = {"sd3": ("transformer", "SD3Transformer2DModel"), "unet": ("unet", "UNet2DModel")}
MODEL_KEYS = {"path", "kind", "shift", "scheduler", "clip"}
SD3_DEFAULT_SHIFT = 3.0


@dataclass(frozen=True)
class ModelSource:
    """Where a job's network and schedule are, and how to sample from them (nothing loaded)."""

    kind: str
    model_dir: Path
    scheduler_config: dict | None  # the epsilon or v schedule (unet); None for sd3
    shift: float | None  # sd3 only
    clip: float | None  # x0 clamp while sampling, as the model's own sampler does

    def process(self, device: str | torch.device = "cpu") -> ForwardProcess:
        """The forward process; an epsilon schedule's table lives on ``device``, where the noise
        levels it is indexed with are."""
        if self.kind == "sd3":
            return RectifiedFlow(shift=self.shift)
        scheduler = _ddpm_scheduler(self.scheduler_config)
        kind = DDPMVelocity if scheduler.config.prediction_type == "v_prediction" else DDPMEpsilon
        return kind(scheduler.alphas_cumprod.to(device))

    def describe(self) -> dict:
        """What the audit record says about the base model."""
        return {"kind": self.kind, "folder": str(self.model_dir), "shift": self.shift, "clip": self.clip,
                "schedule": self.scheduler_config}  # fmt: skip


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


def _resolve(base_dir: Path, value, what: str) -> Path:
    if not value or not isinstance(value, str):
        raise InputError(f"the job needs {what} (a folder path)")
    path = Path(value)
    path = path if path.is_absolute() else base_dir / path
    if not path.exists():
        raise InputError(f"{what} {str(path)!r} does not exist")
    return path


def _component(pipeline_dir: Path, index: dict, kind: str | None) -> tuple[str, Path]:
    """(kind, model folder) of a pipeline folder, from its model_index.json."""
    found = [k for k, (folder, cls) in COMPONENTS.items() if isinstance(index.get(folder), list) and cls in index[folder]]
    if kind is None:
        if len(found) != 1:
            raise InputError(
                f"pipeline {str(pipeline_dir)!r} ({index.get('_class_name')}) has no unet (UNet2DModel) or transformer "
                "(SD3Transformer2DModel) component; set model.kind and point model.path at the model folder"
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
        path = _resolve(base_dir, spec["scheduler"], "model.scheduler")
        path = path / "scheduler_config.json" if path.is_dir() else path
        if not path.is_file():
            raise InputError(f"model.scheduler {str(path.parent)!r} has no scheduler_config.json; give the scheduler folder "
                             "a pipeline's save_pretrained wrote (or the scheduler_config.json file)")  # fmt: skip
        return _read_json(path, "model.scheduler")
    if pipeline_dir is not None and (pipeline_dir / "scheduler" / "scheduler_config.json").is_file():
        return _read_json(pipeline_dir / "scheduler" / "scheduler_config.json", "the pipeline's scheduler config")
    if kind == "unet":
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


def _unet_clip(config: dict) -> float | None:
    scheduler = _ddpm_scheduler(config).config  # its defaults for fields the file leaves out
    if scheduler.prediction_type not in ("epsilon", "v_prediction"):
        raise InputError(
            f"the UNet's schedule predicts {scheduler.prediction_type!r}; unlearning trains epsilon- and v-prediction "
            "UNets (prediction_type epsilon or v_prediction)"
        )
    if scheduler.thresholding:
        log.warning("the schedule uses dynamic thresholding, which this sampler does not reproduce; samples are clipped "
                    "to +-%s (sample_max_value) instead", scheduler.sample_max_value)  # fmt: skip
        return float(scheduler.sample_max_value)
    return float(scheduler.clip_sample_range) if scheduler.clip_sample else None


def _sd3_shift(spec: dict, config: dict | None) -> float:
    given = spec.get("shift")
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int | float) or not (math.isfinite(given) and 0.01 <= given <= 100):
            raise InputError(f"model.shift={given!r} is outside [0.01, 100.0]; give a value in that range")
    if config is not None:
        if config.get("use_dynamic_shifting"):
            raise InputError("the pipeline's scheduler shifts its schedule by image size (use_dynamic_shifting), which "
                             "the SD3 path does not reproduce; give model.shift for your resolution")  # fmt: skip
        found = float(config.get("shift", 1.0))
        if given is not None and float(given) != found:
            log.warning("model.shift=%s overrides the pipeline scheduler's shift %s", given, found)
        return float(given) if given is not None else found
    if given is None:
        log.info("no scheduler config beside the transformer: using SD3's shift %s (set model.shift to change it)",
                 SD3_DEFAULT_SHIFT)  # fmt: skip
        return SD3_DEFAULT_SHIFT
    return float(given)


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
        raise InputError(f"model.kind must be 'sd3' or 'unet', got {kind!r}")
    path = _resolve(base_dir, spec.get("path"), "model.path")
    pipeline_dir = None
    if (path / "model_index.json").is_file():
        pipeline_dir = path
        kind, model_dir = _component(path, _read_json(path / "model_index.json", "model_index.json"), kind)
    else:
        model_dir = path
        if (path.parent / "model_index.json").is_file():  # a model folder inside a pipeline: its schedule is beside it
            pipeline_dir = path.parent
        if kind is None:
            raise InputError("model.kind must be 'sd3' or 'unet' (or point model.path at a pipeline folder), got None")
    _check_model_folder(model_dir, kind)
    config = _scheduler_config(base_dir, spec, pipeline_dir, model_dir, kind)
    if kind == "unet":
        return ModelSource("unet", model_dir, config, None, _clip(spec, _unet_clip(config)))
    return ModelSource("sd3", model_dir, None, _sd3_shift(spec, config), _clip(spec, None))


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
