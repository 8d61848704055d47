"""Instance Unlearn LoRA's run on a ComfyUI model: what ComfyUI makes of the targets first, then the core.

1. ComfyUI's half (:meth:`LoraUnlearning._host_inputs`): each target's latent and surrogate in the
   space the network denoises, its conditioning tensors, the noise it was sampled from (its seed's,
   or recovered by inverting the sampler) and the prompt that replays it; a given remember set in
   the network's space with its conditioning; what verified stopping replays each target with;
2. the core's half: the remember set generated under the seed rule
   (:func:`~unlearn_core.data.remember.generate_remember`), the training data, verified stopping's
   check, the trainer, and the file metadata.

Where the core needs ComfyUI during its half it calls back through the core's own interfaces: the
sampler (:class:`~.sampling.HostSampler` in the network's space, a Sampler), the denoiser
(:class:`~.adapters.PatcherDenoiser`, a Denoiser) and the check's regeneration
(:class:`TargetRegeneration`, a Regenerate). Two of ComfyUI's steps on the model itself must come
between the core's: the LoRA clone is loaded only once the base model has sampled the remember set
(a loaded clone would be unloaded by that sampling), and the trained LoRA is read from the clone
and applied to the model once the trainer returns.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ...unlearn_core.data.remember import RememberRequest, generate_remember, split_count
from ...unlearn_core.data.seeds import target_seed
from ...unlearn_core.data.sets import ForgetTargets, RememberSet, UnlearnData
from ...unlearn_core.diffusion.denoiser import Conditioning, concat
from ...unlearn_core.errors import InputError
from ...unlearn_core.formats.files import tensor_hash
from ...unlearn_core.formats.lora import LoraWeights, reproduction_metadata, state_dict_for
from ...unlearn_core.method.config import UnlearnConfig
from ...unlearn_core.method.stopping import ForgettingCheck
from ...unlearn_core.method.trainer import TrainResult, train_unlearning
from ...unlearn_core.verify.metrics import CopyDetector
from .. import images
from .model import HostModel
from .sampling import HostPrompt, HostSampler, ksample_from_noise, replay_prompt
from .vae import decoder

if TYPE_CHECKING:
    from ..targets import UnlearnTargets

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RememberInputs:
    """The node's remember inputs: ``count`` outputs generated with the targets' own prompts (other
    seeds, ``steps`` sampler steps where a target recorded none), unless a LATENT is given, which
    replaces generation, with its ``conditioning`` (else the first target's)."""

    count: int
    steps: int
    latent: dict | None = None
    conditioning: list | None = None

    @property
    def given(self) -> torch.Tensor | None:
        """The given remember set's raw LATENT samples, if any."""
        return None if self.latent is None else self.latent["samples"].float()


@dataclass(frozen=True)
class CheckInputs:
    """Verified stopping's judge: the VAE that decodes each regeneration (without one nothing is
    checked), the copy detector and the copy similarity below which a target is gone."""

    vae: object | None
    detector: CopyDetector
    forget_threshold: float


@dataclass
class UnlearnedLora:
    """A finished run: the LoRA as the core's weights and as LORA_MODEL, the model with it applied,
    the trainer's result (its verification names each target's noise) and the file metadata that
    reproduces the run."""

    weights: LoraWeights
    lora: dict[str, torch.Tensor]
    model_with_lora: object
    result: TrainResult
    metadata: dict[str, str]


@dataclass(frozen=True)
class TargetRegeneration:
    """Verified stopping's :data:`~unlearn_core.method.stopping.Regenerate` on ComfyUI: each probe's
    noise sampled by ``patcher`` (the clone in training) under its target's replay prompt and seed,
    decoded into the core's images."""

    patcher: object
    prompts: list[HostPrompt]
    seeds: list[int]
    to_images: Callable[[torch.Tensor], torch.Tensor]

    def __call__(self, noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        latents = [ksample_from_noise(self.patcher, self.prompts[int(i)], row[None], self.seeds[int(i)])
                   for row, i in zip(noise, index, strict=True)]  # fmt: skip
        return self.to_images(torch.cat(latents))


@dataclass
class _HostInputs:
    """What ComfyUI made for a run (the first half), per target in the targets' order."""

    targets: torch.Tensor  # (N, C, h, w) in the network's space
    surrogates: torch.Tensor
    conditionings: list[Conditioning]  # one sample each
    noise: torch.Tensor  # (N, C, h, w): what each target was sampled from
    noise_sources: list[dict]
    prompts: list[HostPrompt]  # each target's prompt, which the remember set samples with
    remember: torch.Tensor | None  # a given remember set in the network's space ...
    remember_conditioning: Conditioning | None  # ... and the conditioning of each of its samples
    check: _CheckReplays | None  # what verified stopping replays each target with (None: no check)


@dataclass
class _CheckReplays:
    """Each target as verified stopping regenerates and judges it."""

    prompts: list[HostPrompt]  # its replay prompt, at its place in its batch
    seeds: list[int]
    images: torch.Tensor  # (N, 3, H, W), the core's layout
    to_images: Callable[[torch.Tensor], torch.Tensor]


class LoraUnlearning:
    """Instance Unlearn LoRA on one model with one configuration. Constructing it refuses an
    unsupported model or a rank a layer cannot hold, before any work."""

    def __init__(self, model: HostModel, config: UnlearnConfig):
        model.family()
        model.lora_targets(config.lora_rank, config.target_modules)
        self.model = model
        self.config = config

    @staticmethod
    def check_targets(targets: UnlearnTargets) -> None:
        """Refuses a forget set that training cannot use, before any work."""
        if len(targets) == 0:
            raise InputError("the forget set is empty: mark at least one output first")
        for index, target in enumerate(targets.targets):
            if target.surrogate_latent is None:
                raise InputError(f"target {index} has no surrogate: connect Build Surrogate before Instance Unlearn LoRA")
            if target.conditioning is None:
                raise InputError(
                    f"target {index} has no conditioning: connect the conditioning that produced it to Mark Undesired Output"
                )
        shapes = {tuple(t.latent.shape) for t in targets.targets}
        if len(shapes) > 1:
            raise InputError(f"targets have different latent sizes {sorted(shapes)}: unlearn each size in its own run")

    def run(self, targets: UnlearnTargets, remember: RememberInputs, check: CheckInputs, progress) -> UnlearnedLora:
        """Trains the LoRA (see the module) and applies it. ``progress`` is the node's
        :class:`~..progress.TrainingProgress`: started when training starts, told when it fails."""
        config = self.config
        host = self._host_inputs(targets, remember, check)
        process = self.model.training_process()  # one noising for the trainer and the denoiser
        remember_sampler = self.model.sampler(network_space=True)
        base_model = self.model.name
        data, remember_source = self._training_data(targets, remember, host, remember_sampler)
        progress.start()
        try:
            with torch.inference_mode(False), self.model.lora_training(config, process) as training:
                forgetting = None
                if host.check is not None:
                    regenerate = TargetRegeneration(training.clone, host.check.prompts, host.check.seeds, host.check.to_images)
                    forgetting = ForgettingCheck(regenerate, host.check.images, data.forget.noise, check.detector,
                                                 check.forget_threshold, config.check_margin, config.check_nearby,
                                                 config.seed)  # fmt: skip
                result = train_unlearning(training.denoiser, process, data, config, callback=progress, check=forgetting)
                weights = training.weights()
        except BaseException as error:
            progress.finish("failed", error=str(error) or type(error).__name__)
            raise
        result.verification["noise"] = host.noise_sources
        models = sorted({str(t.provenance.get("model")) for t in targets.targets if t.provenance.get("model")})
        metadata = reproduction_metadata(
            config, data, base_model, forget_set=targets.forget_set, target_ids=[t.id for t in targets.targets],
            surrogate_methods=[t.surrogate_method for t in targets.targets], base_model_files=models, remember=remember_source,
        )  # fmt: skip
        metadata["unlearn.verification"] = json.dumps(result.verification, sort_keys=True)
        lora = state_dict_for(weights, "comfy")  # LORA_MODEL, as SaveLoRA and LoraModelLoader take it
        return UnlearnedLora(weights, lora, self.model.with_lora(lora), result, metadata)

    @staticmethod
    def _training_data(targets: UnlearnTargets, remember: RememberInputs, host: _HostInputs,
                       sampler: HostSampler) -> tuple[UnlearnData, dict]:  # fmt: skip
        """The trainer's data from what ComfyUI made, and where its remember set came from: given,
        or generated by ``sampler`` with each target's prompt under the seed rule."""
        if host.remember is None:
            counts = split_count(remember.count, len(targets))
            requests = [RememberRequest(prompt, target_seed(t.provenance.get("seed")), n)
                        for t, prompt, n in zip(targets.targets, host.prompts, counts, strict=True)]  # fmt: skip
            remember_latents, _ = generate_remember(sampler, requests, tuple(targets.targets[0].latent.shape))
            # each remember output is conditioned as the target whose prompt made it
            remember_cond = concat([cond for cond, n in zip(host.conditionings, counts, strict=True) for _ in range(n)])
            source = {"generate": remember.count, "steps": remember.steps, "seeds": "target seed + 1, + 2, ..."}
        else:
            remember_latents = host.remember
            remember_cond = concat([host.remember_conditioning] * len(host.remember))
            source = {"given": tensor_hash(remember.given)}
        forget = ForgetTargets(host.targets, host.surrogates, concat(host.conditionings), host.noise)
        return UnlearnData(forget, RememberSet(remember_latents, remember_cond)), source

    def _host_inputs(self, targets: UnlearnTargets, remember: RememberInputs, check: CheckInputs) -> _HostInputs:
        """ComfyUI's half of a run: everything the core's half takes from ComfyUI."""
        noise, noise_sources = self.model.target_noises(targets, remember.steps)
        forget_latents = torch.stack([t.latent for t in targets.targets]).float()
        surrogate_latents = torch.stack([t.surrogate_latent for t in targets.targets]).float()
        given = remember.given
        if given is not None and given.shape[1:] != forget_latents.shape[1:]:
            raise InputError(
                f"remember latents {tuple(given.shape[1:])} and targets {tuple(forget_latents.shape[1:])} differ in "
                "size; generate the remember set at the targets' resolution"
            )
        x_forget = self.model.network_latents(forget_latents)
        x_surrogate = self.model.network_latents(surrogate_latents)
        conditionings = [self.model.conditioning_tensors(t.conditioning, 1, x_forget[:1]) for t in targets.targets]
        remember_conditioning = None
        if given is not None:
            given = self.model.network_latents(given)
            positive = remember.conditioning or targets.targets[0].conditioning
            remember_conditioning = self.model.conditioning_tensors(positive, 1, x_forget[:1])
        prompts = [replay_prompt(t.provenance, t.conditioning, t.negative, remember.steps) for t in targets.targets]
        replays = None
        if self.config.stop_when_forgotten and check.vae is None:
            log.warning("verified stopping needs the VAE connected: every step is trained")
        elif self.config.stop_when_forgotten:
            replays = _CheckReplays(
                [replay_prompt(t.provenance, t.conditioning, t.negative, remember.steps, int(t.provenance.get("batch_index", 0) or 0))
                 for t in targets.targets],
                [int(t.provenance.get("seed") or 0) for t in targets.targets],  # only ancestral samplers draw from it
                torch.stack([images.to_core(t.image) for t in targets.targets]),
                decoder(check.vae),
            )  # fmt: skip
        return _HostInputs(x_forget, x_surrogate, conditionings, noise, noise_sources, prompts, given,
                           remember_conditioning, replays)  # fmt: skip
