"""Build Surrogate (SDEdit/Inpaint): a mildly edited copy of each target, made by the loaded model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from comfy_api.latest import io

from ..unlearn_core.data.surrogate import (
    SAMPLED_KINDS,
    SURROGATE_KINDS,
    away_from_copy,
    build_surrogate,
    surrogate_similarity,
)
from ..unlearn_core.errors import InputError
from ..unlearn_core.method.config import UnlearnConfig
from ..unlearn_core.verify.metrics import at_size, copy_similarity
from . import images, paths
from .host.model import HostModel
from .host.sampling import SAMPLERS, SCHEDULERS, HostPrompt
from .host.vae import decode, encode, vae_scale
from .targets import Target, TargetsType


def target_latent(target: Target, vae) -> torch.Tensor:
    """The sampler's latent when it was recorded, else the VAE encoding of the image."""
    if target.latent is None:
        return encode(vae, target.image.unsqueeze(0)).float()
    scale = vae_scale(vae)
    latent_size = tuple(target.latent.shape[-2:])
    if tuple(side * scale for side in latent_size) != tuple(target.image.shape[:2]):
        height, width = target.image.shape[:2]
        raise InputError(
            f"target {target.id} has a {latent_size[0]}x{latent_size[1]} latent but a {height}x{width} image, which "
            f"this VAE (scale {scale}) does not connect; mark it again with the sampler's latent of that image"
        )
    return target.latent.unsqueeze(0).float()


