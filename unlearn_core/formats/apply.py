"""Use an unlearning result outside ComfyUI: merge it into a diffusers model or pipeline.

A result is either a LoRA file in any key format this pack writes (``comfy``: ComfyUI-native
keys, fused qkv for SD3, kohya names for SD1.5 / SDXL; ``diffusers``: ``transformer.*.lora_A/B`` or
``unet.*.lora_A/B``), or a full-weights file from
``adapter: "full"`` (:mod:`unlearn_core.formats.full_weights`). Merging adds ``scale * alpha / rank * up @
down`` to each named weight (in float64, then the weight's own dtype), which gives the same
outputs as running the model with the LoRA attached; a full-weights file replaces every weight.

- :func:`merge_into`: a loaded model (any class of :data:`~unlearn_core.formats.model_folders.COMPONENTS`), in place;
- :func:`apply_to_pipeline`: a loaded pipeline's ``unet`` or ``transformer``, in place;
- :func:`apply_to_folder`: a model or pipeline folder on disk -> a new folder that
  ``from_pretrained`` loads, written beside the target and renamed into place in one step, so a
  half-written folder is never seen (the source folder is only read).

    python -m unlearn_core apply --model ddpm-pipeline --result forget.safetensors --out ddpm-unlearned
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import InputError
from .files import atomic_write_text, file_sha256
from .full_weights import FullWeights, is_full_weights, load_full_weights
from .lora import LoraWeights, from_kohya, load_lora, to_diffusers
from .model_folders import COMPONENTS

__all__ = ["load_result", "in_model_names", "merge_into", "merged", "apply_to_pipeline", "apply_to_folder", "APPLIED_RECORD"]

#: written into every folder apply_to_folder makes: which result, at which scale, on which base
APPLIED_RECORD = "unlearn_applied.json"
_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}


def load_result(path: str | Path) -> LoraWeights | FullWeights:
    """A result file as LoRA weights (diffusers names; kohya names until merged) or full weights, whichever it holds."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"result file {str(path)!r} does not exist; give the .safetensors an unlearning job wrote")
    if is_full_weights(path):
        return load_full_weights(path)
    weights = load_lora(path)
    return to_diffusers(weights) if weights.namespace == "mmdit" else weights


def _check_scale(scale: float, result) -> float:
    scale = float(scale)
    if not torch.isfinite(torch.tensor(scale)):
        raise InputError(f"scale={scale} must be a finite number (1 applies the result as trained)")
    if isinstance(result, FullWeights) and scale != 1.0:
        raise InputError("a full-weights result replaces every weight and has no strength: use scale 1")
    return scale


def in_model_names(lora: LoraWeights, model: torch.nn.Module) -> LoraWeights:
    """``lora`` with the names of ``model``'s own modules (SD3's fused MMDiT names split, kohya
    names read onto the model's, which make that mapping unambiguous)."""
    weights = to_diffusers(lora) if lora.namespace == "mmdit" else lora
    return from_kohya(weights, (name for name, _ in model.named_modules()))


def _deltas(model: torch.nn.Module, lora: LoraWeights) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """(weight, its change) for every layer of ``lora``, each checked against ``model``."""
    weights = in_model_names(lora, model)
    if not weights.layers:
        raise InputError("the LoRA holds no layers; nothing to merge")
    planned = []
    for name, layer in weights.layers.items():
        try:
            weight = model.get_submodule(name).weight
        except AttributeError:
            raise InputError(f"LoRA module {name!r} is not in this {type(model).__name__}; apply the LoRA to the model it "
                             "was trained on") from None  # fmt: skip
        delta = layer.delta()
        if tuple(delta.shape) != tuple(weight.shape):
            raise InputError(f"LoRA module {name!r} changes a {tuple(delta.shape)} weight, but the model's is "
                             f"{tuple(weight.shape)}; apply the LoRA to the model it was trained on")  # fmt: skip
        planned.append((weight, delta))
    return planned


@contextlib.contextmanager
def merged(model: torch.nn.Module, lora: LoraWeights) -> Iterator[torch.nn.Module]:
    """``model`` with ``lora`` merged into its weights for the block, then every touched weight
    restored bit for bit (from a copy, not by subtracting), on error too: earlier results applied
    to a cached base model while a later request trains on top of them."""
    planned = _deltas(model, lora)
    originals = [weight.detach().clone() for weight, _ in planned]
    try:
        with torch.no_grad():
            for weight, delta in planned:
                weight.copy_((weight.double() + delta.to(weight.device)).to(weight.dtype))
        yield model
    finally:
        with torch.no_grad():
            for (weight, _), original in zip(planned, originals, strict=True):
                weight.copy_(original)


