"""Estimated GPU memory of training at SD3, SD3.5, Flux.1 and Qwen-Image size, counted without a GPU.

The models of benchmarks/gpu_size.py (diffusers' SD3Transformer2DModel at SD3-Medium and
SD3.5-Large size, FluxTransformer2DModel with Flux.1 dev's published config and
QwenImageTransformer2DModel with Qwen-Image's) are built on PyTorch's meta device (shapes, no
storage), a rank-16 LoRA attached as training attaches it, and one training forward pass
(1024x1024 images: 128x128x16 latents; Flux and Qwen-Image take them packed 2x2, 4096 tokens of
64 channels) is traced under ``saved_tensors_hooks``: the bytes of every distinct storage
autograd keeps for the backward pass, less the weights themselves, are the activation memory of
that graph. Text: SD3 77 CLIP + 256 T5 tokens; Flux.1 512 T5 tokens (what diffusers pads to;
ComfyUI pads a shorter prompt to 256, so for it this errs high); Qwen-Image 256 tokens, a long
prompt (neither diffusers nor ComfyUI pads its prompts to a fixed length).

The LoRA covers the layers nodes/host/family.py trains on each family, in diffusers' names
(:func:`lora_targets`): on SD3 and Qwen-Image every attention projection of both streams (to_q,
to_k, to_v, to_out.0, add_q_proj, add_k_proj, add_v_proj, to_add_out); on Flux.1 the double
blocks' img_attn and txt_attn qkv and proj (the same eight projections) and the single blocks'
linear1 (attn.to_q, to_k, to_v and proj_mlp) and linear2 (the block's proj_out; the model's final
proj_out is not a target). Where ComfyUI fuses layers that diffusers splits (SD3's and Flux's
qkv, Flux's linear1) its LoRA has one down matrix for them, diffusers' one per part: the LoRA
state here is a quarter (Flux) to a third (SD3) larger than on ComfyUI's (Flux.1: 46.7 M against
37.4 M LoRA parameters, 0.35 GiB more state). The activations are those of diffusers'
implementations; ComfyUI's compute the same layers with fused projections and their own RoPE
code, which this count does not trace.

Attention is counted as flash attention keeps it on a GPU (q, k, v, the output and the
log-sum-exp), not as the CPU's math kernel would (the whole attention matrix). The count allocates
that output in (batch, heads, tokens, dim) order, so the copy that reshapes it for the output
projection is counted too; CUDA's kernel returns it token-major, which makes that reshape a view:
the activations err high by one output-sized tensor per attention (about 8% of them for the SD3
sizes, 5% for Qwen-Image, 2% for Flux.1, whose single blocks keep no such copy). Flux's q/k norm
(``torch.nn.RMSNorm``) is counted as CUDA's fused kernel keeps it (the input and the reciprocal
RMS), not as the CPU's composite form would (a float32 copy of the input); Qwen-Image's is
diffusers' own RMSNorm, the same operations on either. The estimate of a training step's peak is
then

    weights (params x 2 bytes in bf16, x 1 in fp8: every layer counted at one byte)
  + LoRA state (weights, gradient, AdamW's two moments or 8-bit ones, the forget, remember and
    combined gradient vectors the surgery works on)
  + saved activations of one pass (checkpointing off: the whole batch in one pass, as the
    trainer's gradient split runs it; on: half the batch per pass, block inputs only)
  + the backward's working set (one block's activations for the pass: the activations without
    checkpointing over the number of blocks; Flux's double and single blocks are averaged)
  + OVERHEAD_GIB for the CUDA context and the allocator's slack.

A listed GPU of N GB fits a setting whose estimate is at most 95% of N x 10^9 bytes. These are
estimates until benchmarks/gpu_size.py measures the peak on a GPU; the test suite checks that the
meta-device count equals the count of a real forward pass on the CPU, per family.

    python benchmarks/memory_estimate.py          # under a minute on one CPU thread; writes benchmarks/results/memory_estimate.json
    python benchmarks/memory_estimate.py --table  # the README's table, from that JSON
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_size import SIZES, build_model

from unlearn_core.backends.diffusers_backend import (
    DEFAULT_LORA_TARGETS,
    flux_image_ids,
    gradient_checkpointing,
    lora_attached,
)

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
RANK = 16
OVERHEAD_GIB = 1.5
BATCHES = (8, 4, 2)  # forget + remember samples per step: at least one of each
GPUS_GB = (12, 16, 24, 32, 48, 80)
WEIGHT_BYTES = {"bf16": 2, "fp8": 1}
# per LoRA parameter: float32 weight and gradient, AdamW's two moments (8-bit: one byte each),
# and the forget, remember and combined gradient as float32 vectors plus the double-precision norm copy
LORA_BYTES = {"adamw": 4 + 4 + 8 + 12 + 8, "adamw_8bit": 4 + 4 + 2 + 12 + 8}


class _FlashAttention(torch.autograd.Function):
    """Attention whose backward keeps what flash attention keeps; only its forward is ever run."""

    @staticmethod
    def forward(ctx, q, k, v):
        out = q.new_empty(q.shape) if q.device.type == "meta" else _sdpa(q, k, v)
        ctx.save_for_backward(q, k, v, out, q.new_empty(q.shape[:-1], dtype=torch.float32))
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the count never runs a backward pass
        raise NotImplementedError


_sdpa = F.scaled_dot_product_attention


class _FusedRMSNorm(torch.autograd.Function):
    """RMS norm whose backward keeps what CUDA's fused kernel keeps; only its forward is ever run."""

    @staticmethod
    def forward(ctx, x, normalized_shape, weight, eps):
        out = _rms_norm(x, normalized_shape, weight, eps)
        dims = len(normalized_shape)
        rstd = x.new_empty((*x.shape[: x.dim() - dims], *(1,) * dims), dtype=torch.float32)
        ctx.save_for_backward(x, rstd, weight)
        return out

    @staticmethod
    def backward(ctx, grad):  # pragma: no cover - the count never runs a backward pass
        raise NotImplementedError


