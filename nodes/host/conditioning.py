"""ComfyUI's CONDITIONING: the model's per-sample tensors for the core, and the tensors a forget
set stores so that a target is replayed as the sampler conditioned it."""

from __future__ import annotations

import comfy.conds
import torch

from ...unlearn_core.diffusion.denoiser import Conditioning
from ...unlearn_core.errors import InputError


def conditioning_tensors(patcher, conditioning, n: int, latent: torch.Tensor) -> Conditioning:
    """ComfyUI CONDITIONING -> the model's keyword tensors (c_crossattn, y, ...) for n samples.

    Uses the model's own ``extra_conds`` so that whatever the model family needs is built the
    way ComfyUI's samplers build it.
    """
    if not conditioning:
        return {}
    if not isinstance(conditioning, list) or not isinstance(conditioning[0], (list, tuple)):
        raise InputError("CONDITIONING is malformed: connect the output of a text encode node")
    cross_attn, extra = conditioning[0][0], dict(conditioning[0][1])
    extra.pop("cross_attn", None)
    built = patcher.model.extra_conds(
        cross_attn=cross_attn, device=latent.device, noise=latent[:1], latent_image=latent[:1], **extra
    )
    tensors: Conditioning = {}
    for key, value in built.items():
        tensor = getattr(value, "cond", None)
        if isinstance(value, comfy.conds.CONDConstant) and isinstance(tensor, (int, float)) and not isinstance(tensor, bool):
            tensors[CONSTANT + key] = torch.full((n,), tensor)  # Lumina 2 / Z-Image's num_tokens
            continue
        if not isinstance(tensor, torch.Tensor):
            continue
        if key == "c_concat":
            raise InputError("inpainting/concat-conditioned models are not supported for unlearning")
        tensor = tensor.detach().clone().to(latent.device)
        tensors[key] = tensor[:1].expand(n, *tensor.shape[1:]).clone() if len(tensor) != n else tensor
    return tensors


#: A number the model takes once per batch (ComfyUI's CONDConstant, such as Lumina 2's text length)
#: rides in the core's batch-first conditioning as one value per sample under this prefix, so that
#: selecting and joining batches keeps it; :func:`with_constants` hands it back as the number.
CONSTANT = "constant:"


def with_constants(cond: Conditioning) -> dict:
    """The model's keyword arguments: every constant as its single value. Samples with different
    values cannot share a batch, as in ComfyUI's own batching of CONDConstant."""
    out = {}
    for key, value in cond.items():
        if not key.startswith(CONSTANT):
            out[key] = value
            continue
        values = value.unique()
        if len(values) != 1:
            raise InputError(f"the conditionings in one batch differ in {key.removeprefix(CONSTANT)} ({values.tolist()}): "
                             "use prompts of the same length for the targets")  # fmt: skip
        out[key.removeprefix(CONSTANT)] = values.item()  # an int stays an int (a length)
    return out


def conditioning_to_store(conditioning, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a CONDITIONING under flat names, for a file: the text tokens, every tensor the
    text encoder gave besides them (pooled output, attention mask, HiDream's Llama layers) and Flux's
    guidance scale, which FluxGuidance sets: all a replay needs to condition as the sampler did."""
    if not conditioning:
        return {}
    tensor, extra = conditioning[0][0], conditioning[0][1]
    tensors = {f"{prefix}cross_attn": tensor}
    for key, value in extra.items():
        if isinstance(value, torch.Tensor) and key != "cross_attn":
            tensors[f"{prefix}{key}"] = value
    if isinstance(extra.get("guidance"), (int, float)):
        tensors[f"{prefix}guidance"] = torch.tensor(float(extra["guidance"]))
    return tensors


def conditioning_from_store(tensors: dict[str, torch.Tensor] | None, prefix: str = ""):
    """The CONDITIONING stored by :func:`conditioning_to_store` (None when there is none). Names
    with a further prefix (the negative's, beside the positive's) belong to another conditioning."""
    if not tensors or f"{prefix}cross_attn" not in tensors:
        return None
    extra = {}
    for name, value in tensors.items():
        key = name.removeprefix(prefix)
        if not name.startswith(prefix) or "." in key or key == "cross_attn":
            continue
        extra[key] = float(value) if key == "guidance" else value
    return [[tensors[f"{prefix}cross_attn"], extra]]


def zero_conditioning(conditioning):
    """The empty-prompt stand-in SD3 graphs build with ConditioningZeroOut."""
    out = []
    for tensor, extra in conditioning:
        extra = dict(extra)
        if isinstance(extra.get("pooled_output"), torch.Tensor):
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(tensor), extra])
    return out
