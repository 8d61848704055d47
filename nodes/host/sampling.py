"""ComfyUI's own sampling: KSampler as the core's Sampler, the prompt that replays a recorded
output, the noise a seed gave, and the noise recovered by inverting the sampler."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import comfy.sample
import comfy.samplers
import torch

from .conditioning import zero_conditioning
from .latents import image_latent, model_latent, process_latent_in, process_latent_out

SAMPLERS = comfy.samplers.KSampler.SAMPLERS
SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS


def ksample(
    patcher, seed: int, steps: int, cfg: float, sampler: str, scheduler: str, positive, negative,
    latent: torch.Tensor, denoise: float = 1.0, noise_mask: torch.Tensor | None = None, batch_index: int = 0,
) -> torch.Tensor:  # fmt: skip
    """ComfyUI's KSampler on raw LATENT samples; returns raw samples (as KSampler does).

    ``batch_index`` picks the noise that image had in its original batch (KSampler draws one
    noise tensor per batch from the seed), so a marked image can be regenerated exactly.
    """
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed, [batch_index] * len(latent) if batch_index else None)
    return image_latent(comfy.sample.sample(
        patcher, noise, steps, cfg, sampler, scheduler, positive, negative or zero_conditioning(positive),
        latent, denoise=denoise, noise_mask=noise_mask, disable_pbar=True, seed=seed,
    ))  # fmt: skip


def ksample_from_noise(patcher, prompt: HostPrompt, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """ComfyUI's sampler from a given initial ``noise`` (B, C, h, w) rather than a seed's: the
    forgetting check's nearby probes. With the seed's own noise it is :func:`ksample` exactly."""
    noise = model_latent(patcher, noise)
    return image_latent(comfy.sample.sample(
        patcher, noise, prompt.steps, prompt.cfg, prompt.sampler_name, prompt.scheduler, prompt.positive,
        prompt.negative or zero_conditioning(prompt.positive), torch.zeros_like(noise), denoise=1.0, disable_pbar=True, seed=seed,
    )).float()  # fmt: skip


def invert_to_noise(patcher, prompt: HostPrompt, latent: torch.Tensor, refine: int = 3) -> torch.Tensor:
    """The initial noise (B, C, h, w) from which ComfyUI's Euler sampler, with ``prompt``'s
    scheduler, steps, cfg and conditionings, makes the raw LATENT samples ``latent``: its sigma
    schedule walked backwards, for a target whose seed is unknown (an image loaded into ComfyUI).

    The walk runs inside ComfyUI's own sampling (as a custom sampler over the reversed
    schedule), so the guided prediction is the one the sampler uses: cfg, negative, model
    patches. Each backward step is the usual inversion guess, corrected ``refine`` times by the
    fixed-point iteration of :func:`~unlearn_core.diffusion.sampling.invert` (an exact inverse of the
    Euler step makes the step back land on where the walk came from). Another sampler, or a
    latent the model did not make, gives a noise that may not reproduce it: the forgetting
    check's baseline says so.
    """
    sampling = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, prompt.scheduler, prompt.steps).cpu()
    reached: list[torch.Tensor] = []

    def walk_back(model, x, up, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}

        def slope(x, sigma):  # the Euler sampler's d = (x - denoised) / sigma
            return (x - model(x, sigma * x.new_ones([len(x)]), **extra_args)) / sigma

        for sigma, sigma_next in zip(up[:-1], up[1:], strict=True):
            # the clean end has no slope of its own: the first guess takes the one at the next level
            guess = x + slope(x, sigma if float(sigma) > 0 else sigma_next) * (sigma_next - sigma)
            for _ in range(refine):
                guess = guess + (x - (guess + slope(guess, sigma_next) * (sigma - sigma_next)))
            x = guess
        reached.append(x.float())
        return x

    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    comfy.sample.sample_custom(
        patcher, torch.zeros_like(latent), prompt.cfg, comfy.samplers.KSAMPLER(walk_back), sigmas.flip(0), prompt.positive,
        prompt.negative or zero_conditioning(prompt.positive), latent, disable_pbar=True, seed=0,
    )  # fmt: skip
    # ComfyUI starts a full denoise from noise_scaling(sigma_max, noise, 0): the reached level over that scale
    scale = sampling.noise_scaling(sigmas[:1].float(), torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), max_denoise=True)
    return image_latent(reached[0].cpu() / scale.reshape(1, 1, 1, 1)).float()


#: how a target with no recorded sampler settings is regenerated
DEFAULT_SAMPLING = {"steps": 20, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform"}


@dataclass(frozen=True)
class HostPrompt:
    """What an output was sampled with in ComfyUI: both conditionings, the KSampler settings and
    the image's place in its batch (which noise of the seed it had)."""

    positive: list
    negative: list | None
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    batch_index: int = 0


