"""Estimated GPU memory of training at SD3-Medium and SD3.5-Large size, counted without a GPU.

The models of benchmarks/gpu_size.py are built on PyTorch's meta device (shapes, no storage), a
rank-16 LoRA attached as training attaches it, and one training forward pass (1024x1024 images:
128x128 latents) is traced under ``saved_tensors_hooks``: the bytes of every distinct storage
autograd keeps for the backward pass, less the weights themselves, are the activation memory of
that graph.
Attention is counted as flash attention keeps it on a GPU (q, k, v, the output and the
log-sum-exp), not as the CPU's math kernel would (the whole attention matrix). The estimate of a
training step's peak is then

    weights (params x 2 bytes in bf16, x 1 in fp8)
  + LoRA state (weights, gradient, AdamW's two moments or 8-bit ones, the forget, remember and
    combined gradient vectors the surgery works on)
  + saved activations of one pass (checkpointing off: the whole batch in one pass, as the
    trainer's gradient split runs it; on: half the batch per pass, block inputs only)
  + the backward's working set (one block's activations for the pass)
  + OVERHEAD_GIB for the CUDA context and the allocator's slack.

These are estimates until benchmarks/gpu_size.py measures the peak on a GPU; the test suite checks
that the meta-device count equals the count of a real forward pass on the CPU.

    python benchmarks/memory_estimate.py          # seconds on a CPU; writes benchmarks/results/memory_estimate.json
"""

from __future__ import annotations

import argparse
import contextlib
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from gpu_size import SIZES, build_model

from unlearn_core.backends.diffusers_backend import gradient_checkpointing, lora_attached

ROOT = Path(__file__).resolve().parents[1]
GIB = 2**30
RANK = 16
OVERHEAD_GIB = 1.5
BATCHES = (8, 4, 2)  # forget + remember samples per step: at least one of each
GPUS_GB = (12, 16, 24, 80)
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


@contextlib.contextmanager
def _flash_attention():
    def attention(q, k, v, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, **_):
        if attn_mask is not None or dropout_p or is_causal or scale is not None:
            raise ValueError("the count models plain attention only")
        return _FlashAttention.apply(q, k, v)

    F.scaled_dot_product_attention = attention
    try:
        yield
    finally:
        F.scaled_dot_product_attention = _sdpa


def count(size: dict, batch: int, checkpointing: bool, device: str = "meta") -> dict:
    """Parameters, LoRA parameters and bytes autograd saves in one training forward pass."""
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

    with lora_attached(model, rank=RANK) as lora, gradient_checkpointing(model, checkpointing), _flash_attention():
        weights.update(t.untyped_storage()._cdata for t in (*model.parameters(), *model.buffers()))
        x = tensor(batch, 16, size["latent"], size["latent"])
        inputs = {"hidden_states": x, "encoder_hidden_states": tensor(batch, size["tokens"], size["text"]),
                  "pooled_projections": tensor(batch, size["pooled"]), "timestep": torch.rand(batch).to(device)}  # fmt: skip
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda t: t):
            out = model(**inputs).sample
            (out.float() - x.float()).pow(2).mean()
        lora_params = sum(p.numel() for p in lora.parameters())
    return {"parameters": sum(p.numel() for p in model.parameters()), "lora_parameters": lora_params,
            "saved_bytes": sum(saved.values())}  # fmt: skip


def estimate(name: str) -> list[dict]:
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
    return rows


def fits(rows: list[dict], gpu_gb: int) -> list[str]:
    """Per size, the cheapest settings that fit: the largest batch, checkpointing off before on."""
    out = []
    for name in dict.fromkeys(r["size"] for r in rows):
        for weights in WEIGHT_BYTES:
            fitting = [r for r in rows if r["size"] == name and r["weights"] == weights and r["optimizer"] == "adamw"
                       and r["estimate_gib"] * GIB <= gpu_gb * 1e9 * 0.95]  # fmt: skip
            if not fitting:
                out.append(f"{name} {weights}: does not fit")
                continue
            best = max(fitting, key=lambda r: (r["batch"], not r["checkpointing"]))
            out.append(f"{name} {weights}: batch {best['batch']}, checkpointing {'on' if best['checkpointing'] else 'off'} "
                       f"(~{best['estimate_gib']:.1f} GiB)")  # fmt: skip
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["sd3-medium", "sd35-large"], choices=list(SIZES))
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "memory_estimate.json")
    args = parser.parse_args(argv)
    rows = [row for name in args.sizes for row in estimate(name)]
    table = {f"{gb} GB": fits(rows, gb) for gb in GPUS_GB}
    print("| size | weights | checkpointing | batch | estimated peak (GiB) | of which activations |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        if r["optimizer"] == "adamw":
            print(f"| {r['size']} | {r['weights']} | {'on' if r['checkpointing'] else 'off'} | {r['batch']} | "
                  f"{r['estimate_gib']:.1f} | {r['parts_gib']['activations']:.1f} |")  # fmt: skip
    for gpu, settings in table.items():
        print(f"{gpu}: {'; '.join(settings)}")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    partial = args.json.with_name(args.json.name + ".partial")
    partial.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "kind": "estimate (meta-device count, not measured)",
                                   "rank": RANK, "latent": {n: SIZES[n]["latent"] for n in args.sizes},
                                   "overhead_gib": OVERHEAD_GIB, "rows": rows, "fits": table}, indent=2))  # fmt: skip
    partial.replace(args.json)
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
