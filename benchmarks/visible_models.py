"""Visible models beyond the embedded two, trained by this script, for choosing defaults on more
kinds of model than the demo ships.

- ``vshapes``: a class-conditional **v-prediction** DDPM UNet (cosine betas) on 16x16 shapes, one
  class per shape kind (circle, square, triangle): a prediction type, a schedule and a
  conditioning (class labels) that neither embedded model has. Its copy detector is the shapes
  model's (mean-centred 8x8 pixels).

Weights go to ``benchmarks/models/`` (float16 safetensors, written atomically) with
``benchmarks/models/visible_models.json`` (settings, seconds, losses). Everything is seeded.

    python benchmarks/visible_models.py --only vshapes --threads 2      # about 20 minutes on 2 cores
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path

import torch

from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
from unlearn_core.demo import models as dm
from unlearn_core.process import DDPMVelocity
from unlearn_core.sampling import sample, seeded_noise

log = logging.getLogger("visible_models")

MODELS = Path(__file__).resolve().parent / "models"
VSHAPES_WEIGHTS = "vshapes_v.safetensors"
RECORD = "visible_models.json"


def build_vshapes_unet() -> torch.nn.Module:
    from diffusers import UNet2DModel

    return UNet2DModel(
        sample_size=dm.SHAPES_SIZE, in_channels=3, out_channels=3, block_out_channels=(32, 64, 64),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D", "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", "UpBlock2D", "UpBlock2D"), norm_num_groups=8, attention_head_dim=32,
        num_class_embeds=len(dm.SHAPE_KINDS),
    )  # fmt: skip


def vshapes_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2", prediction_type="v_prediction")


def vshapes_cond(labels) -> dict[str, torch.Tensor]:
    return {"class_labels": torch.as_tensor(labels, dtype=torch.long).reshape(-1)}


def vshapes_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` shapes with their class (the kind), classes in turn."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(dm.SHAPE_KINDS)
    images = torch.stack([dm.draw_shape(generator, kind=dm.SHAPE_KINDS[int(c)]) for c in labels])
    return images, labels


def load_vshapes_model(folder: Path = MODELS) -> tuple[torch.nn.Module, DDPMVelocity]:
    from safetensors.torch import load_file

    path = folder / VSHAPES_WEIGHTS
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train it with python benchmarks/visible_models.py --only vshapes")
    model = build_vshapes_unet()
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    model.eval().requires_grad_(False)
    return model, DDPMVelocity.from_scheduler(vshapes_scheduler())


def train_vshapes(args) -> dict:
    from train_demo_models import diffusion_train, save_atomic, to_pil_grid

    torch.manual_seed(args.seed)
    images, labels = vshapes_dataset(args.n, seed=args.seed + 30)
    model = build_vshapes_unet()
    process = DDPMVelocity.from_scheduler(vshapes_scheduler())
    state, stats = diffusion_train("vshapes", model, process, images, lambda index: vshapes_cond(labels[index]), args.steps,
                                   args.batch, args.lr, args.ema, args.seed)  # fmt: skip
    settings = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "ema": args.ema, "n_images": args.n, "seed": args.seed,
                "scheduler": "DDPMScheduler(1000, squaredcos_cap_v2, v_prediction)", "threads": torch.get_num_threads()}  # fmt: skip
    size = save_atomic(state, MODELS / VSHAPES_WEIGHTS, torch.float16, {"settings": json.dumps(settings)})
    model, process = load_vshapes_model()
    check_labels = [c for c in range(len(dm.SHAPE_KINDS)) for _ in range(6)]
    samples = sample(DiffusersDenoiser(model, process), process, seeded_noise(list(range(len(check_labels))), (3, 16, 16)),
                     vshapes_cond(check_labels), steps=50, clip=1.0)  # fmt: skip
    to_pil_grid(samples, rows=len(dm.SHAPE_KINDS), scale=6).save(MODELS / "vshapes_samples.png")
    return {"file": VSHAPES_WEIGHTS, "bytes": size, "parameters": sum(p.numel() for p in model.parameters()),
            "settings": settings, **stats, "samples_png": "vshapes_samples.png"}  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["vshapes"], action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--n", type=int, default=20000)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    MODELS.mkdir(parents=True, exist_ok=True)
    record_path = MODELS / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for name in args.only or ["vshapes"]:
        record[name] = {"vshapes": train_vshapes}[name](args)
        partial = record_path.with_name(RECORD + ".partial")
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(record_path)
        log.info("%s: %s", name, {k: v for k, v in record[name].items() if k != "loss_history"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
