"""LoRA weights: one in-memory form, the key formats hosts load, exact qkv conversion, safe files.

In memory a LoRA is a :class:`LoraWeights`: module name -> :class:`LoraLayer` (down, up, alpha),
with the weight delta ``alpha / rank * up @ down``. Module names live in one of these namespaces:

- ``diffusers``: names inside a diffusers model (``transformer_blocks.0.attn.to_q``), what peft
  trains on a diffusers model; :attr:`LoraWeights.kind` says which network (SD3's, Flux's and
  Qwen-Image's double blocks share these names, so the names alone cannot);
- ``mmdit``: names inside ComfyUI's MMDiT (``joint_blocks.0.x_block.attn.qkv``), where q, k and v
  are one fused linear;
- ``comfy``: names inside another ComfyUI diffusion model (a UNet's ``input_blocks...``), what the
  ComfyUI host trains there; saved with ComfyUI's keys only;
- ``kohya``: a file's ``lora_unet_<diffusers name, dots as underscores>`` names (SD1.5 / SDXL), read
  back onto a model's own names with :func:`from_kohya`.

:func:`to_mmdit` and :func:`to_diffusers` convert SD3 LoRAs between them without approximation:
separate q/k/v LoRAs become one fused LoRA with the downs stacked and a block-diagonal up;
a fused LoRA splits into row slices of its up (keeping only the columns each slice uses).

Files (:func:`save_lora`) are safetensors written atomically with metadata, in the key format
the reader wants (docs/COMFYUI.md), by the network's kind:

- ``comfy``, keys ComfyUI's stock LoRA loader maps onto its own model, with ``lora_up`` /
  ``lora_down`` / ``alpha``: SD3 ``diffusion_model.joint_blocks.0.x_block.attn.qkv`` (fused qkv);
  Qwen-Image ``diffusion_model.transformer_blocks.0.attn.to_q`` (ComfyUI's Qwen-Image uses
  diffusers' names); SD1.5 / SDXL ``lora_unet_down_blocks_1_attentions_0_..._attn1_to_q`` (kohya
  names, which ComfyUI maps through its diffusers UNet table; it does not map peft's
  ``unet.*.to_q`` names). Flux has none here: ComfyUI fuses q, k, v (and in single blocks the MLP
  input) into one layer, and its loader reads Flux's diffusers keys, so save Flux as ``diffusers``.
- ``diffusers``: peft names with the pipeline's component prefix, what diffusers'
  ``load_lora_adapter`` / ``load_lora_weights`` read: ``transformer.transformer_blocks.0.attn.to_q.lora_A.weight``
  / ``lora_B`` (scale folded in); ``unet.`` for SD1.5 / SDXL UNets.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..errors import InputError
from ..version import __version__
from .files import atomic_path, read_safetensors, tensor_hash

__all__ = [
    "LoraLayer",
    "LoraWeights",
    "to_mmdit",
    "to_diffusers",
    "state_dict_for",
    "parse_state_dict",
    "from_kohya",
    "check_key_format",
    "default_key_format",
    "save_lora",
    "load_lora",
    "sum_of",
    "reproduction_metadata",
    "REPRODUCTION_KEYS",
    "KEY_FORMATS",
    "safetensors_bytes",
    "safetensors_header",
]

KEY_FORMATS = ("comfy", "diffusers")
_KOHYA_PREFIX = "lora_unet_"


@dataclass
class LoraLayer:
    """down: (r, in[, kh, kw]); up: (out, r[, 1, 1]); delta = alpha / r * up @ down."""

    down: torch.Tensor
    up: torch.Tensor
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The weight change this layer adds, shaped like the base weight."""
        up = self.up.flatten(1).double()
        down = self.down.flatten(1).double()
        delta = self.scale * (up @ down)
        if self.down.dim() == 4:
            return delta.reshape(self.up.shape[0], *self.down.shape[1:])
        return delta

    def folded(self) -> LoraLayer:
        """The same delta with the scale moved into ``up`` (alpha = rank)."""
        return LoraLayer(self.down, self.up * self.scale, float(self.rank))


@dataclass
class LoraWeights:
    layers: dict[str, LoraLayer]
    namespace: str = "diffusers"
    metadata: dict[str, str] = field(default_factory=dict)
    #: the diffusers network the names belong to ('sd3', 'flux', 'qwen_image', 'unet', 'unet_cond'),
    #: when known; decides the key formats (saved as the file's ``unlearn.model_kind``)
    kind: str | None = None


