"""Per-step time and peak memory: Instance Unlearn LoRA vs ComfyUI's stock TrainLoraNode.

Runs inside a real ComfyUI (set COMFYUI_PATH), on a random SD3 MMDiT loaded through the stock
UNETLoader, with the same batch (ours: forget + remember halves) and rank: on the CPU in float32
by default, or with ``--device cuda`` in bfloat16 (what benchmarks/gpu_size.py runs). Each
trainer runs in its own subprocess so its peak memory (RSS; on a GPU, allocated GPU memory) is
its own; the per-step time is the marginal cost ((time for S steps - time for 1 step) / (S - 1)),
which removes set-up costs.

    COMFYUI_PATH=/path/to/ComfyUI python benchmarks/comfy_train_speed.py --depth 4 --steps 6
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def worker(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    sys.path.insert(0, os.environ["COMFYUI_PATH"])
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = args.device == "cpu"
    gpu = args.device != "cpu"
    import folder_paths
    from diffusers import SD3Transformer2DModel
    from safetensors.torch import save_file

    import nodes as comfy_nodes

    work = Path(args.work)
    folder_paths.add_model_folder_path("diffusion_models", str(work), is_default=True)
    folder_paths.add_model_folder_path("loras", str(work / "loras"), is_default=True)
    path = work / f"sd3_depth{args.depth}.safetensors"
    if not path.exists():
        torch.manual_seed(0)
        model = SD3Transformer2DModel(
            sample_size=args.latent, patch_size=2, in_channels=16, out_channels=16, num_layers=args.depth,
            attention_head_dim=64, num_attention_heads=args.depth, joint_attention_dim=args.text_dim,
            caption_projection_dim=64 * args.depth, pooled_projection_dim=args.pooled_dim,
            pos_embed_max_size=max(args.latent, 192 if gpu else args.latent),
        )  # fmt: skip
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    g = torch.Generator().manual_seed(0)
    conditioning = [[torch.randn(1, args.tokens, args.text_dim, generator=g),
                     {"pooled_output": torch.randn(1, args.pooled_dim, generator=g)}]]  # fmt: skip
    latents = torch.randn(args.batch, 16, args.latent, args.latent, generator=g)
    with torch.inference_mode():
        model = comfy_nodes.UNETLoader().load_unet(path.name, "default")[0]
    dtype = "bf16" if gpu else "fp32"
    if gpu:
        torch.cuda.reset_peak_memory_stats()
    baseline = rss_mb()
    times = {}
    for steps in (1, args.steps):
        started = time.perf_counter()
        with torch.inference_mode():
            if args.which == "stock":
                from comfy_extras.nodes_train import TrainLoraNode

                node = TrainLoraNode.PREPARE_CLASS_CLONE({"hidden_inputs": {}})
                node.execute(
                    model=[model], latents=[{"samples": latents}], positive=[conditioning], batch_size=[args.batch],
                    grad_accumulation_steps=[1], steps=[steps], learning_rate=[1e-4], rank=[args.rank],
                    optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=[dtype],
                    lora_dtype=["fp32"], quantized_backward=[False], algorithm=["LoRA"],
                    gradient_checkpointing=[args.checkpointing], checkpoint_depth=[1], offloading=[False],
                    existing_lora=["[None]"], bucket_mode=[False], bypass_mode=[False],
                )  # fmt: skip
            else:
                spec = importlib.util.spec_from_file_location("instance_unlearn", ROOT / "__init__.py",
                                                              submodule_search_locations=[str(ROOT)])  # fmt: skip
                pack = importlib.util.module_from_spec(spec)
                sys.modules["instance_unlearn"] = pack
                spec.loader.exec_module(pack)
                from instance_unlearn.nodes.targets import Target, UnlearnTargets
                from instance_unlearn.nodes.unlearn_lora import InstanceUnlearnLoRA

                half = args.batch // 2
                targets = UnlearnTargets("bench", [Target(id="t", image=torch.zeros(8, 8, 3), latent=latents[0],
                                                          conditioning=conditioning,
                                                          surrogate_latent=latents[0] + 0.1)])  # fmt: skip
                node = InstanceUnlearnLoRA.PREPARE_CLASS_CLONE({"hidden_inputs": {}})
                node.execute(
                    model=model, targets=targets, steps=steps, learning_rate=1e-4, rank=args.rank,
                    forget_batch_size=half, remember_batch_size=args.batch - half, remember_count=1,
                    remember_steps=1, weighting="power", gamma=1.0, surgery="project_forget", method="surrogate",
                    seed=0, dtype="bfloat16" if gpu else "float32", gradient_checkpointing=args.checkpointing, lora_name="",
                    remember_latents={"samples": latents[1:]}, remember_conditioning=conditioning,
                )  # fmt: skip
        times[steps] = time.perf_counter() - started
    per_step = (times[args.steps] - times[1]) / (args.steps - 1)
    print(json.dumps({"which": args.which, "per_step_s": per_step, "first_run_s": times[1],
                      "peak_rss_mb": rss_mb(), "rss_after_load_mb": baseline, "extra_peak_mb": rss_mb() - baseline,
                      "peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20 if gpu else None}))  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--latent", type=int, default=32, help="latent side (pixels / 8)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu (float32) or cuda (bfloat16)")
    parser.add_argument("--tokens", type=int, default=16, help="text tokens of the conditioning")
    parser.add_argument("--text-dim", type=int, default=256)
    parser.add_argument("--pooled-dim", type=int, default=64)
    parser.add_argument("--checkpointing", action="store_true", help="gradient checkpointing in both trainers")
    parser.add_argument("--json-rows", action="store_true", help="print the rows as one JSON line at the end")
    parser.add_argument("--which", choices=["stock", "ours"])
    parser.add_argument("--work")
    args = parser.parse_args(argv)
    if "COMFYUI_PATH" not in os.environ:
        parser.error("set COMFYUI_PATH to a ComfyUI checkout")
    if args.which:
        worker(args)
        return 0
    work = tempfile.mkdtemp()
    rows = []
    for which in ("ours", "stock", "ours", "stock"):  # interleaved, twice
        command = [sys.executable, __file__, "--which", which, "--work", work] + [
            f"--{k.replace('_', '-')}={getattr(args, k)}"
            for k in ("depth", "latent", "batch", "rank", "steps", "threads", "device", "tokens", "text_dim", "pooled_dim")
        ] + (["--checkpointing"] if args.checkpointing else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
    print(f"SD3 MMDiT depth {args.depth}, latent {args.latent}x{args.latent}, batch {args.batch}, rank {args.rank}, "
          f"{args.threads} threads, CPU")  # fmt: skip
    print("| trainer | per step (s) | peak RSS (MB) | peak above loaded model (MB) |")
    print("|---|---|---|---|")
    for row in rows:
        name = "Instance Unlearn LoRA" if row["which"] == "ours" else "TrainLoraNode (stock)"
        print(f"| {name} | {row['per_step_s']:.3f} | {row['peak_rss_mb']:.0f} | {row['extra_peak_mb']:.0f} |")
    if args.json_rows:
        print(json.dumps([{"trainer": f"ComfyUI: {'Instance Unlearn LoRA' if r['which'] == 'ours' else 'TrainLoraNode'}",
                           "batch": args.batch, "seconds_per_step": r["per_step_s"], "peak_mb": r["peak_gpu_mb"]}
                          for r in rows]))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
