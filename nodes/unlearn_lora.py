"""Instance Unlearn LoRA: train the forgetting LoRA on the loaded model, save it, apply it."""

from __future__ import annotations

import logging
from pathlib import Path

import folder_paths
import torch
from comfy_api.latest import io

from ..unlearn_core.config import UnlearnConfig
from ..unlearn_core.data import ForgetTargets, RememberSet, UnlearnData
from ..unlearn_core.denoiser import concat
from ..unlearn_core.errors import InputError
from ..unlearn_core.files import safe_child, tensor_hash
from ..unlearn_core.lora import parse_state_dict, reproduction_metadata, save_lora
from ..unlearn_core.objectives import OBJECTIVES
from ..unlearn_core.seeds import MAX_REMEMBER, remember_seeds
from ..unlearn_core.surgery import SURGERY_MODES
from ..unlearn_core.trainer import train_unlearning
from ..unlearn_core.weighting import WEIGHTINGS
from . import host
from .progress import TrainingProgress
from .targets import Target, TargetsType, UnlearnTargets

log = logging.getLogger(__name__)

DEFAULT_SAMPLING = {"steps": 20, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform"}


def sampling_settings(target: Target, steps: int) -> dict:
    """How the target was sampled (from its provenance; ``steps`` when it has none recorded)."""
    settings = dict(DEFAULT_SAMPLING, steps=steps)
    for key in ("steps", "cfg", "sampler_name", "scheduler"):
        value = target.provenance.get(key)
        if value is not None and (key != "sampler_name" or value in host.SAMPLERS) and (key != "scheduler" or value in host.SCHEDULERS):
            settings[key] = value
    return settings


def generate_remember(model, targets: UnlearnTargets, count: int, steps: int) -> tuple[torch.Tensor, list]:
    """Remember set from the base model: each target's conditioning with other seeds."""
    per_target = [count // len(targets) + (1 if i < count % len(targets) else 0) for i in range(len(targets))]
    latents, conditionings = [], []
    for target, n in zip(targets.targets, per_target, strict=True):
        if n == 0:
            continue
        settings = sampling_settings(target, steps)
        empty = torch.zeros_like(target.latent).unsqueeze(0)
        for seed in remember_seeds(int(target.provenance.get("seed", 0) or 0), n):
            sample = host.ksample(model, seed, settings["steps"], settings["cfg"], settings["sampler_name"],
                                  settings["scheduler"], target.conditioning, target.negative, empty)  # fmt: skip
            latents.append(sample)
            conditionings.append(target.conditioning)
    return torch.cat(latents), conditionings


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


def build_data(model, targets: UnlearnTargets, remember: torch.Tensor, remember_conditionings: list) -> UnlearnData:
    """Latents in the network's space and per-sample conditioning tensors for the core trainer."""
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
    return UnlearnData(ForgetTargets(x_forget, x_surrogate, forget_cond), RememberSet(x_remember, remember_cond))


def lora_path(name: str) -> Path:
    folders = folder_paths.get_folder_paths("loras")
    if not folders:
        raise InputError("ComfyUI has no loras folder configured")
    return safe_child(folders[0], name, ".safetensors", what="LoRA name")


def lora_metadata(config: UnlearnConfig, model, targets: UnlearnTargets, remember: dict) -> dict:
    """Everything that reproduces this LoRA (see unlearn_core.lora.reproduction_metadata)."""
    models = sorted({str(t.provenance.get("model")) for t in targets.targets if t.provenance.get("model")})
    return reproduction_metadata(
        config, [t.hash for t in targets.targets], [t.surrogate_hash for t in targets.targets], host.model_name(model),
        forget_set=targets.forget_set, surrogate_methods=[t.surrogate_method for t in targets.targets],
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
                "given) and outputs the model with the LoRA applied."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The loaded model to unlearn from (left untouched)."),
                TargetsType.Input("targets", tooltip="Targets with surrogates, from Build Surrogate."),
                io.Int.Input("steps", default=100, min=1, max=100000, tooltip="Optimizer steps (the paper: 100 for SD3)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=0.1, step=1e-5, round=1e-7,
                               tooltip="AdamW learning rate; 1e-5..1e-3 for LoRA."),
                io.Int.Input("rank", default=8, min=1, max=256, tooltip="LoRA rank (alpha = rank)."),
                io.Int.Input("forget_batch_size", default=4, min=1, max=64, tooltip="Noise draws of the targets per step."),
                io.Int.Input("remember_batch_size", default=4, min=1, max=64, tooltip="Remember samples per step."),
                io.Int.Input("remember_count", default=32, min=1, max=MAX_REMEMBER,
                             tooltip="Remember samples to generate per run when no remember_latents are given (the paper used 100)."),
                io.Int.Input("remember_steps", default=20, min=1, max=200, tooltip="Sampler steps for generating the remember set when a target has no recorded steps."),
                io.Combo.Input("weighting", options=list(WEIGHTINGS), default="power",
                               tooltip="lambda(t) between forgetting and remembering: power = t^gamma (timestep-aware), constant."),
                io.Float.Input("gamma", default=1.0, min=0.0, max=20.0, step=0.1,
                               tooltip="Exponent of the power weighting: larger forgets only at high noise."),
                io.Combo.Input("surgery", options=list(SURGERY_MODES), default="project_forget",
                               tooltip="Gradient surgery: project_forget (default), none, pcgrad_both."),
                io.Combo.Input("method", options=list(OBJECTIVES), default="surrogate",
                               tooltip="surrogate (ours) or a baseline for comparison: neggrad, erasediff, siss."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, tooltip="Seed of every random draw of training."),
                io.Combo.Input("dtype", options=["float32", "bfloat16", "float16"], default="float32",
                               tooltip="Compute dtype (autocast); bfloat16 halves activation memory on GPUs."),
                io.Boolean.Input("gradient_checkpointing", default=False,
                                 tooltip="Recompute blocks in backward: much less memory, about a third more time."),
                io.String.Input("lora_name", default="unlearn/instance_unlearn",
                                tooltip="File name under models/loras (subfolders allowed, .safetensors added). Empty: do not save."),
                io.Latent.Input("remember_latents", optional=True,
                                tooltip="Optional remember set (e.g. the same prompt with other seeds); replaces generation."),
                io.Conditioning.Input("remember_conditioning", optional=True,
                                      tooltip="Conditioning of remember_latents; defaults to the first target's conditioning."),
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
    def execute(cls, model, targets, steps, learning_rate, rank, forget_batch_size, remember_batch_size, remember_count,
                remember_steps, weighting, gamma, surgery, method, seed, dtype, gradient_checkpointing, lora_name,
                remember_latents=None, remember_conditioning=None) -> io.NodeOutput:  # fmt: skip
        config = UnlearnConfig(
            method=method, steps=steps, learning_rate=learning_rate, lora_rank=rank,
            forget_batch_size=forget_batch_size, remember_batch_size=remember_batch_size,
            weighting=weighting, gamma=gamma, surgery=surgery, seed=seed, dtype=dtype,
            gradient_checkpointing=gradient_checkpointing,
        )  # fmt: skip
        family = host.model_family(model)
        host.lora_target_names(model, rank, config.target_modules)  # a rank too large fails before any work
        check_targets(targets)
        path = lora_path(lora_name) if lora_name.strip() else None  # validate the name before any work
        if remember_latents is not None:
            remember = remember_latents["samples"].float()
            conditioning = remember_conditioning or targets.targets[0].conditioning
            remember_conditionings = [conditioning] * len(remember)
            remember_source = {"given": tensor_hash(remember)}
        else:
            remember, remember_conditionings = generate_remember(model, targets, remember_count, remember_steps)
            remember_source = {"generate": remember_count, "steps": remember_steps, "seeds": "target seed + 1, + 2, ..."}
        data = build_data(model, targets, remember, remember_conditionings)
        process = host.HostProcess(model.model.model_sampling, family)
        progress = TrainingProgress(cls.hidden.unique_id, steps)
        progress.start()
        try:
            with (
                torch.inference_mode(False),
                host.lora_training_clone(model, rank, float(rank), config.target_modules, seed) as (clone, adapters),
                host.gradient_checkpointing(clone, gradient_checkpointing),
            ):
                denoiser = host.PatcherDenoiser(clone, process, host.adapter_parameters(adapters))
                result = train_unlearning(denoiser, process, data, config, callback=progress)
                lora = host.lora_state_dict(adapters)
        except BaseException as error:
            progress.finish("failed", error=str(error) or type(error).__name__)
            raise
        if path is not None:
            save_lora(path, parse_state_dict(lora), "comfy", lora_metadata(config, model, targets, remember_source))
            saved_name = path.relative_to(Path(folder_paths.get_folder_paths("loras")[0]).resolve()).as_posix()
            log.info("saved unlearning LoRA to %s", path)
        else:
            saved_name = ""
        progress.finish("done", lora_name=saved_name, seconds=result.seconds)
        loss_map = {
            "loss": [h["objective"] for h in result.history],
            "forget_loss": [h["forget_loss"] for h in result.history],
            "remember_loss": [h["remember_loss"] for h in result.history],
        }
        return io.NodeOutput(host.with_lora(model, lora), lora, loss_map, saved_name)