def sum_of(loras: list[LoraWeights]) -> LoraWeights:
    """One LoRA whose every delta is exactly the sum of the given LoRAs' deltas: per layer the
    downs stacked and the ups side by side, each up carrying its own scale (rank = the sum of the
    ranks, alpha = rank). Applying it equals applying all of them at strength 1 (for several
    unlearning results one after another: the merged file of a model line). Their names must live
    in one namespace of one network."""
    if not loras:
        raise InputError("nothing to sum: give at least one LoRA")
    namespaces, kinds = {w.namespace for w in loras}, {w.kind for w in loras} - {None}
    if len(namespaces) > 1 or len(kinds) > 1:
        raise InputError(f"these LoRAs name layers of different networks or in different key formats "
                         f"({sorted(namespaces)}, {sorted(kinds)}); convert them to one (unlearn_core.formats.lora.to_diffusers)")  # fmt: skip
    names = sorted({name for w in loras for name in w.layers})
    layers = {}
    for name in names:
        parts = [w.layers[name].folded() for w in loras if name in w.layers]
        shapes = {(p.up.shape[0], *p.down.shape[1:]) for p in parts}
        if len(shapes) > 1:
            raise InputError(f"layer {name} has different shapes in these LoRAs ({sorted(shapes)}): they are not of one model")
        down = torch.cat([p.down.float() for p in parts], dim=0)
        up = torch.cat([p.up.float() for p in parts], dim=1)
        layers[name] = LoraLayer(down, up, float(down.shape[0]))
    return LoraWeights(layers, loras[0].namespace, kind=next(iter(kinds), None))


# --- SD3: diffusers <-> MMDiT names ------------------------------------------------------------

_QKV = {
    "attn.to_q": ("x_block.attn.qkv", 0),
    "attn.to_k": ("x_block.attn.qkv", 1),
    "attn.to_v": ("x_block.attn.qkv", 2),
    "attn.add_q_proj": ("context_block.attn.qkv", 0),
    "attn.add_k_proj": ("context_block.attn.qkv", 1),
    "attn.add_v_proj": ("context_block.attn.qkv", 2),
}
_DIRECT = {
    "attn.to_out.0": "x_block.attn.proj",
    "attn.to_add_out": "context_block.attn.proj",
    "ff.net.0.proj": "x_block.mlp.fc1",
    "ff.net.2": "x_block.mlp.fc2",
    "ff_context.net.0.proj": "context_block.mlp.fc1",
    "ff_context.net.2": "context_block.mlp.fc2",
}
_DIFFUSERS_BLOCK = re.compile(r"^transformer_blocks\.(\d+)\.(.+)$")
_MMDIT_BLOCK = re.compile(r"^joint_blocks\.(\d+)\.(.+)$")


def _unsupported(name: str, namespace: str) -> InputError:
    return InputError(
        f"LoRA module {name!r} ({namespace}) has no exact SD3 MMDiT counterpart; train LoRA only on "
        "attention (to_q/k/v, to_out.0, add_*_proj, to_add_out) or ff layers"
    )


def to_mmdit(weights: LoraWeights) -> LoraWeights:
    """Separate q/k/v LoRAs of a diffusers SD3 transformer -> ComfyUI's fused MMDiT LoRAs."""
    if weights.namespace == "mmdit":
        return weights
    layers: dict[str, LoraLayer] = {}
    fused: dict[str, dict[int, LoraLayer]] = {}
    for name, layer in weights.layers.items():
        match = _DIFFUSERS_BLOCK.match(name)
        if not match:
            raise _unsupported(name, "diffusers")
        block, inner = match.groups()
        if inner in _QKV:
            target, part = _QKV[inner]
            fused.setdefault(f"joint_blocks.{block}.{target}", {})[part] = layer.folded()
        elif inner in _DIRECT:
            layers[f"joint_blocks.{block}.{_DIRECT[inner]}"] = layer
        else:
            raise _unsupported(name, "diffusers")
    for name, parts in fused.items():
        any_part = next(iter(parts.values()))
        out_features, in_features = any_part.up.shape[0], any_part.down.shape[1]
        downs = [parts[p].down for p in sorted(parts)]
        total_rank = sum(d.shape[0] for d in downs)
        up = any_part.up.new_zeros(3 * out_features, total_rank)
        column = 0
        for part in sorted(parts):
            rank = parts[part].rank
            up[part * out_features : (part + 1) * out_features, column : column + rank] = parts[part].up
            column += rank
        down = torch.cat(downs) if downs else any_part.down.new_zeros(0, in_features)
        layers[name] = LoraLayer(down, up, float(total_rank))
    return LoraWeights(dict(sorted(layers.items())), "mmdit", dict(weights.metadata), weights.kind)