@torch.no_grad()
def merge_into(model: torch.nn.Module, result: LoraWeights | FullWeights | str | Path, scale: float = 1.0) -> torch.nn.Module:
    """Merge ``result`` into ``model``'s weights, in place; returns the model.

    Every LoRA module must exist in the model with the shape the LoRA was trained on; otherwise
    nothing is changed and the error names the module.
    """
    result = load_result(result) if isinstance(result, str | Path) else result
    scale = _check_scale(scale, result)
    if isinstance(result, FullWeights):
        state = model.state_dict()
        missing, unexpected = sorted(set(state) - set(result.tensors)), sorted(set(result.tensors) - set(state))
        if missing or unexpected:
            raise InputError(f"the full-weights file does not fit {type(model).__name__}: missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]}; apply it to the model it was trained from")  # fmt: skip
        for key, value in result.tensors.items():
            if value.shape != state[key].shape:
                raise InputError(f"weight {key!r} is {tuple(value.shape)} in the file but {tuple(state[key].shape)} in the "
                                 "model; apply it to the model it was trained from")  # fmt: skip
        model.load_state_dict(result.tensors, strict=True)
        return model
    for weight, delta in _deltas(model, result):  # all checked first: a bad LoRA changes nothing
        weight.copy_((weight.double() + scale * delta.to(weight.device)).to(weight.dtype))
    return model


def apply_to_pipeline(pipeline, result: LoraWeights | FullWeights | str | Path, scale: float = 1.0):
    """Merge ``result`` into a loaded diffusers pipeline's ``transformer`` or ``unet``, in place."""
    for folder, _ in COMPONENTS.values():
        component = getattr(pipeline, folder, None)
        if isinstance(component, torch.nn.Module):
            merge_into(component, result, scale)
            return pipeline
    raise InputError(f"{type(pipeline).__name__} has no transformer or unet to merge the result into")


def _model_class(model_dir: Path):
    import diffusers

    config_file = model_dir / "config.json"
    try:
        name = json.loads(config_file.read_text("utf-8")).get("_class_name")
    except (OSError, ValueError):
        raise InputError(f"{str(model_dir)!r} is not a diffusers model folder (no readable config.json); give the folder "
                         "save_pretrained wrote, or a pipeline folder with model_index.json") from None  # fmt: skip
    supported = {cls for _, cls in COMPONENTS.values()}
    if name not in supported:
        raise InputError(f"{str(model_dir)!r} holds a {name}; results apply to {', '.join(sorted(supported))}")
    return getattr(diffusers, name)


def _saved_dtype(model_dir: Path) -> torch.dtype:
    """The dtype the folder's weights are stored in (merged folders keep it)."""
    for path in sorted(model_dir.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():
                return _DTYPES.get(handle.get_slice(key).get_dtype(), torch.float32)
    return torch.float32


def _component_dir(folder: Path) -> tuple[Path | None, Path]:
    """(pipeline folder or None, the model folder to merge into)."""
    if not (folder / "model_index.json").is_file():
        return None, folder
    index = json.loads((folder / "model_index.json").read_text("utf-8"))
    for name, cls in COMPONENTS.values():
        if isinstance(index.get(name), list) and cls in index[name] and (folder / name).is_dir():
            return folder, folder / name
    known = ", ".join(f"{name}/ {cls}" for name, cls in COMPONENTS.values())
    raise InputError(f"pipeline {str(folder)!r} has no folder of a model results apply to ({known})")


def apply_to_folder(model_dir: str | Path, result_path: str | Path, out_dir: str | Path, scale: float = 1.0) -> Path:
    """Write ``out_dir``: the model (or whole pipeline) of ``model_dir`` with the result merged.

    A pipeline's other components are copied unchanged. ``out_dir`` must not exist yet; the
    folder is built beside it and renamed into place when complete.
    """
    model_dir, result_path, out_dir = Path(model_dir), Path(result_path), Path(out_dir)
    if not model_dir.is_dir():
        raise InputError(f"model folder {str(model_dir)!r} does not exist")
    if out_dir.exists():
        raise InputError(f"{str(out_dir)!r} already exists; give a new folder (apply never overwrites)")
    if out_dir.resolve() == model_dir.resolve() or model_dir.resolve() in out_dir.resolve().parents:
        raise InputError("the output folder must lie outside the model folder")
    result = load_result(result_path)
    scale = _check_scale(scale, result)
    pipeline_dir, component_dir = _component_dir(model_dir)
    cls = _model_class(component_dir)
    model = cls.from_pretrained(str(component_dir), torch_dtype=_saved_dtype(component_dir)).eval()
    merge_into(model, result, scale)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}"
    try:
        staging.mkdir()
        if pipeline_dir is not None:  # the other components (text encoders, VAE, scheduler) as they were
            for entry in sorted(pipeline_dir.iterdir()):
                if entry == component_dir:
                    continue
                if entry.is_dir():
                    shutil.copytree(entry, staging / entry.name)
                else:
                    shutil.copy2(entry, staging / entry.name)
            model.save_pretrained(str(staging / component_dir.name))
        else:
            model.save_pretrained(str(staging))
        record = {"base": str(model_dir), "result": str(result_path), "result_sha256": file_sha256(result_path), "scale": scale,
                  "merged_into": component_dir.name if pipeline_dir is not None else ".",
                  "result_metadata": result.metadata}  # fmt: skip
        atomic_write_text(staging / APPLIED_RECORD, json.dumps(record, indent=2, sort_keys=True))
        os.rename(staging, out_dir)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            shutil.rmtree(staging)
        raise
    return out_dir
