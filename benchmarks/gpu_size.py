"""Seconds per step and peak GPU memory at SD3 sizes: our training vs a plain peft LoRA step.

Random-weight SD3 MMDiTs at SD3-Medium size (depth 24) and SD3.5-Large size (depth 38), 1024x1024
images (128x128 latents), batch 8 (forget 4 + remember 4 for ours) or the largest that fits,
bf16 weights, gradient checkpointing off and on. Per configuration: the marginal seconds per step
((time for 1 + S steps - time for 1 step) / S, so set-up and the first step's compilation do
not count) and the peak memory the step allocates (torch.cuda.max_memory_allocated). With
COMFYUI_PATH set, the same sizes run in ComfyUI too: the Instance Unlearn LoRA node vs the stock
TrainLoraNode (benchmarks/comfy_train_speed.py, one subprocess each). Writes JSON and prints a table.

    python benchmarks/gpu_size.py                                   # on a GPU: both sizes, under 8 minutes on an H200
    python benchmarks/gpu_size.py --sizes tiny --device cpu         # the smoke run the test suite makes
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from speed import plain_lora_step

from unlearn_core import ForgetTargets, RememberSet, UnlearnConfig, UnlearnData
from unlearn_core.backends.diffusers_backend import (
    gradient_checkpointing,
    lora_attached,
    unlearn_diffusers,
)
from unlearn_core.diffusion.process import RectifiedFlow

ROOT = Path(__file__).resolve().parents[1]
# family, depth (transformer blocks; Flux: double + single), latent side, text tokens and widths.
# SD3: 77 CLIP + 256 T5 tokens of 4096, pooled 2048. Flux.1 dev: its published config (19 double
# and 38 single blocks, 24 heads of 128, guidance input), T5 at its 512 tokens (diffusers pads to
# them; ComfyUI to 256 or the prompt's length), pooled CLIP 768. Qwen-Image: its published config
# (60 blocks, 24 heads of 128), 256 tokens of Qwen2.5-VL's 3584 (a long prompt: neither diffusers
# nor ComfyUI pads its prompts to a fixed length). The tiny sizes are for the tests.
SIZES = {
    "sd3-medium": {"family": "sd3", "label": "SD3-Medium size", "depth": 24, "latent": 128, "tokens": 333,
                   "text": 4096, "pooled": 2048, "pos_embed": 192},
    "sd35-large": {"family": "sd3", "label": "SD3.5-Large size", "depth": 38, "latent": 128, "tokens": 333,
                   "text": 4096, "pooled": 2048, "pos_embed": 192},
    "flux1-dev": {"family": "flux", "label": "Flux.1 dev", "depth": 57, "double": 19, "single": 38, "heads": 24,
                  "head_dim": 128, "rope": (16, 56, 56), "latent": 128, "tokens": 512, "text": 4096, "pooled": 768},
    "qwen-image": {"family": "qwen-image", "label": "Qwen-Image", "depth": 60, "heads": 24, "head_dim": 128,
                   "rope": (16, 56, 56), "latent": 128, "tokens": 256, "text": 3584},
    "tiny": {"family": "sd3", "label": "tiny SD3", "depth": 2, "latent": 8, "tokens": 8, "text": 64, "pooled": 32,
             "pos_embed": 8},
    "tiny-flux": {"family": "flux", "label": "tiny Flux", "depth": 3, "double": 1, "single": 2, "heads": 2,
                  "head_dim": 16, "rope": (4, 6, 6), "latent": 8, "tokens": 8, "text": 64, "pooled": 32},
    "tiny-qwen-image": {"family": "qwen-image", "label": "tiny Qwen-Image", "depth": 2, "heads": 2, "head_dim": 16,
                        "rope": (4, 6, 6), "latent": 8, "tokens": 8, "text": 64},
}  # fmt: skip
#: the sizes this script trains: unlearn_diffusers takes SD3 transformers (the others are counted by memory_estimate.py)
TRAINED_SIZES = [name for name, size in SIZES.items() if size["family"] == "sd3"]


def build_model(size: dict, device: str, dtype: torch.dtype):
    from diffusers import FluxTransformer2DModel, QwenImageTransformer2DModel, SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):  # built where it runs: an 8 B-parameter model never passes through the CPU
        if size["family"] == "flux":  # packed 2x2 latents: 64 channels in and out, patch 1
            model = FluxTransformer2DModel(
                patch_size=1, in_channels=64, num_layers=size["double"], num_single_layers=size["single"],
                attention_head_dim=size["head_dim"], num_attention_heads=size["heads"],
                joint_attention_dim=size["text"], pooled_projection_dim=size["pooled"], guidance_embeds=True,
                axes_dims_rope=size["rope"],
            )  # fmt: skip
        elif size["family"] == "qwen-image":  # packed 2x2 latents in, 16 channels per 2x2 patch out
            model = QwenImageTransformer2DModel(
                patch_size=2, in_channels=64, out_channels=16, num_layers=size["depth"],
                attention_head_dim=size["head_dim"], num_attention_heads=size["heads"],
                joint_attention_dim=size["text"], axes_dims_rope=size["rope"],
            )  # fmt: skip
        else:
            model = SD3Transformer2DModel(
                sample_size=size["latent"], patch_size=2, in_channels=16, out_channels=16, num_layers=size["depth"],
                attention_head_dim=64, num_attention_heads=size["depth"], joint_attention_dim=size["text"],
                caption_projection_dim=64 * size["depth"], pooled_projection_dim=size["pooled"],
                pos_embed_max_size=size["pos_embed"],
            )  # fmt: skip
    return model.to(dtype).requires_grad_(False)


def make_data(size: dict, batch: int, device: str, dtype: torch.dtype) -> UnlearnData:
    g = torch.Generator(device="cpu").manual_seed(1)
    shape = (16, size["latent"], size["latent"])

    def tensor(*dims):
        return torch.randn(*dims, generator=g).to(device, dtype)

    def cond(n):
        return {"encoder_hidden_states": tensor(n, size["tokens"], size["text"]), "pooled_projections": tensor(n, size["pooled"])}

    half = batch // 2
    targets = tensor(half, *shape)
    return UnlearnData(ForgetTargets(targets, targets + 0.3 * tensor(half, *shape), cond(half)),
                       RememberSet(tensor(batch - half, *shape), cond(batch - half)))  # fmt: skip


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _peak_reset(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()


def _peak_mb(device: str) -> float | None:
    return torch.cuda.max_memory_allocated() / 2**20 if device.startswith("cuda") else None


def time_ours(model, data, batch: int, steps: int, checkpointing: bool, device: str) -> dict:
    """Our training (unlearn_diffusers: LoRA attached, both gradients, surgery) for 1 and 1 + steps steps."""
    config = dict(lora_rank=16, forget_batch_size=batch // 2, remember_batch_size=batch - batch // 2,
                  learning_rate=1e-4, dtype="bfloat16", gradient_checkpointing=checkpointing)  # fmt: skip
    times = {}
    _peak_reset(device)
    for count in (1, 1 + steps):
        _sync(device)
        started = time.perf_counter()
        unlearn_diffusers(model, RectifiedFlow(), data, UnlearnConfig(steps=count, **config))
        _sync(device)
        times[count] = time.perf_counter() - started
    return {"seconds_per_step": (times[1 + steps] - times[1]) / steps, "peak_mb": _peak_mb(device)}


def time_plain(model, data, batch: int, steps: int, checkpointing: bool, device: str) -> dict:
    """A plain peft LoRA step (one loss on the whole batch) with the same rank and batch."""
    process = RectifiedFlow()
    _peak_reset(device)
    with lora_attached(model, rank=16, seed=0) as lora, gradient_checkpointing(model, checkpointing):
        params = lora.parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        denoiser = lora.denoiser(process, split=False)
        with torch.autocast(device_type=device.split(":")[0], dtype=torch.bfloat16):
            plain_lora_step(denoiser, process, data, optimizer, params, batch, generator)  # warm-up
            _sync(device)
            started = time.perf_counter()
            for _ in range(steps):
                plain_lora_step(denoiser, process, data, optimizer, params, batch, generator)
            _sync(device)
    return {"seconds_per_step": (time.perf_counter() - started) / steps, "peak_mb": _peak_mb(device)}


def timed(timer, model, size: dict, steps: int, checkpointing: bool, device: str, dtype, batch: int) -> dict:
    return timer(model, make_data(size, batch, device, dtype), batch, steps, checkpointing, device)


def largest_batch(run, batch: int) -> tuple[int, dict]:
    """``run(batch)`` at ``batch``, halving it while the GPU runs out of memory."""
    while True:
        try:
            return batch, run(batch)
        except torch.OutOfMemoryError:
            if batch <= 2:
                return batch, {"seconds_per_step": None, "peak_mb": None, "error": "out of memory at batch 2"}
            torch.cuda.empty_cache()
            batch //= 2


def comfy_rows(name: str, size: dict, batch: int, steps: int, checkpointing: bool, device: str) -> list[dict]:
    """Ours and the stock TrainLoraNode inside ComfyUI at this size (COMFYUI_PATH set)."""
    command = [sys.executable, str(ROOT / "benchmarks" / "comfy_train_speed.py"), "--depth", str(size["depth"]),
               "--latent", str(size["latent"]), "--batch", str(batch), "--steps", str(1 + steps), "--rank", "16",
               "--device", device, "--tokens", str(size["tokens"]), "--text-dim", str(size["text"]),
               "--pooled-dim", str(size["pooled"]), "--json-rows"] + (["--checkpointing"] if checkpointing else [])  # fmt: skip
    done = subprocess.run(command, capture_output=True, text=True, timeout=1200)
    if done.returncode != 0:
        return [{"trainer": "ComfyUI", "size": name, "error": done.stderr[-600:]}]
    return [{**row, "size": name, "checkpointing": checkpointing} for row in json.loads(done.stdout.strip().splitlines()[-1])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", nargs="+", default=["sd3-medium", "sd35-large"], choices=TRAINED_SIZES)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--steps", type=int, default=3, help="timed steps after the first")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--json", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_size.json")
    args = parser.parse_args(argv)
    dtype = torch.bfloat16
    rows = []
    for name in args.sizes:
        size = SIZES[name]
        model = build_model(size, args.device, dtype)
        params = sum(p.numel() for p in model.parameters())
        for checkpointing in (False, True):
            for trainer, timer in (("ours (diffusers)", time_ours), ("plain peft LoRA", time_plain)):
                run = functools.partial(timed, timer, model, size, args.steps, checkpointing, args.device, dtype)
                batch, result = largest_batch(run, args.batch)
                rows.append({"size": name, "parameters": params, "trainer": trainer, "checkpointing": checkpointing,
                             "batch": batch, **result})  # fmt: skip
                print(json.dumps(rows[-1]), flush=True)
        del model
        if os.environ.get("COMFYUI_PATH"):
            for checkpointing in (False, True):
                rows += comfy_rows(name, size, args.batch, args.steps, checkpointing, args.device)
    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    latents = ", ".join(f"{n} {SIZES[n]['latent']}x{SIZES[n]['latent']}" for n in args.sizes)
    print(f"\n{device_name}, bf16, latents {latents}\n")
    print("| size | trainer | checkpointing | batch | s / step | peak memory (GB) |")
    print("|---|---|---|---|---|---|")
    for row in rows:
        seconds = "n/a" if row.get("seconds_per_step") is None else f"{row['seconds_per_step']:.3f}"
        peak = "n/a" if row.get("peak_mb") is None else f"{row['peak_mb'] / 1024:.1f}"
        print(f"| {row['size']} | {row['trainer']} | {'on' if row.get('checkpointing') else 'off'} | {row.get('batch', '')} "
              f"| {seconds} | {peak} |")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"date": time.strftime("%Y-%m-%d"), "device": device_name, "torch": torch.__version__,
                                     "rows": rows}, indent=2))  # fmt: skip
    print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