def to_diffusers(weights: LoraWeights) -> LoraWeights:
    """ComfyUI MMDiT LoRAs (fused qkv) -> separate diffusers SD3 LoRAs, exactly."""
    if weights.namespace == "diffusers":
        return weights
    if weights.namespace == "comfy":
        raise InputError("this LoRA has ComfyUI module names of a model that is not SD3: save it with key format 'comfy'")
    if weights.namespace == "kohya":
        raise InputError("this LoRA has kohya names (lora_unet_...): read them onto the model's names with "
                         "unlearn_core.formats.lora.from_kohya")  # fmt: skip
    direct_back = {v: k for k, v in _DIRECT.items()}
    qkv_back = {(target, part): inner for inner, (target, part) in _QKV.items()}
    layers: dict[str, LoraLayer] = {}
    for name, layer in weights.layers.items():
        match = _MMDIT_BLOCK.match(name)
        if not match:
            raise _unsupported(name, "mmdit")
        block, inner = match.groups()
        if inner in direct_back:
            layers[f"transformer_blocks.{block}.{direct_back[inner]}"] = layer
            continue
        if inner not in ("x_block.attn.qkv", "context_block.attn.qkv"):
            raise _unsupported(name, "mmdit")
        folded = layer.folded()
        out_features = folded.up.shape[0] // 3
        for part in range(3):
            rows = folded.up[part * out_features : (part + 1) * out_features]
            used = rows.abs().sum(dim=0) != 0  # block-diagonal ups keep only their own columns
            if not used.any():
                continue
            up, down = rows[:, used], folded.down[used]
            layers[f"transformer_blocks.{block}.{qkv_back[(inner, part)]}"] = LoraLayer(down, up, float(down.shape[0]))
    return LoraWeights(dict(sorted(layers.items())), "diffusers", dict(weights.metadata), weights.kind)


def from_kohya(weights: LoraWeights, module_names) -> LoraWeights:
    """kohya names (``lora_unet_`` + the diffusers name with dots as underscores) -> the names of a
    model's modules (``module_names``), which make the mapping unambiguous."""
    if weights.namespace != "kohya":
        return weights
    by_key = {_KOHYA_PREFIX + name.replace(".", "_"): name for name in module_names}
    unknown = sorted(set(weights.layers) - set(by_key))
    if unknown:
        raise InputError(f"LoRA module {unknown[0]!r} names no layer of this model; apply the LoRA to the model it was "
                         "trained on")  # fmt: skip
    layers = {by_key[name]: layer for name, layer in weights.layers.items()}
    return LoraWeights(dict(sorted(layers.items())), "diffusers", dict(weights.metadata), weights.kind)


# --- key formats -------------------------------------------------------------------------------

#: the pipeline component a diffusers-format LoRA's keys start with (load_lora_adapter's prefix)
_DIFFUSERS_PREFIX = {"unet_cond": "unet."}
#: kinds with no 'comfy' key format here (see the module docstring), and what to use instead
_NO_COMFY_KEYS = {
    "flux": "ComfyUI fuses Flux's q, k and v (and in single blocks the MLP input) into one layer, and its LoRA loader "
            "reads Flux's diffusers keys: save with key format 'diffusers'",
}


def default_key_format(kind: str | None) -> str:
    """'comfy' where this module writes ComfyUI's keys for ``kind``, else 'diffusers'."""
    return "diffusers" if kind in _NO_COMFY_KEYS else "comfy"