def replay_prompt(provenance: dict, positive, negative, steps: int, batch_index: int = 0) -> HostPrompt:
    """The prompt that samples like a recorded output (its settings, from its provenance); ``steps``
    (and the defaults) where it has none recorded, or names this ComfyUI does not know.
    ``batch_index`` is the output's place in its batch: give it to replay that very output; other
    seeds are sampled as images 0 of their batch."""
    settings = dict(DEFAULT_SAMPLING, steps=steps)
    known = {"sampler_name": SAMPLERS, "scheduler": SCHEDULERS}
    for key in ("steps", "cfg", "sampler_name", "scheduler"):
        value = provenance.get(key)
        if value is not None and (key not in known or value in known[key]):
            settings[key] = value
    return HostPrompt(positive, negative, int(settings["steps"]), float(settings["cfg"]), settings["sampler_name"],
                      settings["scheduler"], batch_index)  # fmt: skip


class HostSampler:
    """ComfyUI's KSampler on a ModelPatcher as the core's :class:`~unlearn_core.diffusion.sampling.Sampler`
    (prompts are :class:`HostPrompt`). Latents in and out are raw LATENT samples, as KSampler's; with
    ``network_space`` they are in the space the network denoises, the trainer's, so that what the
    core generates through it (the remember set) is ready to train on."""

    def __init__(self, patcher, network_space: bool = False):
        self.patcher = patcher
        self.network_space = network_space

    def generate(self, prompt: HostPrompt, seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        empty = torch.zeros(1, *shape)
        return self._out(torch.cat([self._sample(prompt, int(seed), empty) for seed in seeds]))

    def generate_from_noise(self, prompt: HostPrompt, noise: torch.Tensor) -> torch.Tensor:
        return self._out(torch.cat([ksample_from_noise(self.patcher, prompt, row[None], 0) for row in noise]))

    def edit(self, prompt: HostPrompt, image: torch.Tensor, strength: float, seed: int,
             mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        raw = process_latent_out(self.patcher, image) if self.network_space else image
        return self._out(self._sample(prompt, int(seed), raw, denoise=strength, noise_mask=mask))

    def _sample(self, prompt: HostPrompt, seed: int, latent: torch.Tensor, **kwargs) -> torch.Tensor:
        return ksample(self.patcher, seed, prompt.steps, prompt.cfg, prompt.sampler_name, prompt.scheduler,
                       prompt.positive, prompt.negative, latent, batch_index=prompt.batch_index, **kwargs).float()  # fmt: skip

    def _out(self, samples: torch.Tensor) -> torch.Tensor:
        return process_latent_in(self.patcher, samples) if self.network_space else samples


def sampling_noise(patcher, shape: tuple[int, ...], seed: int, batch_index: int = 0) -> torch.Tensor:
    """The noise (C, h, w) KSampler started image ``batch_index`` of a batch from ``seed`` with
    (what :func:`ksample` draws to replay it)."""
    latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(1, *shape))
    return image_latent(comfy.sample.prepare_noise(latent, seed, [batch_index] if batch_index else None))[0].float()