_rms_norm = F.rms_norm


@contextlib.contextmanager
def _cuda_kernels():
    """Attention and torch's RMS norm as CUDA's kernels keep them for the backward pass."""

    # SD3's processor passes query, key and value by position, diffusers' attention dispatch (Flux,
    # Qwen-Image) by name
    def attention(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if attn_mask is not None or dropout_p or is_causal or scale is not None:
            raise ValueError("the count models plain attention only")
        return _FlashAttention.apply(query, key, value)

    def rms_norm(input, normalized_shape, weight=None, eps=None):
        return _FusedRMSNorm.apply(input, tuple(normalized_shape), weight, eps)

    F.scaled_dot_product_attention, F.rms_norm = attention, rms_norm
    try:
        yield
    finally:
        F.scaled_dot_product_attention, F.rms_norm = _sdpa, _rms_norm


def lora_targets(size: dict) -> tuple[str, ...]:
    """The layers the pack puts a LoRA on in this family (the backend's DEFAULT_LORA_TARGETS), as
    lora_attached's target_modules. Given names match anywhere, and Flux's final projection is
    called proj_out too: its single blocks' linear2 goes by full name."""
    targets = DEFAULT_LORA_TARGETS[size["family"].replace("-", "_")]
    if size["family"] != "flux":
        return targets
    single_out = tuple(f"single_transformer_blocks.{i}.proj_out" for i in range(size["single"]))
    return (*(t for t in targets if t != "proj_out"), *single_out)


def _inputs(size: dict, batch: int, tensor, device: str) -> tuple[torch.Tensor, dict]:
    """The latents the loss compares the output with, and the forward's arguments."""
    text = {"encoder_hidden_states": tensor(batch, size["tokens"], size["text"])}
    if size["family"] == "sd3":
        x = tensor(batch, 16, size["latent"], size["latent"])
        return x, {"hidden_states": x, **text, "pooled_projections": tensor(batch, size["pooled"]),
                   "timestep": torch.rand(batch).to(device)}  # fmt: skip
    side = size["latent"] // 2  # 2x2 patches packed into 64 channels: one token each
    x = tensor(batch, side * side, 64)
    timestep = torch.rand(batch).to(device)
    if size["family"] == "flux":
        img_ids = flux_image_ids(side, side, device, torch.bfloat16)
        return x, {"hidden_states": x, **text, "pooled_projections": tensor(batch, size["pooled"]), "timestep": timestep,
                   "img_ids": img_ids, "txt_ids": torch.zeros(size["tokens"], 3).to(device, torch.bfloat16),
                   "guidance": torch.full((batch,), 3.5).to(device)}  # fmt: skip
    # Qwen-Image: every prompt of the batch the same length, so no text mask (and attention stays plain)
    return x, {"hidden_states": x, **text, "timestep": timestep, "img_shapes": [(1, side, side)] * batch}


def count(size: dict, batch: int, checkpointing: bool, device: str = "meta") -> dict:
    """Parameters, LoRA parameters and layers, and bytes autograd saves in one training forward pass."""
    model = build_model(size, device, torch.bfloat16)
    saved: dict[int, int] = {}
    weights: set[int] = set()  # a frozen layer keeps its weight for the input gradient: counted as weights already

    def keep(tensor):
        storage = tensor.untyped_storage()
        if storage._cdata not in weights:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    generator = torch.Generator().manual_seed(0)

    def tensor(*shape):
        return torch.randn(*shape, generator=generator).to(device, torch.bfloat16)

    attached = lora_attached(model, rank=RANK, target_modules=lora_targets(size))
    with attached as lora, gradient_checkpointing(model, checkpointing), _cuda_kernels():
        # with the tensors modules hold as plain attributes (Qwen-Image's RoPE table): state, not activations
        held = [v for module in model.modules() for v in vars(module).values() if isinstance(v, torch.Tensor)]
        weights.update(t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers(), *held))
        x, inputs = _inputs(size, batch, tensor, device)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = model(**inputs).sample
            (out.float() - x.float()).pow(2).mean()
        lora_params = sum(p.numel() for p in lora.parameters())
        lora_layers = [name for name, _ in lora.layers()]
    return {"parameters": sum(p.numel() for p in model.parameters()), "lora_parameters": lora_params,
            "lora_layers": lora_layers, "saved_bytes": sum(saved.values())}  # fmt: skip