def check_key_format(kind: str | None, key_format: str) -> None:
    """Refuse a key format that cannot be written for ``kind``, saying which one to use."""
    if key_format not in KEY_FORMATS:
        raise InputError(f"unknown LoRA key format {key_format!r}; choose one of {', '.join(KEY_FORMATS)}")
    if key_format == "comfy" and kind in _NO_COMFY_KEYS:
        raise InputError(f"key format 'comfy' is not written for a {kind} LoRA: {_NO_COMFY_KEYS[kind]}")


def state_dict_for(weights: LoraWeights, key_format: str) -> dict[str, torch.Tensor]:
    """Tensors keyed for ``key_format``: 'comfy' (ComfyUI's keys) or 'diffusers' (peft's)."""
    check_key_format(weights.kind if weights.namespace == "diffusers" else None, key_format)
    if key_format == "comfy":
        if weights.namespace == "kohya":
            names = dict(weights.layers)  # a kohya file's names, kept
        elif weights.namespace == "diffusers" and weights.kind == "unet_cond":
            names = {_KOHYA_PREFIX + name.replace(".", "_"): layer for name, layer in weights.layers.items()}
        else:
            mmdit = to_mmdit(weights) if _is_sd3(weights) else weights
            names = {f"diffusion_model.{name}": layer for name, layer in mmdit.layers.items()}
        tensors = {}
        for name, layer in names.items():
            tensors[f"{name}.lora_down.weight"] = layer.down
            tensors[f"{name}.lora_up.weight"] = layer.up
            tensors[f"{name}.alpha"] = torch.tensor(layer.alpha)
        return _contiguous(tensors)
    plain = to_diffusers(weights)
    prefix = _DIFFUSERS_PREFIX.get(weights.kind, "transformer.")
    tensors = {}
    for name, layer in plain.layers.items():
        folded = layer.folded()
        tensors[f"{prefix}{name}.lora_A.weight"] = folded.down
        tensors[f"{prefix}{name}.lora_B.weight"] = folded.up
    return _contiguous(tensors)


