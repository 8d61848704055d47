"""Instance Unlearn LoRA: train the forgetting LoRA on the loaded model, save it, apply it."""

from __future__ import annotations

import json
import logging

import torch
from comfy_api.latest import io

from ..unlearn_core.data.remember import RememberRequest, generate_remember, split_count
from ..unlearn_core.data.seeds import MAX_REMEMBER, target_seed
from ..unlearn_core.data.sets import ForgetTargets, RememberSet, UnlearnData
from ..unlearn_core.diffusion.denoiser import concat
from ..unlearn_core.errors import InputError
from ..unlearn_core.formats.files import tensor_hash
from ..unlearn_core.formats.lora import reproduction_metadata, save_lora, state_dict_for
from ..unlearn_core.method.config import UnlearnConfig
from ..unlearn_core.method.trainer import train_unlearning
from . import config_inputs, host, paths
from .forgetting_check import forgetting_check, target_noises
from .progress import TrainingProgress
from .targets import TargetsType, UnlearnTargets

log = logging.getLogger(__name__)


def remember_requests(targets: UnlearnTargets, count: int, steps: int) -> list[RememberRequest]:
    """Each target's replay prompt (its recorded settings and negative) for its share of ``count``."""
    return [
        RememberRequest(host.replay_prompt(t.provenance, t.conditioning, t.negative, steps), target_seed(t.provenance.get("seed")), n)
        for t, n in zip(targets.targets, split_count(count, len(targets)), strict=True)
    ]


def check_targets(targets: UnlearnTargets) -> None:
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


def build_data(model, targets: UnlearnTargets, remember: torch.Tensor, remember_conditionings: list,
               noise: torch.Tensor) -> UnlearnData:  # fmt: skip
    """Latents in the network's space, per-sample conditioning tensors and each target's sampler
    noise (:func:`~.forgetting_check.target_noises`) for the core trainer."""
    forget_latents = torch.stack([t.latent for t in targets.targets]).float()
    surrogate_latents = torch.stack([t.surrogate_latent for t in targets.targets]).float()
    if remember.shape[1:] != forget_latents.shape[1:]:
        raise InputError(
            f"remember latents {tuple(remember.shape[1:])} and targets {tuple(forget_latents.shape[1:])} differ in "
            "size; generate the remember set at the targets' resolution"
        )
    x_forget = host.process_latent_in(model, forget_latents)
    x_surrogate = host.process_latent_in(model, surrogate_latents)
    x_remember = host.process_latent_in(model, remember)
    forget_cond = concat([host.conditioning_tensors(model, t.conditioning, 1, x_forget[:1]) for t in targets.targets])
    remember_cond = concat([host.conditioning_tensors(model, c, 1, x_forget[:1]) for c in remember_conditionings])
    return UnlearnData(ForgetTargets(x_forget, x_surrogate, forget_cond, noise), RememberSet(x_remember, remember_cond))


def lora_metadata(config: UnlearnConfig, model, targets: UnlearnTargets, data: UnlearnData, remember: dict) -> dict:
    """Everything that reproduces this LoRA (see unlearn_core.formats.lora.reproduction_metadata)."""
    models = sorted({str(t.provenance.get("model")) for t in targets.targets if t.provenance.get("model")})
    return reproduction_metadata(
        config, data, host.model_name(model), forget_set=targets.forget_set, target_ids=[t.id for t in targets.targets], surrogate_methods=[t.surrogate_method for t in targets.targets],
        base_model_files=models, remember=remember,
    )  # fmt: skip


class InstanceUnlearnLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstanceUnlearn_TrainLoRA",
            display_name="Instance Unlearn LoRA",
            category="unlearn/training",
            description=(
                "Trains a LoRA on the loaded model that makes it forget the targets (denoising them "
                "towards their surrogates) while keeping the remember set (other seeds of the same "
                "prompts) unchanged, with timestep-aware weighting and gradient projection. The "
                "cached model is never modified. Saves the LoRA under models/loras (if a name is "
                "given) and outputs the model with the LoRA applied. The training inputs, their "
                "defaults and bounds are those of the unlearning configuration (unlearn_core/method/config.py)."
            ),
            # Saved workflows store widget values (and links) by position: the first release's inputs
            # keep their order, and every input added since comes after them (config_inputs.ADDED).
            inputs=[
                io.Model.Input("model", tooltip="The loaded model to unlearn from (left untouched)."),
                TargetsType.Input("targets", tooltip="Targets with surrogates, from Build Surrogate."),
                *config_inputs.inputs("steps", "learning_rate", "rank", "forget_batch_size", "remember_batch_size"),
                io.Int.Input("remember_count", default=32, min=1, max=MAX_REMEMBER,
                             tooltip="Remember samples to generate per run when no remember_latents are given (the paper used 100)."),
                io.Int.Input("remember_steps", default=20, min=1, max=200, tooltip="Sampler steps for generating the remember set when a target has no recorded steps."),
                *config_inputs.inputs("weighting", "gamma", "surgery", "method", "seed", "dtype", "gradient_checkpointing"),
                io.String.Input("lora_name", default="unlearn/instance_unlearn",
                                tooltip="File name under models/loras (subfolders allowed, .safetensors added). Empty: do not save."),
                io.Latent.Input("remember_latents", optional=True,
                                tooltip="Optional remember set (e.g. the same prompt with other seeds); replaces generation."),
                io.Conditioning.Input("remember_conditioning", optional=True,
                                      tooltip="Conditioning of remember_latents; defaults to the first target's conditioning."),
                *config_inputs.inputs(*config_inputs.ADDED, optional=True),
                io.Vae.Input("vae", optional=True,
                             tooltip="The model's VAE: with it, training regenerates the targets every check_every steps and "
                                     "stops once each is forgotten (verified stopping); without it every step is trained."),
                io.Combo.Input("copy_detector", options=[paths.PIXEL, *paths.copy_detector_files()], default=paths.PIXEL, optional=True,
                               tooltip="How the forgetting check measures a copy, as in Preserve Check: pixel (built in) or an "
                                       "SSCD TorchScript file from models/unlearn/."),
                io.Float.Input("forget_threshold", default=0.7, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="A regeneration is no longer the target below this copy similarity (Preserve Check's "
                                       "threshold); the check also wants check_margin below it."),
            ],  # fmt: skip
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the unlearning LoRA applied."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="The LoRA tensors (works with SaveLoRA / LoraModelLoader)."),
                io.Custom("LOSS_MAP").Output(display_name="loss", tooltip="Per-step losses (works with Plot Loss Graph)."),
                io.String.Output(display_name="lora_name", tooltip="The saved file's name for LoraLoaderModelOnly (empty if not saved)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, targets, remember_count, remember_steps, lora_name, remember_latents=None,
                remember_conditioning=None, vae=None, copy_detector=paths.PIXEL, forget_threshold=0.7,
                **training) -> io.NodeOutput:  # fmt: skip
        config = config_inputs.config_from_inputs(training)
        host.model_family(model)  # an unsupported model is refused before any work
        host.lora_target_names(model, config.lora_rank, config.target_modules)  # a rank too large fails before any work
        check_targets(targets)
        path = paths.lora_path(lora_name) if lora_name.strip() else None  # validate the name before any work
        paths.load_copy_detector(copy_detector)  # a missing detector file fails before any work
        if remember_latents is not None:
            remember = remember_latents["samples"].float()
            conditioning = remember_conditioning or targets.targets[0].conditioning
            remember_conditionings = [conditioning] * len(remember)
            remember_source = {"given": tensor_hash(remember)}
        else:
            shape = tuple(targets.targets[0].latent.shape)
            remember, prompts = generate_remember(host.HostSampler(model), remember_requests(targets, remember_count, remember_steps), shape)
            remember_conditionings = [prompt.positive for prompt in prompts]
            remember_source = {"generate": remember_count, "steps": remember_steps, "seeds": "target seed + 1, + 2, ..."}
        noise, noise_sources = target_noises(model, targets, remember_steps)
        data = build_data(model, targets, remember, remember_conditionings, noise)
        process = host.training_process(model)
        progress = TrainingProgress(cls.hidden.unique_id, config.steps)
        progress.start()
        try:
            with (
                torch.inference_mode(False),
                host.lora_training_clone(model, config.lora_rank, config.effective_alpha, config.target_modules,
                                         config.seed) as (clone, adapters),
                host.gradient_checkpointing(clone, config.gradient_checkpointing),
            ):
                denoiser = host.PatcherDenoiser(clone, process, host.adapter_parameters(adapters), adapters)
                check = None
                if config.stop_when_forgotten:
                    check = forgetting_check(clone, vae, targets, data.forget.noise, remember_steps, copy_detector,
                                             forget_threshold, config.check_margin, config.check_nearby, config.seed)  # fmt: skip
                    if check is None:
                        log.warning("verified stopping needs the VAE connected: every step is trained")
                result = train_unlearning(denoiser, process, data, config, callback=progress, check=check)
                weights = host.lora_weights(model, adapters)
        except BaseException as error:
            progress.finish("failed", error=str(error) or type(error).__name__)
            raise
        result.verification["noise"] = noise_sources
        if path is not None:
            metadata = lora_metadata(config, model, targets, data, remember_source)
            metadata["unlearn.verification"] = json.dumps(result.verification, sort_keys=True)
            save_lora(path, weights, "comfy", metadata)
            saved_name = paths.lora_name(path)
            log.info("saved unlearning LoRA to %s", path)
        else:
            saved_name = ""
        progress.finish("done", lora_name=saved_name, seconds=result.seconds, steps=result.steps,
                        verification=result.verification.get("status"),
                        forgotten_at=result.verification.get("forgotten_at"))  # fmt: skip
        loss_map = {
            "loss": [h["objective"] for h in result.history],
            "forget_loss": [h["forget_loss"] for h in result.history],
            "remember_loss": [h["remember_loss"] for h in result.history],
        }
        if any("forgotten" in h for h in result.history):  # targets forgotten at each check, held until the next one
            count, series = 0.0, []
            for h in result.history:
                count = h.get("forgotten", count)
                series.append(count)
            loss_map["forgotten_targets"] = series
        lora = state_dict_for(weights, "comfy")  # LORA_MODEL, as SaveLoRA and LoraModelLoader take it
        return io.NodeOutput(host.with_lora(model, lora), lora, loss_map, saved_name)