def estimate(name: str) -> tuple[dict, list[dict]]:
    """The model's counts, and the estimate at every weight format, optimizer, checkpointing and batch."""
    size = SIZES[name]
    per_sample = {ckpt: count(size, 1, ckpt) for ckpt in (False, True)}
    params, lora = per_sample[False]["parameters"], per_sample[False]["lora_parameters"]
    block = per_sample[False]["saved_bytes"] / size["depth"]  # one block's activations, one sample
    rows = []
    for weights, weight_bytes in WEIGHT_BYTES.items():
        for optimizer, lora_bytes in LORA_BYTES.items():
            for checkpointing in (False, True):
                for batch in BATCHES:
                    per_pass = batch if not checkpointing else batch // 2
                    parts = {"weights": params * weight_bytes, "lora_state": lora * lora_bytes,
                             "activations": per_sample[checkpointing]["saved_bytes"] * per_pass,
                             "backward_working_set": block * per_pass, "overhead": OVERHEAD_GIB * GIB}  # fmt: skip
                    rows.append({"size": name, "weights": weights, "optimizer": optimizer, "checkpointing": checkpointing,
                                 "batch": batch, "estimate_gib": sum(parts.values()) / GIB,
                                 "parts_gib": {k: v / GIB for k, v in parts.items()}})  # fmt: skip
    peak = {w: {"off": {}, "on": {}} for w in WEIGHT_BYTES}  # AdamW's, per weight format, checkpointing and batch
    for r in rows:
        if r["optimizer"] == "adamw":
            peak[r["weights"]]["on" if r["checkpointing"] else "off"][str(r["batch"])] = r["estimate_gib"]
    layers = per_sample[False]["lora_layers"]
    model = {"label": size["label"], "family": size["family"], "parameters": params, "lora_parameters": lora,
             "lora_layers": len(layers), "lora_layer_names": sorted({re.sub(r"\.\d+\.", ".N.", n) for n in layers}),
             "image_tokens": (size["latent"] // 2) ** 2, "text_tokens": size["tokens"],
             "weights_gib": {w: params * b / GIB for w, b in WEIGHT_BYTES.items()}, "peak_gib": peak}  # fmt: skip
    return model, rows


def best_fit(rows: list[dict], name: str, weights: str, gpu_gb: int) -> dict | None:
    """The cheapest AdamW settings of a size that fit: the largest batch, checkpointing off before on."""
    fitting = [r for r in rows if r["size"] == name and r["weights"] == weights and r["optimizer"] == "adamw"
               and r["estimate_gib"] * GIB <= gpu_gb * 1e9 * 0.95]  # fmt: skip
    return max(fitting, key=lambda r: (r["batch"], not r["checkpointing"])) if fitting else None


def fits(rows: list[dict], gpu_gb: int) -> list[str]:
    """Per size and weight format, the cheapest settings that fit (:func:`best_fit`)."""
    out = []
    for name in dict.fromkeys(r["size"] for r in rows):
        for weights in WEIGHT_BYTES:
            best = best_fit(rows, name, weights, gpu_gb)
            if best is None:
                out.append(f"{name} {weights}: does not fit")
                continue
            out.append(f"{name} {weights}: batch {best['batch']}, checkpointing {'on' if best['checkpointing'] else 'off'} "
                       f"(~{best['estimate_gib']:.1f} GiB)")  # fmt: skip
    return out


def model_fits(rows: list[dict], name: str) -> dict:
    """Per listed GPU and weight format the settings that fit, and the smallest listed GPU that fits any."""
    per_gpu = {}
    for gb in GPUS_GB:
        per_gpu[f"{gb} GB"] = {}
        for weights in WEIGHT_BYTES:
            best = best_fit(rows, name, weights, gb)
            per_gpu[f"{gb} GB"][weights] = best and {k: best[k] for k in ("batch", "checkpointing", "estimate_gib")}
    smallest = {w: next((gb for gb in GPUS_GB if per_gpu[f"{gb} GB"][w]), None) for w in WEIGHT_BYTES}
    return {"fits": per_gpu, "smallest_gpu_gb": smallest}


def family_table(data: dict) -> str:
    """The README's table from the JSON this script writes: per model its parameters and weights, the
    estimated peak at batch 2 (forget 1 + remember 1) with checkpointing on and off, and the smallest
    listed GPU on which some setting fits (AdamW; the model's fits entry says which)."""
    largest = max(data["gpus_gb"])

    def both(per_weights, fmt):
        return f"{fmt(per_weights['fp8'])} / {fmt(per_weights['bf16'])}"

    def gib(value):
        return f"{value:.1f}"

    def gpu(gb):
        return f"{gb} GB" if gb is not None else f"over {largest} GB"

    lines = ["| model | parameters | weights (fp8 / bf16) | peak at batch 2, checkpointing on (fp8 / bf16) | "
             "peak at batch 2, checkpointing off (fp8 / bf16) | smallest listed GPU that fits (fp8 / bf16) |",
             "|---|---|---|---|---|---|"]  # fmt: skip
    for model in data["models"].values():
        peak = {ckpt: {w: model["peak_gib"][w][ckpt]["2"] for w in WEIGHT_BYTES} for ckpt in ("on", "off")}
        lines.append(f"| {model['label']} | {model['parameters'] / 1e9:.1f} B | {both(model['weights_gib'], gib)} GiB | "
                     f"{both(peak['on'], gib)} GiB | {both(peak['off'], gib)} GiB | {both(model['smallest_gpu_gb'], gpu)} |")  # fmt: skip
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["sd3-medium", "sd35-large", "flux1-dev", "qwen-image"],
                        choices=list(SIZES))  # fmt: skip
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "memory_estimate.json")
    parser.add_argument("--table", action="store_true", help="print the README's table from --json and count nothing")
    args = parser.parse_args(argv)
    if args.table:
        print(family_table(json.loads(args.json.read_text())))
        return 0
    estimates = {name: estimate(name) for name in args.sizes}
    rows = [row for _, model_rows in estimates.values() for row in model_rows]
    models = {name: {**model, **model_fits(rows, name)} for name, (model, _) in estimates.items()}
    table = {f"{gb} GB": fits(rows, gb) for gb in GPUS_GB}
    print("| size | weights | checkpointing | batch | estimated peak (GiB) | of which activations |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["optimizer"] == "adamw":
            print(f"| {r['size']} | {r['weights']} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} | "
                  f"{r['estimate_gib']:.1f} | {r['parts_gib']['activations']:.1f} |")  # fmt: skip
    for gpu, settings in table.items():
        print(f"{gpu}: {'; '.join(settings)}")
    data = {"date": time.strftime("%Y-%m-%d"), "kind": "estimate (meta-device count, not measured)", "rank": RANK,
            "latent": {n: SIZES[n]["latent"] for n in args.sizes}, "overhead_gib": OVERHEAD_GIB, "gpus_gb": list(GPUS_GB),
            "models": models, "rows": rows, "fits": table}  # fmt: skip
    print("\n" + family_table(data))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_name(args.json.name + ".partial")
    partial.write_text(json.dumps(data, indent=2))
    partial.replace(args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    torch.set_num_threads(1)  # the count is bound by Python, not arithmetic: more threads only take CPU from other work
    raise SystemExit(main())
