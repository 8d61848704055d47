"""Preserve Check: regenerate with the base and the unlearned model, measure forgetting and integrity."""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import folder_paths
import torch
import torch.nn.functional as F
from comfy_api.latest import io, ui

from ..unlearn_core.errors import InputError
from ..unlearn_core.files import atomic_write_text, safe_child
from ..unlearn_core.metrics import (
    SAME_OUTPUT_SSIM,
    Unavailable,
    compare_images,
    judge_forgetting,
    load_lpips,
    ssim,
)
from ..unlearn_core.seeds import preserve_seeds as held_out_seeds
from . import host, provenance
from .targets import TargetsType
from .unlearn_lora import lora_path, sampling_settings


def _batch(images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> (B, 3, H, W)."""
    return images.permute(0, 3, 1, 2).float()


def _resize_to(images: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    if images.shape[1:3] == reference.shape[1:3]:
        return images
    resized = F.interpolate(_batch(images), size=reference.shape[1:3], mode="bilinear", antialias=True)
    return resized.permute(0, 2, 3, 1)


def _clip_similarity(clip_vision, a: torch.Tensor, b: torch.Tensor) -> list[float]:
    embed_a = clip_vision.encode_image(a).image_embeds
    embed_b = clip_vision.encode_image(b).image_embeds
    return F.cosine_similarity(embed_a.float(), embed_b.float(), dim=-1).tolist()


def _generate(model, vae, settings: dict, seed: int, target, conditioning, latent_shape, batch_index: int = 0) -> torch.Tensor:
    """One regeneration with the target's recorded settings and negative (replayed exactly)."""
    empty = torch.zeros(1, *latent_shape)
    samples = host.ksample(model, seed, settings["steps"], settings["cfg"], settings["sampler_name"],
                           settings["scheduler"], conditioning, target.negative, empty, batch_index=batch_index)  # fmt: skip
    return host.decode(vae, samples)


def _grid(top: list[torch.Tensor], bottom: list[torch.Tensor]) -> torch.Tensor:
    """One IMAGE: base outputs on the top row, unlearned outputs below (same column = same seed)."""
    height = max(i.shape[1] for i in top)
    width = max(i.shape[2] for i in top)

    def row(images):
        return torch.cat([_resize_to(i, torch.zeros(1, height, width, 3)) for i in images], dim=2)

    return torch.cat([row(top), row(bottom)], dim=1)


def _report_path(lora_name: str, forget_set: str) -> Path:
    if lora_name.strip():
        lora_file = lora_path(lora_name)
        return lora_file.with_name(lora_file.name.removesuffix(".safetensors") + ".report.json")
    stamp = time.strftime("%Y%m%d-%H%M%S")
    reports = Path(folder_paths.get_output_directory()) / "unlearn" / "reports"
    return safe_child(reports, f"{forget_set}_{stamp}", ".json", what="report name")


def _verdict_text(summary: dict, forget_rows: list[dict]) -> str:
    """One line a user reads first: forgetting (or why it cannot be told), then integrity."""
    if summary["cannot_verify"]:
        first = next(r["note"] for r in forget_rows if r["forgotten"] is None)
        forgetting = f"{summary['cannot_verify']} of {len(forget_rows)} target(s): {first}"
    else:
        forgetting = f"forgotten: {summary['forgotten']}"
    integrity = "integrity passed" if summary["integrity_passed"] else "integrity failed"
    return f"{forgetting}; {integrity} (mean preserve SSIM {summary['mean_preserve_ssim']:.3f})"


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
                "unlearned model. First proves that the base model reproduces each target; a target it "
                "does not reproduce is reported as 'cannot verify' (with the reason), never as forgotten. "
                "Reports forgetting (SSIM of the new output to the target: lower is more forgotten) and "
                "integrity (SSIM/PSNR/LPIPS between base and unlearned outputs), passes or fails against "
                "the thresholds, and saves a JSON report beside the LoRA."
            ),
            inputs=[
                io.Model.Input("base_model", tooltip="The original model."),
                io.Model.Input("unlearned_model", tooltip="The model output of Instance Unlearn LoRA (or any LoRA-loaded model)."),
                io.Vae.Input("vae", tooltip="The VAE, to compare images."),
                TargetsType.Input("targets", tooltip="The targets that were unlearned."),
                io.Int.Input("preserve_seeds", default=8, min=1, max=256,
                             tooltip="Held-out seeds per target prompt (and per extra prompt) to check integrity on."),
                io.Int.Input("steps", default=20, min=1, max=200,
                             tooltip="Sampler steps for targets without recorded settings (recorded steps, cfg, sampler and scheduler win)."),
                io.Float.Input("forget_threshold", default=0.7, min=0.0, max=1.0, step=0.01,
                               tooltip="A target counts as forgotten when SSIM(unlearned output, target) is at most this."),
                io.Float.Input("integrity_threshold", default=0.85, min=0.0, max=1.0, step=0.01,
                               tooltip="Integrity passes when the mean SSIM(base, unlearned) on preserve seeds is at least this."),
                io.String.Input("lora_name", default="",
                                tooltip="The LoRA's name (connect Instance Unlearn LoRA's lora_name) to save the report beside it."),
                io.Conditioning.Input("extra_conditioning", optional=True,
                                      tooltip="Optional other prompts that must stay unchanged."),
                io.ClipVision.Input("clip_vision", optional=True,
                                    tooltip="Optional CLIP vision model for a semantic similarity column."),
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
                integrity_threshold, lora_name, extra_conditioning=None, clip_vision=None) -> io.NodeOutput:  # fmt: skip
        if len(targets) == 0:
            raise InputError("no targets to check: mark and unlearn at least one output first")
        report_path = _report_path(lora_name, targets.forget_set)  # validate the name before any work
        lpips_model = load_lpips()
        top, bottom, forget_rows, preserve_rows = [], [], [], []
        for index, target in enumerate(targets.targets):
            if target.conditioning is None:
                raise InputError(f"target {index} has no conditioning; connect it to Mark Undesired Output")
            settings = sampling_settings(target, steps)
            scale = host.vae_scale(vae)  # the size Build Surrogate encoded an image without latent at
            shape = tuple(target.latent.shape) if target.latent is not None else (
                base_model.model.latent_format.latent_channels,
                max(1, round(target.image.shape[0] / scale)), max(1, round(target.image.shape[1] / scale)))
            seed = target.provenance.get("seed")
            if seed is not None:
                index_in_batch = int(target.provenance.get("batch_index", 0))
                base = _generate(base_model, vae, settings, int(seed), target, target.conditioning, shape, index_in_batch)
                unlearned = _generate(unlearned_model, vae, settings, int(seed), target, target.conditioning, shape, index_in_batch)
                reference = target.image.unsqueeze(0)
                verdict = judge_forgetting(
                    float(ssim(_batch(_resize_to(base, reference)), _batch(reference))),
                    float(ssim(_batch(_resize_to(unlearned, reference)), _batch(reference))),
                    forget_threshold, SAME_OUTPUT_SSIM, provenance.replay_problems(target.provenance),
                )  # fmt: skip
                row = {"target": target.id, "seed": int(seed), "measure": "ssim",
                       "ssim_unlearned_to_target": verdict.unlearned_similarity,
                       "ssim_base_to_target": verdict.base_similarity,
                       "reproduced": verdict.reproduced, "forgotten": verdict.forgotten, "note": verdict.reason}  # fmt: skip
                if clip_vision is not None:
                    row["clip_unlearned_to_target"] = _clip_similarity(clip_vision, unlearned, reference)[0]
                forget_rows.append(row)
                top.append(base)
                bottom.append(unlearned)
            else:
                forget_rows.append({"target": target.id, "seed": None, "reproduced": False, "forgotten": None,
                                    "note": "cannot verify forgetting: no recorded seed, the target cannot be regenerated"})  # fmt: skip
            prompts = [("target", target.conditioning)]
            if extra_conditioning is not None and index == 0:
                prompts.append(("extra", extra_conditioning))
            for kind, conditioning in prompts:
                for held_out in held_out_seeds(int(seed or 0), preserve_seeds):
                    base = _generate(base_model, vae, settings, held_out, target, conditioning, shape)
                    unlearned = _generate(unlearned_model, vae, settings, held_out, target, conditioning, shape)
                    scores = compare_images(_batch(base), _batch(unlearned), lpips_model)
                    row = {"prompt": kind, "target": target.id, "seed": held_out,
                           "ssim": scores["ssim"][0], "psnr": scores["psnr"][0],
                           "lpips": scores["lpips"][0] if isinstance(scores["lpips"], list) else None}  # fmt: skip
                    if clip_vision is not None:
                        row["clip"] = _clip_similarity(clip_vision, base, unlearned)[0]
                    preserve_rows.append(row)
                    top.append(base)
                    bottom.append(unlearned)
        judged = [r["forgotten"] for r in forget_rows if r["forgotten"] is not None]
        unverified = [r for r in forget_rows if r["forgotten"] is None]
        mean_ssim = statistics.fmean(r["ssim"] for r in preserve_rows)
        summary = {
            "forgotten": f"{sum(judged)}/{len(forget_rows)}",
            "cannot_verify": len(unverified),
            # a target that cannot be verified is never counted as forgotten
            "forgetting_passed": bool(judged) and all(judged) and not unverified,
            "mean_preserve_ssim": mean_ssim,
            "mean_preserve_psnr": statistics.fmean(r["psnr"] for r in preserve_rows),
            "mean_preserve_lpips": (statistics.fmean(r["lpips"] for r in preserve_rows)
                                    if not isinstance(lpips_model, Unavailable) else lpips_model.reason),  # fmt: skip
            "integrity_passed": mean_ssim >= integrity_threshold,
            "thresholds": {"forget_ssim_at_most": forget_threshold, "integrity_ssim_at_least": integrity_threshold},
        }
        summary["passed"] = summary["forgetting_passed"] and summary["integrity_passed"]
        summary["verdict"] = _verdict_text(summary, forget_rows)
        report = {"forget_set": targets.forget_set, "lora_name": lora_name, "summary": summary,
                  "targets": forget_rows, "preserve": preserve_rows}  # fmt: skip
        text = json.dumps(report, indent=2)
        atomic_write_text(report_path, text)
        grid = _grid(top, bottom)
        return io.NodeOutput(grid, text, summary["passed"], ui=ui.PreviewImage(grid, cls=cls))