class BuildSurrogate(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstanceUnlearn_BuildSurrogate",
            display_name="Build Surrogate (SDEdit/Inpaint)",
            category="unlearn/targets",
            description=(
                "Builds the surrogate of every target: a mildly edited copy that keeps the structure "
                "but not the undesired part. SDEdit re-noises the target to 'strength' and denoises "
                "it with the loaded model (optionally with an edit prompt); inpaint regenerates only "
                "the masked region; edited_image uses your own correction; flip and noise are weak "
                "baselines for comparison. The preview shows target | surrogate with their SSIM: "
                "raise strength if they are nearly identical, lower it if the structure is lost."
            ),
            inputs=[
                io.Model.Input("model", tooltip="The loaded model that produced the targets (the one to unlearn)."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode targets without a latent and decode surrogates."),
                TargetsType.Input("targets", tooltip="Targets from Mark Undesired Output."),
                io.Combo.Input("method", options=list(SURROGATE_KINDS), default="sdedit",
                               tooltip="sdedit (default), inpaint (needs a mask), edited_image (your correction), flip / noise (ablation)."),
                io.Float.Input("strength", default=0.5, min=0.05, max=1.0, step=0.05,
                               tooltip="How far to re-noise (sdedit/inpaint): 0.3-0.7 edits mildly; stronger forgets more, keeps less."),
                io.Int.Input("seed", default=0, min=0, max=0xFFFFFFFFFFFFFFFF, control_after_generate=True,
                             tooltip="Seed of the surrogate's noise."),
                io.Int.Input("steps", default=20, min=1, max=200, tooltip="Sampler steps for a full denoise (scaled by strength)."),
                io.Float.Input("cfg", default=4.5, min=0.0, max=30.0, step=0.1, tooltip="Guidance scale of the edit."),
                io.Combo.Input("sampler_name", options=list(SAMPLERS), default="euler", tooltip="ComfyUI sampler for the edit."),
                io.Combo.Input("scheduler", options=list(SCHEDULERS), default="sgm_uniform", tooltip="ComfyUI scheduler for the edit."),
                io.Float.Input("noise_std", default=0.1, min=0.0, max=2.0, step=0.01, tooltip="Latent noise of the 'noise' ablation surrogate."),
                io.Conditioning.Input("edit_conditioning", optional=True,
                                      tooltip="Optional edit prompt (e.g. the same prompt with the fix spelled out); defaults to the target's own conditioning."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="Optional negative conditioning; defaults to the target's recorded negative "
                                              "(a zeroed prompt when none was recorded)."),
                io.Image.Input("edited_image", optional=True,
                               tooltip="Your corrected version(s) of the target(s) for method=edited_image, one per target, same size."),
                # added after the first release: after every older input (workflows store them by position)
                io.Combo.Input("copy_detector", options=[paths.PIXEL, *paths.copy_detector_files()], default=paths.PIXEL, optional=True,
                               tooltip="The detector that must not call a surrogate a copy of its target (Preserve Check's): "
                                       "pixel (built in) or an SSCD TorchScript file from models/unlearn/."),
                io.Float.Input("forget_threshold", default=0.7, min=0.0, max=1.0, step=0.01, optional=True,
                               tooltip="Preserve Check's copy threshold. A surrogate must score the forgetting check's margin "
                                       "(check_margin, 0.05 by default) below it: training pulls the target towards its "
                                       "surrogate, so one nearer can never be verified as forgotten. sdedit/inpaint rebuild "
                                       "such a surrogate (other seeds, then stronger edits); other methods refuse it."),
            ],  # fmt: skip
            outputs=[
                TargetsType.Output(display_name="targets", tooltip="The targets with their surrogates attached."),
                io.Image.Output(display_name="preview", tooltip="target | surrogate, side by side, one row per target."),
                io.String.Output(display_name="similarity", tooltip="SSIM and copy similarity between each target and its surrogate "
                                                                    "(1 = identical), and any rebuild."),
            ],
        )

    @classmethod
    def execute(cls, model, vae, targets, method, strength, seed, steps, cfg, sampler_name, scheduler, noise_std,
                edit_conditioning=None, negative=None, edited_image=None, copy_detector=paths.PIXEL,
                forget_threshold=0.7) -> io.NodeOutput:  # fmt: skip
        if len(targets) == 0:
            raise InputError("no targets: mark at least one output first")
        if method == "edited_image":
            if edited_image is None or len(edited_image) != len(targets):
                count = 0 if edited_image is None else len(edited_image)
                raise InputError(f"method=edited_image needs one edited image per target ({len(targets)}), got {count}")
        if method == "inpaint" and any(t.mask is None for t in targets.targets):
            raise InputError("method=inpaint needs a mask on every target: connect a mask to Mark Undesired Output")
        host_model = HostModel(model)
        host_model.family()  # an unsupported model is refused before any sampling
        detector = paths.load_copy_detector(copy_detector)  # a missing file fails before any sampling
        sampler = host_model.sampler()
        # the default check's bar: Instance Unlearn LoRA verifies forgetting with check_margin below the threshold
        copy_at = UnlearnConfig().surrogate_below(forget_threshold)
        built, previews, lines = [], [], []
        for index, target in enumerate(targets.targets):
            latent = target_latent(target, vae)
            positive = edit_conditioning or target.conditioning
            if method in SAMPLED_KINDS and positive is None:
                raise InputError(
                    "this target has no conditioning: connect the conditioning that produced it to Mark "
                    "Undesired Output, or give edit_conditioning here"
                )
            prompt = HostPrompt(positive, negative if negative is not None else target.negative, steps, cfg,
                                sampler_name, scheduler)  # fmt: skip
            edited = None
            if method == "edited_image":
                if edited_image[index].shape[:2] != target.image.shape[:2]:
                    raise InputError(
                        f"edited image {index} is {tuple(edited_image[index].shape[:2])} but its target is "
                        f"{tuple(target.image.shape[:2])}: the surrogate must have the target's size"
                    )
                edited = encode(vae, edited_image[index].unsqueeze(0)).float()
            mask = None if target.mask is None else target.mask.reshape(1, 1, *target.mask.shape)
            target_image = images.to_core(target.image)[None]

            def make(edit_strength, edit_seed, latent=latent, prompt=prompt, mask=mask, edited=edited):
                return build_surrogate(method, latent, sampler=sampler, prompt=prompt, strength=edit_strength, seed=edit_seed,
                                       mask=mask, edited=edited, noise_std=noise_std)  # fmt: skip

            decoded = {}  # the last surrogate judged is the one kept: its image is reused below

            def copy_score(surrogate, _target, target_image=target_image, decoded=decoded):
                decoded["image"] = decode(vae, surrogate)[0]
                return float(copy_similarity(detector, at_size(images.to_core(decoded["image"]), target_image), target_image)[0])

            try:
                if method in SAMPLED_KINDS:
                    surrogate, note = away_from_copy(make, latent, copy_score, copy_at, strength, seed + index,
                                                     f"the surrogate of target {index}")  # fmt: skip
                else:
                    surrogate = make(strength, seed + index)
                    note = {"copy_similarity": copy_score(surrogate, latent), "rebuilt": False}
                    if note["copy_similarity"] >= copy_at:
                        raise InputError(f"the {method} surrogate is (near) a copy of its target (copy similarity "
                                         f"{note['copy_similarity']:.3f} >= {copy_at:g}, the forgetting check's bar): training "
                                         "towards it cannot make the check call the target forgotten; edit it more, or use "
                                         "sdedit/inpaint")  # fmt: skip
            except InputError as error:
                raise InputError(f"target {index} ({target.id}): {error}") from None
            surrogate_image = decoded["image"]
            score = surrogate_similarity(images.to_core(target.image), images.to_core(surrogate_image))
            line = f"target {index} ({target.id}): SSIM(target, surrogate) = {score:.3f}, copy similarity {note['copy_similarity']:.3f}"
            if note["rebuilt"]:
                line += (f" (rebuilt: the first edit was a copy at {note['tried'][0]['copy_similarity']:.3f}; now strength "
                         f"{note['strength']:g}, seed {note['seed']})")  # fmt: skip
            lines.append(line)
            built.append(Target(**{**target.__dict__, "latent": latent[0], "surrogate_latent": surrogate[0].float(),
                                   "surrogate_image": surrogate_image, "surrogate_method": method}))  # fmt: skip
            previews.append(_side_by_side(target.image, surrogate_image))
        return io.NodeOutput(targets.with_targets(built), images.preview_batch(previews), "\n".join(lines))


def _side_by_side(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    if right.shape[:2] != left.shape[:2]:
        right = F.interpolate(right.permute(2, 0, 1)[None], size=left.shape[:2], mode="bilinear")[0].permute(1, 2, 0)
    return torch.cat([left, right.to(left)], dim=1)
