"""Mark Undesired Output: put outputs into a named forget set and pass the set on."""

from __future__ import annotations

import torch
from comfy_api.latest import io

from ..unlearn_core.data.forget_set import check_target
from ..unlearn_core.errors import InputError
from ..unlearn_core.formats.files import safe_name
from . import provenance
from .host.conditioning import conditioning_from_store, conditioning_to_store
from .host.latents import image_latent
from .images import preview_batch
from .targets import Target, TargetsType, UnlearnTargets, store


def parse_indices(text: str, batch: int) -> list[int]:
    """'0', '0,2', '1-3' or 'all' -> sorted batch indices, each checked against the batch size."""
    text = (text or "").strip().lower()
    if text in ("all", "*"):
        return list(range(batch))
    chosen: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        try:
            if "-" in part:
                low, high = (int(v) for v in part.split("-", 1))
                chosen.update(range(low, high + 1))
            else:
                chosen.add(int(part))
        except ValueError:
            raise InputError(f"indices {text!r} are not understood: use e.g. '0', '0,2', '1-3' or 'all'") from None
    bad = sorted(i for i in chosen if not 0 <= i < batch)
    if bad or not chosen:
        raise InputError(f"indices {text!r} do not pick images of this batch of {batch} (valid: 0..{batch - 1})")
    return sorted(chosen)


def _mask_for(mask: torch.Tensor | None, index: int) -> torch.Tensor | None:
    """The mask of image ``index`` (one mask serves the whole batch); check_target validates it."""
    if mask is None:
        return None
    mask = mask if mask.dim() == 3 else mask.unsqueeze(0)
    return mask[min(index, len(mask) - 1)]


def _check_latent_size(samples: torch.Tensor, height: int, width: int) -> None:
    """The latent must be the one these images were decoded from: the same scale on both sides."""
    latent_height, latent_width = samples.shape[-2:]
    scale_h, scale_w = height / latent_height, width / latent_width
    if scale_h != scale_w or not scale_h.is_integer() or scale_h < 1:
        raise InputError(
            f"the latent ({latent_height}x{latent_width}) does not belong to these {height}x{width} images; "
            "connect the sampler's LATENT that the images were decoded from"
        )


NEGATIVE = "negative."  # stored name prefix of the negative conditioning's tensors


class MarkUndesiredOutput(io.ComfyNode):
    @classmethod
    def define_schema(cls):
        return io.Schema(
            node_id="InstanceUnlearn_MarkUndesired",
            display_name="Mark Undesired Output",
            category="unlearn/targets",
            description=(
                "Adds the chosen images of a batch to a named forget set on disk (with the sampler's "
                "latent, an optional mask of the undesired region and where the image came from) and "
                "outputs every target of that set. Marking the same image twice changes nothing. "
                "With no images connected it just loads the set, e.g. one filled from the image "
                "context menu."
            ),
            inputs=[
                io.String.Input("forget_set", default="default",
                                tooltip="Name of the forget set (letters, digits, space, _ - .). Targets accumulate across runs."),
                io.String.Input("indices", default="0",
                                tooltip="Which images of the batch to mark: '0', '0,2', '1-3' or 'all'."),
                io.Image.Input("images", optional=True,
                               tooltip="The generated batch holding the undesired output(s)."),
                io.Latent.Input("latent", optional=True,
                                tooltip="The sampler's output latent for this batch; used instead of re-encoding the image."),
                io.Mask.Input("mask", optional=True,
                              tooltip="Optional undesired region (1 = undesired) at the image size; enables inpaint surrogates."),
                io.Conditioning.Input("conditioning", optional=True,
                                      tooltip="The conditioning that produced the images (context for training; never the selector)."),
                io.Conditioning.Input("negative", optional=True,
                                      tooltip="The sampler's negative conditioning. Connect it whenever cfg > 1: regenerating "
                                              "the target (remember set, Preserve Check) must replay it exactly."),
            ],  # fmt: skip
            outputs=[
                TargetsType.Output(display_name="targets", tooltip="Every target of the forget set, ready for Build Surrogate."),
                io.Image.Output(display_name="marked", tooltip="The images of the forget set (for preview)."),
            ],
            hidden=[io.Hidden.prompt, io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, forget_set, indices, images=None, latent=None, mask=None, conditioning=None,
                negative=None) -> io.NodeOutput:  # fmt: skip
        forget_store = store()
        folder_name = safe_name(forget_set, "forget-set name")
        if images is not None:
            chosen = parse_indices(indices, len(images))
            samples = None if latent is None else image_latent(latent["samples"])
            if samples is not None and len(samples) != len(images):
                raise InputError(f"the latent batch ({len(samples)}) and the image batch ({len(images)}) differ; connect the matching latent")
            height, width = images.shape[1:3]
            if samples is not None:
                _check_latent_size(samples, height, width)
            origin = provenance.from_graph(cls.hidden.prompt, cls.hidden.unique_id)
            cond_tensors = {**conditioning_to_store(conditioning), **conditioning_to_store(negative, NEGATIVE)}
            chosen_inputs = [(index, images[index], None if samples is None else samples[index],
                              _mask_for(mask, index)) for index in chosen]  # fmt: skip
            for _, image, sample, image_mask in chosen_inputs:  # check every chosen output before storing any
                check_target(image, sample, image_mask)
            for index, image, sample, image_mask in chosen_inputs:
                forget_store.add(folder_name, image, latent=sample, mask=image_mask, conditioning=cond_tensors or None,
                                 provenance={**origin, "batch_index": index, "negative_recorded": negative is not None})  # fmt: skip
        records = forget_store.records(folder_name)
        if not records:
            raise InputError(
                f"forget set {folder_name!r} is empty: connect the images to mark (and pick their indices), "
                "or mark an image from its context menu first"
            )
        targets = []
        for record in records:
            stored = forget_store.load_conditioning(folder_name, record)
            stored_negative = conditioning_from_store(stored, NEGATIVE)
            targets.append(Target(
                id=record.id,
                image=forget_store.load_image(folder_name, record),
                latent=forget_store.load_latent(folder_name, record),
                mask=forget_store.load_mask(folder_name, record),
                conditioning=conditioning_from_store(stored) or conditioning,
                negative=stored_negative if stored_negative is not None or stored else negative,
                provenance=record.provenance,
            ))  # fmt: skip
        return io.NodeOutput(UnlearnTargets(folder_name, targets), preview_batch([t.image for t in targets]))