def _contiguous(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {key: value.detach().to("cpu").contiguous() for key, value in tensors.items()}


def _is_sd3(weights: LoraWeights) -> bool:
    if weights.namespace != "diffusers":  # ComfyUI's own names: MMDiT's, or another network's as they are
        return weights.namespace == "mmdit"  # (Qwen-Image's are spelled like diffusers' SD3 names)
    if weights.kind is not None:  # Flux's and Qwen-Image's double blocks are named like SD3's blocks
        return weights.kind == "sd3"
    return all(_DIFFUSERS_BLOCK.match(name) for name in weights.layers)  # a LoRA of unrecorded origin


_SUFFIXES = {
    ".lora_down.weight": "down",
    ".lora_up.weight": "up",
    ".lora_A.weight": "down",
    ".lora_B.weight": "up",
    ".alpha": "alpha",
}
_PREFIXES = ("diffusion_model.", "transformer.", "base_model.model.", "unet.")


def parse_state_dict(tensors: dict[str, torch.Tensor]) -> LoraWeights:
    """Read either key format back into :class:`LoraWeights` (namespace inferred from names)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for suffix, role in _SUFFIXES.items():
            if key.endswith(suffix):
                module = key[: -len(suffix)]
                for prefix in _PREFIXES:
                    if module.startswith(prefix):
                        module = module[len(prefix) :]
                        break
                parts.setdefault(module, {})[role] = value
                break
        else:
            raise InputError(f"unexpected key {key!r} in LoRA file: not a lora_up/lora_down/lora_A/lora_B/alpha")
    layers = {}
    for module, roles in parts.items():
        if "down" not in roles or "up" not in roles:
            raise InputError(f"LoRA module {module!r} lacks its up or down matrix; the file is incomplete")
        rank = roles["down"].shape[0]
        alpha = float(roles["alpha"]) if "alpha" in roles else float(rank)
        layers[module] = LoraLayer(roles["down"], roles["up"], alpha)
    if any(name.startswith("joint_blocks.") for name in layers):
        namespace = "mmdit"
    elif layers and all(name.startswith(_KOHYA_PREFIX) for name in layers):
        namespace = "kohya"
    else:
        namespace = "diffusers"
    return LoraWeights(dict(sorted(layers.items())), namespace)


# --- files -------------------------------------------------------------------------------------

#: what every unlearning LoRA records so that the run can be repeated and audited
REPRODUCTION_KEYS = (
    "unlearn.method", "unlearn.config", "unlearn.target_hashes", "unlearn.surrogate_hashes",
    "unlearn.base_model", "unlearn.pack_version",
)  # fmt: skip


def reproduction_metadata(config, data, base_model: str, **extra) -> dict[str, str]:
    """LoRA file metadata that reproduces a run: method, every hyperparameter (seed included),
    the content hashes of the targets and surrogates the trainer saw (``data``, an
    :class:`~unlearn_core.data.sets.UnlearnData`: :func:`~unlearn_core.formats.files.tensor_hash` of each, in
    the network's space, for every caller alike), the base model, the pack version, and ``extra``
    fields as ``unlearn.<key>`` (values that are not text become JSON; a marked target's forget-set
    ids go in ``target_ids``)."""
    metadata = {
        "unlearn.method": config.method,
        "unlearn.config": json.dumps(config.to_dict(), sort_keys=True),
        "unlearn.target_hashes": json.dumps([tensor_hash(t) for t in data.forget.targets.detach().cpu()]),
        "unlearn.surrogate_hashes": json.dumps([tensor_hash(s) for s in data.forget.surrogates.detach().cpu()]),
        "unlearn.base_model": base_model,
        "unlearn.pack_version": __version__,
    }
    for key, value in extra.items():
        metadata[f"unlearn.{key}"] = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    return metadata


def save_lora(
    path: str | Path, weights: LoraWeights, key_format: str = "comfy", metadata: dict | None = None
) -> Path:
    """Write a LoRA as safetensors, atomically. Metadata values that are not text become JSON."""
    tensors = state_dict_for(weights, key_format)
    if not tensors:
        raise InputError("the LoRA holds no layers; nothing to save")
    merged = {**weights.metadata, **(metadata or {}), "unlearn.key_format": key_format}
    if weights.kind is not None:
        merged["unlearn.model_kind"] = weights.kind
    text = {key: value if isinstance(value, str) else json.dumps(value, sort_keys=True) for key, value in merged.items()}
    with atomic_path(path) as temporary:
        temporary.write_bytes(safetensors_bytes(tensors, text))
    return Path(path)


_DTYPES = {torch.float32: "F32", torch.float16: "F16", torch.bfloat16: "BF16", torch.float64: "F64"}


def safetensors_bytes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> bytes:
    """The safetensors encoding with every key sorted, so equal LoRAs give equal bytes.

    (The reference writer keeps metadata in a hash map whose order changes between runs.)
    """
    header, ordered = safetensors_header(tensors, metadata)
    return header + b"".join(tensor_bytes(tensor) for _, tensor in ordered)


def safetensors_header(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[bytes, list]:
    """The length-prefixed header and the (key, tensor) pairs in the order their bytes follow it.

    Writers that stream large tensors one at a time (full fine-tuning results) share it with
    :func:`safetensors_bytes`, so both give the same bytes for the same tensors.
    """
    header: dict = {"__metadata__": dict(sorted(metadata.items()))}
    ordered, offset = [], 0
    for key in sorted(tensors):
        tensor = tensors[key]
        if tensor.dtype not in _DTYPES:
            raise InputError(f"tensor {key!r} has dtype {tensor.dtype}, which these files do not use")
        size = tensor.numel() * tensor.element_size()
        header[key] = {"dtype": _DTYPES[tensor.dtype], "shape": list(tensor.shape), "data_offsets": [offset, offset + size]}
        ordered.append((key, tensor))
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode("utf-8")
    encoded += b" " * (-len(encoded) % 8)  # the format aligns the data to 8 bytes
    return len(encoded).to_bytes(8, "little") + encoded, ordered


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """A tensor's raw little-endian bytes, as safetensors stores them."""
    return tensor.detach().to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()


def load_lora(path: str | Path) -> LoraWeights:
    tensors, metadata = read_safetensors(path, "LoRA file")
    weights = parse_state_dict(tensors)
    weights.metadata = metadata
    weights.kind = metadata.get("unlearn.model_kind")  # which network the names belong to, when recorded
    if metadata.get("unlearn.key_format") == "comfy" and weights.namespace == "diffusers":
        # written with ComfyUI's keys by this pack: the names are ComfyUI's own (a Qwen-Image
        # transformer's are spelled like diffusers' SD3 names, so the names alone cannot say)
        weights.namespace = "comfy"
    return weights
