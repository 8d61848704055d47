"""Preserve Check: regenerate with the base and the unlearned model; the core judges forgetting and integrity."""

from __future__ import annotations

import json

import torch
from comfy_api.latest import io, ui

from ..unlearn_core.errors import InputError
from ..unlearn_core.files import atomic_write_text
from ..unlearn_core.metrics import PixelCopyDetector, TorchScriptCopyDetector, load_lpips
from ..unlearn_core.preserve import PreservePair, TargetImages, Thresholds, check_preservation
from ..unlearn_core.seeds import preserve_seeds as held_out_seeds
from . import host, images, paths, provenance
from .targets import TargetsType

PIXEL = "pixel"  # copy_detector option: the core's built-in pixel detector (no file)


def load_copy_detector(name: str):
    """The copy detector Preserve Check judges forgetting with: an SSCD TorchScript file, or pixels."""
    if name == PIXEL:
        return PixelCopyDetector()
    return TorchScriptCopyDetector(paths.copy_detector_path(name))


def _generate(model, vae, settings: dict, seed: int, target, conditioning, latent_shape, batch_index: int = 0) -> torch.Tensor:
    """One regeneration with the target's recorded settings and negative (replayed exactly)."""
    empty = torch.zeros(1, *latent_shape)
    samples = host.ksample(model, seed, settings["steps"], settings["cfg"], settings["sampler_name"],
                           settings["scheduler"], conditioning, target.negative, empty, batch_index=batch_index)  # fmt: skip
    return host.decode(vae, samples)


class PreserveCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstanceUnlearn_PreserveCheck",
            display_name="Preserve Check",
            category="unlearn/evaluation",
            description=(
                "Regenerates every target (its recorded seed, settings and negative) and a preserve set "
                "(held-out seeds of the same prompts, plus optional extra prompts) with the base and the "
                "unlearned model. First proves that the base model reproduces each target (SSIM of its "
                "regeneration to the target); a target it does not reproduce is reported as 'cannot verify' "
                "(with the reason), never as forgotten. Forgetting is copy similarity of the unlearned "
                "model's regeneration to the target (the copy_detector: an SSCD file, or pixels); integrity "
                "is SSIM/PSNR/LPIPS between base and unlearned outputs. Passes or fails against the "
                "thresholds and saves a JSON report (naming the measures) beside the LoRA."
            ),
            inputs=[
                io.Model.Input("base_model", tooltip="The original model."),
                io.Model.Input("unlearned_model", tooltip="The model output of Instance Unlearn LoRA (or any LoRA-loaded model)."),
                io.Vae.Input("vae", tooltip="The VAE, to compare images."),
                TargetsType.Input("targets", tooltip="The targets that were unlearned."),
                io.Int.Input("preserve_seeds", default=8, min=1, max=256,
                             tooltip="Held-out seeds per target prompt (and per extra prompt) to check integrity on; "
                                     "they never overlap the remember seeds training used."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Sampler steps for targets without recorded settings (recorded steps, cfg, sampler and scheduler win)."),
                io.Float.Input("forget_threshold", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="A target counts as forgotten when the copy similarity of the unlearned model's "
                                       "regeneration to it is below this, in the copy_detector's measure (pixel: cosine of "
                                       "small mean-centred images; SSCD: the paper counts below 0.4 as forgotten)."),
                io.Float.Input("integrity_threshold", default=0.85, min=0.0, max=1.0, step=0.01,
                               tooltip="Integrity passes when the mean SSIM(base, unlearned) on preserve seeds is at least this."),
                io.String.Input("lora_name", default="",
                                tooltip="The LoRA's name (connect Instance Unlearn LoRA's lora_name) to save the report beside it."),
                io.Conditioning.Input("extra_conditioning", optional=True,
                                      tooltip="Optional other prompts that must stay unchanged."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional CLIP vision model for a semantic similarity column."),
                # added after the first release: after every older input (workflows store them by position)
                io.Combo.Input("copy_detector", options=[PIXEL, *paths.copy_detector_files()], default=PIXEL, optional=True,
                               tooltip="How forgetting is measured: pixel (built in: cosine of 32x32 mean-centred images) or "
                                       "an SSCD TorchScript file (e.g. sscd_disc_mixup.torchscript.pt) put in models/unlearn/."),
            ],  # fmt: skip
            outputs=[
                io.Image.Output(display_name="grid", tooltip="Top row: base model; bottom row: unlearned; same seed per column."),
                io.String.Output(display_name="report", tooltip="The JSON report."),
                io.Boolean.Output(display_name="passed", tooltip="Forgetting and integrity both pass."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, base_model, unlearned_model, vae, targets, preserve_seeds, steps, forget_threshold,
                integrity_threshold, lora_name, extra_conditioning=None, clip_vision=None,
                copy_detector=PIXEL) -> io.NodeOutput:  # fmt: skip
        if len(targets) == 0:
            raise InputError("no targets to check: mark and unlearn at least one output first")
        report_path = paths.report_path(lora_name, targets.forget_set)  # validate the names before any work
        detector = load_copy_detector(copy_detector)  # a missing file fails before any sampling
        top, bottom, regenerated, pairs = [], [], [], []
        for index, target in enumerate(targets.targets):
            if target.conditioning is None:
                raise InputError(f"target {index} has no conditioning; connect it to Mark Undesired Output")
            settings = host.sampling_settings(target.provenance, steps)
            shape = (tuple(target.latent.shape) if target.latent is not None
                     else host.latent_shape(base_model, vae, *target.image.shape[:2]))  # fmt: skip
            seed = target.provenance.get("seed")
            image = images.to_core(target.image)
            if seed is not None:
                index_in_batch = int(target.provenance.get("batch_index", 0))
                base = _generate(base_model, vae, settings, int(seed), target, target.conditioning, shape, index_in_batch)
                unlearned = _generate(unlearned_model, vae, settings, int(seed), target, target.conditioning, shape, index_in_batch)
                regenerated.append(TargetImages(target.id, image, images.to_core(base[0]), images.to_core(unlearned[0]), int(seed),
                                                tuple(provenance.replay_problems(target.provenance))))  # fmt: skip
                top.append(base)
                bottom.append(unlearned)
            else:
                regenerated.append(TargetImages(target.id, image, not_regenerated="no recorded seed, the target cannot be regenerated"))
            prompts = [("target", target.conditioning)]
            if extra_conditioning is not None and index == 0:
                prompts.append(("extra", extra_conditioning))
            for kind, conditioning in prompts:
                for held_out in held_out_seeds(int(seed or 0), preserve_seeds):
                    base = _generate(base_model, vae, settings, held_out, target, conditioning, shape)
                    unlearned = _generate(unlearned_model, vae, settings, held_out, target, conditioning, shape)
                    pairs.append(PreservePair(images.to_core(base[0]), images.to_core(unlearned[0]),
                                              {"prompt": kind, "target": target.id, "seed": held_out}))  # fmt: skip
                    top.append(base)
                    bottom.append(unlearned)
        semantic = host.ClipVisionEmbedder(clip_vision) if clip_vision is not None else None
        check = check_preservation(regenerated, pairs, detector, Thresholds(forget_threshold, integrity_threshold),
                                   load_lpips(), semantic)  # fmt: skip
        report = {"forget_set": targets.forget_set, "lora_name": lora_name, **check.as_dict()}
        text = json.dumps(report, indent=2)
        atomic_write_text(report_path, text)
        grid = images.grid(top, bottom)
        return io.NodeOutput(grid, text, check.passed, ui=ui.PreviewImage(grid, cls=cls))
