"""Preserve Check: regenerate with the base and the unlearned model; the core judges forgetting and integrity."""

from __future__ import annotations

import json

from comfy_api.latest import io, ui

from ..unlearn_core.data.seeds import preserve_seeds as held_out_seeds
from ..unlearn_core.data.seeds import target_seed
from ..unlearn_core.errors import InputError
from ..unlearn_core.formats.files import atomic_write_text, safetensors_metadata
from ..unlearn_core.verify.metrics import load_lpips
from ..unlearn_core.verify.preserve import (
    HeldOut,
    Replay,
    Thresholds,
    check_preservation,
    paired,
    regenerate,
)
from . import images, paths, provenance
from .host.model import HostModel
from .host.sampling import replay_prompt
from .host.vae import ClipVisionEmbedder, decoder
from .targets import TargetsType


def training_verification(lora_name: str) -> tuple[dict, list[str]] | None:
    """The forgetting check's record that Instance Unlearn LoRA saved in the LoRA file, if any, and
    the ids of the targets it trained on in its order (the record's lists follow it)."""
    if not lora_name.strip():
        return None
    path = paths.lora_path(lora_name)
    if not path.is_file():
        return None
    metadata = safetensors_metadata(path, "LoRA file")  # the tensors are not needed
    text = metadata.get("unlearn.verification")
    return None if text is None else (json.loads(text), json.loads(metadata.get("unlearn.target_ids") or "[]"))


class PreserveCheck(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstanceUnlearn_PreserveCheck",
            display_name="Preserve Check",
            category="unlearn/evaluation",
            description=(
                "Regenerates every target (its recorded seed, settings and negative; without a seed, from "
                "the noise recovered by inverting the sampler) and a preserve set "
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
                io.Combo.Input("copy_detector", options=[paths.PIXEL, *paths.copy_detector_files()], default=paths.PIXEL, optional=True,
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
                copy_detector=paths.PIXEL) -> io.NodeOutput:  # fmt: skip
        if len(targets) == 0:
            raise InputError("no targets to check: mark and unlearn at least one output first")
        report_path = paths.report_path(lora_name, targets.forget_set)  # validate the names before any work
        detector = paths.load_copy_detector(copy_detector)  # a missing file fails before any sampling
        replays, held_out = [], []
        for index, target in enumerate(targets.targets):
            if target.conditioning is None:
                raise InputError(f"target {index} has no conditioning; connect it to Mark Undesired Output")
        # a target without the seed that made it is replayed from the noise that training recovered too
        base = HostModel(base_model)
        noises, noise_sources = base.target_noises(targets, steps, vae)
        for index, (target, noise, source) in enumerate(zip(targets.targets, noises, noise_sources, strict=True)):
            shape = tuple(noise.shape)
            seed = target.provenance.get("seed")
            batch_index = int(target.provenance.get("batch_index", 0) or 0)
            replay = replay_prompt(target.provenance, target.conditioning, target.negative, steps, batch_index)
            problems = tuple(provenance.replay_problems(target.provenance))
            if source["source"] == "seed":
                replays.append(Replay(target.id, images.to_core(target.image), shape, replay, int(seed), problems))
            else:
                replays.append(Replay(target.id, images.to_core(target.image), shape, replay, None, problems, noise=noise,
                                      noise_source=source["source"]))  # fmt: skip
            prompts = [("target", target.conditioning)]
            if extra_conditioning is not None and index == 0:
                prompts.append(("extra", extra_conditioning))
            for kind, conditioning in prompts:
                seeds = held_out_seeds(target_seed(seed), preserve_seeds)
                prompt = replay_prompt(target.provenance, conditioning, target.negative, steps)
                held_out.append(HeldOut(prompt, seeds, shape, [{"prompt": kind, "target": target.id, "seed": s} for s in seeds]))
        to_images = decoder(vae)
        by_base = regenerate(base.sampler(), to_images, replays, held_out)
        by_unlearned = regenerate(HostModel(unlearned_model).sampler(), to_images, replays, held_out)
        semantic = ClipVisionEmbedder(clip_vision) if clip_vision is not None else None
        check = check_preservation(*paired(replays, held_out, by_base, by_unlearned), detector,
                                   Thresholds(forget_threshold, integrity_threshold), load_lpips(), semantic)  # fmt: skip
        report = {**check.as_dict(), "forget_set": targets.forget_set, "lora_name": lora_name}  # the verdict leads
        training = training_verification(lora_name)
        if training is not None:  # what verified stopping saw during training, beside what this check sees now
            verification, trained_ids = training
            report["training_verification"] = verification
            # by id: a run on an existing LoRA trains the earlier targets first, whatever order they come in here
            at_step = dict(zip(trained_ids, verification.get("forgotten_at") or [], strict=False))
            for row in report["targets"]:
                if row["target"] in at_step:
                    row["forgotten_at_training_step"] = at_step[row["target"]]
        text = json.dumps(report, indent=2, ensure_ascii=False)  # the text a user reads: Fréchet, not Fr\\u00e9chet
        atomic_write_text(report_path, text)
        top = [image for image in (*by_base.targets, *by_base.held_out) if image is not None]
        bottom = [image for image in (*by_unlearned.targets, *by_unlearned.held_out) if image is not None]
        grid = images.grid([images.from_core(i) for i in top], [images.from_core(i) for i in bottom])
        return io.NodeOutput(grid, text, check.passed, ui=ui.PreviewImage(grid, cls=cls))
