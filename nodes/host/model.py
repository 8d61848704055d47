"""A loaded ComfyUI model as the nodes use it: one object that holds the ModelPatcher, so that a node
hands ComfyUI's model to the host once instead of to a function per step."""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager
from typing import TYPE_CHECKING

import torch

from ...unlearn_core.diffusion.denoiser import Conditioning
from ...unlearn_core.formats.lora import LoraWeights, state_dict_for
from ...unlearn_core.method.config import UnlearnConfig
from .adapters import LoraTraining, lora_training, with_lora
from .conditioning import conditioning_tensors
from .family import HostProcess, lora_target_names, model_family, model_name, training_process
from .latents import process_latent_in
from .sampling import HostSampler, invert_to_noise, replay_prompt, sampling_noise
from .vae import encode

if TYPE_CHECKING:
    from ..targets import UnlearnTargets

log = logging.getLogger(__name__)


class HostModel:
    """A ComfyUI MODEL (a ModelPatcher): which family it is, how it noises and samples, latents and
    conditioning in the network's terms, the noise each target was made from, a LoRA trained on a
    clone of it, and the model with a LoRA applied (with those two, the core's
    :class:`~unlearn_core.method.lora_run.TrainableModel`). The patcher itself is never changed."""

    def __init__(self, patcher):
        self.patcher = patcher

    def family(self) -> str:
        """'flow', 'eps' or 'v'; an unsupported model is refused with the reason."""
        return model_family(self.patcher)

    @property
    def name(self) -> str:
        """A stable description for provenance (class, type, size)."""
        return model_name(self.patcher)

    def lora_targets(self, rank: int, target_modules: tuple[str, ...] | None) -> set[str]:
        """The layers that get a LoRA; refuses a rank a layer cannot hold, or no match (cheap: no
        weights are touched)."""
        return lora_target_names(self.patcher, rank, target_modules)

    def training_process(self) -> HostProcess:
        """The model's own noising behind the core's process interface (the graph's sampling shift included)."""
        return training_process(self.patcher)

    def sampler(self, network_space: bool = False) -> HostSampler:
        """ComfyUI's KSampler on this model as the core's Sampler: raw LATENT samples in and out, or
        the network's space with ``network_space``."""
        return HostSampler(self.patcher, network_space)

    def network_latents(self, samples: torch.Tensor) -> torch.Tensor:
        """Raw LATENT samples (B, C, h, w) in the space the network denoises."""
        return process_latent_in(self.patcher, samples)

    def conditioning_tensors(self, positive, n: int, latent: torch.Tensor) -> Conditioning:
        """A CONDITIONING as the model's keyword tensors for ``n`` samples like ``latent``."""
        return conditioning_tensors(self.patcher, positive, n, latent)

    def target_noises(self, targets: UnlearnTargets, steps: int, vae=None) -> tuple[torch.Tensor, list[dict]]:
        """The noise each target was sampled from, and where it came from: its recorded seed (with a
        full denoise), else recovered by inverting ComfyUI's sampler (an image loaded into ComfyUI, or
        an output made from an input image, which did not start from its seed's noise) with its replay
        prompt and ``steps`` where it recorded none. Whether the noise reproduces its target is the
        forgetting check's baseline (``verifiable``). A target without its latent is encoded with
        ``vae`` first."""
        noises, sources = [], []
        for target in targets.targets:
            seed, denoise = target.provenance.get("seed"), target.provenance.get("denoise")
            latent = target.latent if target.latent is not None else encode(vae, target.image[None])[0]
            if seed is not None and (denoise is None or float(denoise) >= 1.0):
                batch_index = int(target.provenance.get("batch_index", 0) or 0)
                noises.append(sampling_noise(self.patcher, tuple(latent.shape), int(seed), batch_index))
                sources.append({"source": "seed", "seed": int(seed), "batch_index": batch_index})
                continue
            prompt = replay_prompt(target.provenance, target.conditioning, target.negative, steps)
            noises.append(invert_to_noise(self.patcher, prompt, latent[None].float())[0])
            sources.append({"source": f"recovered by inverting the sampler ({prompt.scheduler}, {prompt.steps} steps, cfg {prompt.cfg:g})",
                            "why": "no recorded seed" if seed is None else f"made at denoise {float(denoise):g}"})  # fmt: skip
            log.info("target %s: no seed that made it (%s), its noise is %s", target.id, sources[-1]["why"], sources[-1]["source"])
        return torch.stack(noises), sources

    def lora_training(self, config: UnlearnConfig, process: HostProcess) -> AbstractContextManager[LoraTraining]:
        """A fresh LoRA on a loaded clone, as ``config`` sets it up; the model is left exactly as it
        was, whatever happens inside the block (see :mod:`.adapters`)."""
        return lora_training(self.patcher, config, process)

    def with_lora(self, weights: LoraWeights):
        """A clone of the model with ``weights`` applied the way the stock LoRA loaders apply a file."""
        return self.with_lora_model(state_dict_for(weights, "comfy"))

    def with_lora_model(self, lora: dict[str, torch.Tensor]):
        """A clone of the model with a LORA_MODEL (a LoRA file's tensors) applied as the stock loaders do."""
        return with_lora(self.patcher, lora)
