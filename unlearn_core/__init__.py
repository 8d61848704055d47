"""Prompt-free instance unlearning for diffusion models, as a plain library.

The data walk: marked output -> forget set -> surrogate -> trainer -> LoRA file -> preserve check.

Public API (what the ComfyUI nodes and the CLI call):

- :class:`UnlearnConfig`: every training knob, validated.
- :class:`ForgetTargets`, :class:`RememberSet`, :class:`UnlearnData`: what to forget and keep.
- :class:`RectifiedFlow`, :class:`DDPMEpsilon`: forward processes (SD3 flow, epsilon DDPM).
- :func:`train_unlearning`: the loop over any :class:`Denoiser`.
- :func:`unlearn_diffusers`, :func:`lora_attached`: diffusers models (SD3, Flux, Qwen-Image transformers;
  SD1.5 / SDXL and pixel UNets).
- :func:`build_surrogate`, :class:`DenoiserSampler`: surrogates through any :class:`Sampler` (the core's
  over a denoiser, or a host's).
- :func:`save_lora`, :func:`load_lora`, :func:`to_mmdit`, :func:`to_diffusers`: LoRA files and formats.
- :mod:`unlearn_core.verify.metrics`: SSIM, PSNR, LPIPS (or Unavailable), copy similarity.
- :mod:`unlearn_core.verify.preserve`: the preserve check the nodes and the demo run (forgetting by copy
  similarity once the base model reproduces the target; integrity on held-out seeds).
"""

from . import old_paths
from .data.sets import ForgetTargets, RememberSet, UnlearnData
from .data.surrogate import build_surrogate
from .diffusion.denoiser import Denoiser
from .diffusion.process import DDPMEpsilon, ForwardProcess, RectifiedFlow
from .diffusion.sampling import DenoiserSampler, Sampler
from .errors import InputError, TrainingDiverged, TrainingStopped, UnlearnError
from .formats.lora import LoraLayer, LoraWeights, load_lora, save_lora, to_diffusers, to_mmdit
from .method.config import UnlearnConfig
from .method.trainer import TrainResult, train_unlearning
from .version import __version__

old_paths.install(__name__)

__all__ = [
    "UnlearnConfig",
    "ForgetTargets",
    "RememberSet",
    "UnlearnData",
    "Denoiser",
    "InputError",
    "TrainingDiverged",
    "TrainingStopped",
    "UnlearnError",
    "LoraLayer",
    "LoraWeights",
    "load_lora",
    "save_lora",
    "to_diffusers",
    "to_mmdit",
    "DDPMEpsilon",
    "ForwardProcess",
    "RectifiedFlow",
    "build_surrogate",
    "DenoiserSampler",
    "Sampler",
    "TrainResult",
    "train_unlearning",
    "__version__",
]
