"""Instance Unlearn LoRA: train the forgetting LoRA on the loaded model, save it, apply it."""

from __future__ import annotations

import json
import logging

from comfy_api.latest import io

from ..unlearn_core.data.seeds import MAX_REMEMBER
from ..unlearn_core.formats.lora import save_lora
from . import config_inputs, paths
from .host.model import HostModel
from .host.unlearning import CheckInputs, LoraUnlearning, RememberInputs
from .progress import TrainingProgress
from .targets import TargetsType

log = logging.getLogger(__name__)


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
                io.Combo.Input("existing_lora", options=[paths.NO_LORA, *paths.lora_files()], default=paths.NO_LORA, optional=True,
                               tooltip="An earlier request's result (its LoRA, or the .merged file of all so far) to continue "
                                       "from: it is applied to the model first, its targets must be among these targets (mark "
                                       "into the same forget set) and stay forgotten, and the outputs are everything so far, "
                                       "saved as lora_name.merged. Connect the base model, without it applied."),
            ],  # fmt: skip
            outputs=[
                io.Model.Output(display_name="model", tooltip="The model with the unlearning LoRA applied (with existing_lora: both)."),
                io.Custom("LORA_MODEL").Output(display_name="lora", tooltip="The LoRA tensors (works with SaveLoRA / LoraModelLoader); "
                                                                              "with existing_lora the merged LoRA of both."),
                io.Custom("LOSS_MAP").Output(display_name="loss", tooltip="Per-step losses (works with Plot Loss Graph)."),
                io.String.Output(display_name="lora_name", tooltip="The saved file's name for LoraLoaderModelOnly (empty if not saved; "
                                                                   "with existing_lora the merged file's)."),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, targets, remember_count, remember_steps, lora_name, remember_latents=None,
                remember_conditioning=None, vae=None, copy_detector=paths.PIXEL, forget_threshold=0.7,
                existing_lora=paths.NO_LORA, **training) -> io.NodeOutput:  # fmt: skip
        config = config_inputs.config_from_inputs(training)
        # an unsupported model, a rank a layer cannot hold, an earlier result that does not fit or a
        # forget set training cannot use fails before any work
        unlearning = LoraUnlearning(HostModel(model), config, existing_lora)
        unlearning.check_targets(targets)
        path = paths.lora_path(lora_name) if lora_name.strip() else None  # validate the name before any work
        if path is not None and unlearning.existing is not None:
            unlearning.existing.refuse_overwrite(path)
        detector = paths.load_copy_detector(copy_detector)  # a missing detector file fails before any work
        remember = RememberInputs(remember_count, remember_steps, remember_latents, remember_conditioning)
        check = CheckInputs(vae, detector, forget_threshold)
        progress = TrainingProgress(cls.hidden.unique_id, config.steps)
        unlearned = unlearning.run(targets, remember, check, progress)
        result = unlearned.result
        saved_name = ""
        if path is not None:
            save_lora(path, unlearned.weights, "comfy", unlearned.metadata)
            saved_name = paths.lora_name(path)
            log.info("saved unlearning LoRA to %s", path)
            if unlearned.merged is not None:  # one file for every request so far, the next existing_lora
                merged_path = paths.merged_lora_path(path)
                save_lora(merged_path, unlearned.merged, "comfy",
                          {**unlearned.metadata, "unlearn.merged_of": json.dumps([existing_lora, saved_name])})  # fmt: skip
                saved_name = paths.lora_name(merged_path)
                log.info("saved the merged LoRA of %s and this request to %s", existing_lora, merged_path)
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
        return io.NodeOutput(unlearned.model_with_lora, unlearned.lora, loss_map, saved_name)
