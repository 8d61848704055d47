"""Visible models beyond the embedded two, trained by this script, for choosing defaults on more
kinds of model than the demo ships.

- ``vshapes``: a class-conditional **v-prediction** DDPM UNet (cosine betas) on 16x16 shapes, one
  class per shape kind (circle, square, triangle): a prediction type, a schedule and a
  conditioning (class labels) that neither embedded model has. Its copy detector is the shapes
  model's (mean-centred 8x8 pixels).
- ``lshapes``: a **latent** class-conditional rectified-flow ``SD3Transformer2DModel`` over the
  8x8x4 latents of a small ``AutoencoderKL`` trained here on 32x32 shapes (one class per shape
  kind, the classes a frozen seeded "prompt" each, as the flags model's are): the only visible
  model whose outputs are latents, so the benchmarks judge it on VAE-decoded images while it
  trains and samples in latent space, as a Stable Diffusion checkpoint does. Latents are
  multiplied by a scaling factor, recorded in the transformer's file, that maps three of their
  standard deviations on the training set to 1 (Stable Diffusion's factor maps one): the
  benchmarks clamp every sample to [-1, 1], the pixel models' range, and at unit variance that
  clamp cuts off 29% of the latent values (decoded PSNR 20 dB against the unclamped, copy
  similarity down to 0.58), at a third of it 0.9% (63 dB, copy similarity at least 0.96). The
  VAE reconstructs held-out shapes at 32 dB PSNR. A transformer as small as the flags model's
  drew several blobs per image; this one (3.4 M parameters) draws one shape, most of them
  recognisably of their class, some rounded (``benchmarks/models/lshapes_samples.png``).

Weights go to ``benchmarks/models/`` (float16 safetensors, written atomically) with
``benchmarks/models/visible_models.json`` (settings, seconds, losses). Everything is seeded.

    python benchmarks/visible_models.py --only vshapes --threads 2      # about 20 minutes on 2 cores
    python benchmarks/visible_models.py --only lshapes --threads 1      # 44 minutes on 1 core: VAE 12, flow 33
    python benchmarks/visible_models.py --only lshapes --reuse-vae      # the flow alone
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
from unlearn_core.demo import models as dm
from unlearn_core.diffusion.noise import seeded_noise
from unlearn_core.diffusion.process import DDPMVelocity, RectifiedFlow
from unlearn_core.diffusion.sampling import sample
from unlearn_core.verify.metrics import psnr, to_unit

log = logging.getLogger("visible_models")

MODELS = Path(__file__).resolve().parent / "models"
VSHAPES_WEIGHTS = "vshapes_v.safetensors"
LSHAPES_VAE_WEIGHTS = "lshapes_vae.safetensors"
LSHAPES_WEIGHTS = "lshapes_sd3.safetensors"
LSHAPES_SIZE = 32  # pixels; the VAE's two downsamplings make 8x8 latents
LSHAPES_LATENT_CHANNELS = 4
#: standard deviations of the latents that the scaling maps to 1 (see the module docstring)
LSHAPES_LATENT_SPREAD = 3.0
#: Seed of the frozen per-class "prompts". Changing it invalidates the trained lshapes transformer.
LSHAPES_CONDITIONING_SEED = 20260102
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


# --------------------------------------------------------------------------- lshapes (latent)


def build_lshapes_vae() -> torch.nn.Module:
    """32x32 RGB <-> 8x8x4 latents (two downsamplings). No attention in the middle block: at 8x8
    the convolutions already see the whole shape, and it would only slow the CPU down."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 3,
        up_block_types=("UpDecoderBlock2D",) * 3, block_out_channels=(16, 32, 64), layers_per_block=1,
        latent_channels=LSHAPES_LATENT_CHANNELS, norm_num_groups=8, sample_size=LSHAPES_SIZE,
        mid_block_add_attention=False,
    )  # fmt: skip


def build_lshapes_transformer() -> torch.nn.Module:
    """The flags model's SD3 architecture over the latents: 8x8x4 in 2x2 patches (16 tokens), 6
    joint blocks of width 128 (4 heads x 32), about 3.4 M parameters. The flags model's width (64)
    and depth (4) drew several blobs per image after 6,000 steps; this one draws one shape."""
    from diffusers import SD3Transformer2DModel

    return SD3Transformer2DModel(
        sample_size=LSHAPES_SIZE // 4, patch_size=2, in_channels=LSHAPES_LATENT_CHANNELS,
        out_channels=LSHAPES_LATENT_CHANNELS, num_layers=6, attention_head_dim=32, num_attention_heads=4,
        joint_attention_dim=dm.TEXT_DIM, caption_projection_dim=128, pooled_projection_dim=dm.POOLED_DIM,
        pos_embed_max_size=LSHAPES_SIZE // 4,
    )  # fmt: skip


def lshapes_process() -> RectifiedFlow:
    """The flags model's process (SD3's rectified flow, shift 3), here in latent space."""
    return dm.flags_process()


def lshapes_conditioning(labels) -> dict[str, torch.Tensor]:
    """Each shape kind's frozen "prompt", built as :func:`~unlearn_core.demo.models.flags_conditioning`
    builds the flags': seeded tokens (N, 4, 32) and a pooled vector (N, 32) per class."""
    labels = torch.as_tensor(labels, dtype=torch.long).reshape(-1)
    generator = torch.Generator().manual_seed(LSHAPES_CONDITIONING_SEED)
    tokens = torch.randn(len(dm.SHAPE_KINDS), dm.TEXT_TOKENS, dm.TEXT_DIM, generator=generator)
    pooled = torch.randn(len(dm.SHAPE_KINDS), dm.POOLED_DIM, generator=generator)
    return {"encoder_hidden_states": tokens[labels].clone(), "pooled_projections": pooled[labels].clone()}  # fmt: skip


@dataclass
class LatentModel:
    """A latent flow model: the transformer and its process work on ``scaling``-times VAE latents;
    :meth:`decode` turns them into images in [-1, 1]."""

    transformer: torch.nn.Module
    process: RectifiedFlow
    vae: torch.nn.Module
    scaling: float

    @torch.no_grad()
    def encode(self, images: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Scaled latents (the posterior means) of images in [-1, 1]."""
        chunks = [self.vae.encode(images[i : i + batch]).latent_dist.mode() for i in range(0, len(images), batch)]  # fmt: skip
        return torch.cat(chunks) * self.scaling

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, batch: int = 256) -> torch.Tensor:
        """Images in [-1, 1] of scaled latents."""
        chunks = [self.vae.decode(latents[i : i + batch] / self.scaling).sample for i in range(0, len(latents), batch)]  # fmt: skip
        return torch.cat(chunks).clamp(-1, 1)


def _load_frozen(model: torch.nn.Module, path: Path) -> torch.nn.Module:
    from safetensors.torch import load_file

    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: train it with python benchmarks/visible_models.py --only lshapes")  # fmt: skip
    model.load_state_dict({k: v.float() for k, v in load_file(str(path)).items()})
    return model.eval().requires_grad_(False)


def load_lshapes_model(folder: Path = MODELS) -> LatentModel:
    """The trained lshapes transformer and VAE (fp32, eval, frozen) with the latents' scaling."""
    from safetensors import safe_open

    transformer = _load_frozen(build_lshapes_transformer(), folder / LSHAPES_WEIGHTS)
    vae = _load_frozen(build_lshapes_vae(), folder / LSHAPES_VAE_WEIGHTS)
    with safe_open(str(folder / LSHAPES_WEIGHTS), "pt") as handle:
        scaling = float(handle.metadata()["scaling"])
    return LatentModel(transformer, lshapes_process(), vae, scaling)


def lshapes_dataset(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` 32x32 shapes with their class (the kind), classes in turn."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % len(dm.SHAPE_KINDS)
    images = torch.stack([dm.draw_shape(generator, LSHAPES_SIZE, dm.SHAPE_KINDS[int(c)]) for c in labels])  # fmt: skip
    return images, labels


def reconstruction_psnr(vae: torch.nn.Module, images: torch.Tensor) -> float:
    """Mean PSNR (dB, images in [0, 1]) of the VAE's reconstructions from the posterior means."""
    autoencoder = LatentModel(None, None, vae, 1.0)
    decoded = autoencoder.decode(autoencoder.encode(images))
    return round(float(psnr(to_unit(decoded), to_unit(images)).mean()), 2)


def vae_train(vae, images, heldout, steps: int, batch: int, lr: float, kl_weight: float, seed: int) -> tuple[dict, dict]:  # fmt: skip
    """Reconstruction MSE plus ``kl_weight`` times the KL per latent element (keeps the latents
    near a unit Gaussian without blurring); returns the final state and stats."""
    from train_demo_models import lr_at

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    vae.train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    started, running, history = time.perf_counter(), None, []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        x = images[torch.randint(len(images), (batch,), generator=generator)]
        posterior = vae.encode(x).latent_dist
        z = posterior.sample(generator)
        reconstruction = torch.nn.functional.mse_loss(vae.decode(z).sample, x)
        kl = posterior.kl().mean() / z[0].numel()
        loss = reconstruction + kl_weight * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        value = reconstruction.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 100 == 0 or step == steps - 1:
            vae.eval()
            held = reconstruction_psnr(vae, heldout)
            vae.train()
            log.info("lshapes vae step %d/%d mse %.4f kl %.3f held-out PSNR %.2f dB %.0fs", step + 1, steps, running,
                     kl.item(), held, time.perf_counter() - started)  # fmt: skip
            history.append([step + 1, round(running, 5), held])
    vae.eval()
    stats = {"seconds": round(time.perf_counter() - started, 1), "final_mse_avg": round(running, 5),
             "final_kl": round(kl.item(), 4), "history": history}  # fmt: skip
    return vae.state_dict(), stats


def train_lshapes_vae(args, images: torch.Tensor, heldout: torch.Tensor, previous: dict | None) -> dict:  # fmt: skip
    """The VAE's record: trained and saved, or with ``--reuse-vae`` the saved one's (training
    the flow alone then gives the same transformer as a full run)."""
    from train_demo_models import save_atomic

    if args.reuse_vae:
        if not (MODELS / LSHAPES_VAE_WEIGHTS).is_file() or not previous or "vae" not in previous:
            raise FileNotFoundError(f"--reuse-vae needs {MODELS / LSHAPES_VAE_WEIGHTS} and its record in {RECORD}")  # fmt: skip
        return {key: previous[key] for key in ("vae", "vae_settings", "vae_bytes")}
    vae_state, stats = vae_train(build_lshapes_vae(), images, heldout, args.vae_steps, args.vae_batch, args.vae_lr, args.vae_kl,
                                 args.seed)  # fmt: skip
    settings = {"steps": args.vae_steps, "batch": args.vae_batch, "lr": args.vae_lr, "kl_weight": args.vae_kl,
                "n_images": args.n, "seed": args.seed, "threads": torch.get_num_threads()}  # fmt: skip
    size = save_atomic(vae_state, MODELS / LSHAPES_VAE_WEIGHTS, torch.float16, {"settings": json.dumps(settings)})  # fmt: skip
    # measured as the benchmarks load it: fp16-stored
    vae = _load_frozen(build_lshapes_vae(), MODELS / LSHAPES_VAE_WEIGHTS)
    return {"vae": {**stats, "heldout_psnr_db": reconstruction_psnr(vae, heldout)}, "vae_settings": settings, "vae_bytes": size}  # fmt: skip


def scaled_latents(images: torch.Tensor) -> tuple[torch.Tensor, dict]:
    """The saved VAE's latents of ``images`` times the scaling (LSHAPES_LATENT_SPREAD of their
    standard deviations to 1), with their statistics."""
    # the flow learns the latents of what the benchmarks decode with: the fp16-stored VAE
    vae = _load_frozen(build_lshapes_vae(), MODELS / LSHAPES_VAE_WEIGHTS)
    latents = LatentModel(None, None, vae, 1.0).encode(images)
    raw_mean, raw_std = float(latents.mean()), float(latents.std())
    scaling = 1.0 / (LSHAPES_LATENT_SPREAD * raw_std)
    latents = latents * scaling
    clipped = float((latents.abs() > 1).float().mean())
    log.info("lshapes latents: mean %.3f std %.3f -> scaling %.4f (%.2f%% outside [-1, 1])", raw_mean, raw_std, scaling, 100 * clipped)  # fmt: skip
    return latents, {"latent_mean": round(raw_mean, 4), "latent_std": round(raw_std, 4), "scaling": scaling,
                     "scaled_outside_unit_range": round(clipped, 5)}  # fmt: skip


def train_lshapes(args) -> dict:
    """The VAE, then the latents' scaling, then the flow on the scaled latents, then a samples grid."""
    from train_demo_models import diffusion_train, save_atomic, to_pil_grid

    images, labels = lshapes_dataset(args.n, seed=args.seed + 40)
    heldout, _ = lshapes_dataset(512, seed=args.seed + 41)
    record_path = MODELS / RECORD
    previous = json.loads(record_path.read_text()).get("lshapes") if record_path.is_file() else None
    torch.manual_seed(args.seed)
    vae_record = train_lshapes_vae(args, images, heldout, previous)
    latents, latent_stats = scaled_latents(images)
    scaling = latent_stats["scaling"]
    tokens, pooled = lshapes_conditioning(torch.arange(len(dm.SHAPE_KINDS))).values()

    def cond(index):
        return {"encoder_hidden_states": tokens[labels[index]], "pooled_projections": pooled[labels[index]]}  # fmt: skip

    # the same initial transformer whether the VAE was trained now or reused
    torch.manual_seed(args.seed)
    model = build_lshapes_transformer()
    state, stats = diffusion_train("lshapes", model, lshapes_process(), latents, cond, args.lshapes_steps, args.lshapes_batch,
                                   args.lshapes_lr, args.ema, args.seed)  # fmt: skip
    settings = {"steps": args.lshapes_steps, "batch": args.lshapes_batch, "lr": args.lshapes_lr, "ema": args.ema,
                "n_images": args.n, "seed": args.seed, "process": "RectifiedFlow(shift=3.0)", "scaling": scaling,
                "threads": torch.get_num_threads()}  # fmt: skip
    size = save_atomic(state, MODELS / LSHAPES_WEIGHTS, torch.float16, {"settings": json.dumps(settings), "scaling": scaling})  # fmt: skip
    latent = load_lshapes_model(MODELS)
    to_pil_grid(lshapes_samples(latent, per_class=8, steps=20), rows=len(dm.SHAPE_KINDS), scale=4).save(MODELS / "lshapes_samples.png")  # fmt: skip
    return {"files": [LSHAPES_WEIGHTS, LSHAPES_VAE_WEIGHTS], "bytes": size, **vae_record,
            "parameters": sum(p.numel() for p in latent.transformer.parameters()),
            "vae_parameters": sum(p.numel() for p in latent.vae.parameters()), "settings": settings, **latent_stats,
            "clamp_effect": clamp_effect(latent, latents[:512]), **stats,
            "minutes": round((vae_record["vae"]["seconds"] + stats["seconds"]) / 60, 1), "samples_png": "lshapes_samples.png"}  # fmt: skip


def clamp_effect(latent: LatentModel, latents: torch.Tensor) -> dict:
    """What the benchmarks' clamp of samples to [-1, 1] does to decoded images: PSNR and pixel
    copy similarity (the lshapes detector) between decodes of clamped and unclamped latents."""
    from unlearn_core.verify.metrics import PixelCopyDetector, copy_similarity

    plain, clamped = to_unit(latent.decode(latents)), to_unit(latent.decode(latents.clamp(-1, 1)))
    similarity = copy_similarity(PixelCopyDetector(8), clamped, plain)
    return {"psnr_db": round(float(psnr(clamped, plain).mean()), 2), "copy_similarity_mean": round(float(similarity.mean()), 4),
            "copy_similarity_min": round(float(similarity.min()), 4)}  # fmt: skip


def lshapes_samples(latent: LatentModel, per_class: int, steps: int) -> torch.Tensor:
    """Decoded samples, ``per_class`` seeds of each class in turn (rows of the grid)."""
    labels = [c for c in range(len(dm.SHAPE_KINDS)) for _ in range(per_class)]
    config = latent.transformer.config
    noise = seeded_noise(list(range(len(labels))), (config.in_channels, config.sample_size, config.sample_size))  # fmt: skip
    return latent.decode(sample(DiffusersDenoiser(latent.transformer, latent.process), latent.process, noise,
                                lshapes_conditioning(labels), steps=steps))  # fmt: skip


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["vshapes", "lshapes"], action="append")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--n", type=int, default=20000)
    parser.add_argument("--vae-steps", type=int, default=2000)
    parser.add_argument("--vae-batch", type=int, default=32)
    parser.add_argument("--vae-lr", type=float, default=2e-3)
    parser.add_argument("--vae-kl", type=float, default=1e-3, help="KL weight (per latent element) of the lshapes VAE")  # fmt: skip
    parser.add_argument("--lshapes-steps", type=int, default=8000)
    parser.add_argument("--lshapes-batch", type=int, default=64)
    parser.add_argument("--lshapes-lr", type=float, default=1e-3)
    parser.add_argument("--reuse-vae", action="store_true", help="lshapes: keep the saved VAE, train only the flow")  # fmt: skip
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)
    MODELS.mkdir(parents=True, exist_ok=True)
    record_path = MODELS / RECORD
    record = json.loads(record_path.read_text()) if record_path.is_file() else {}
    for name in args.only or ["vshapes", "lshapes"]:
        record[name] = {"vshapes": train_vshapes, "lshapes": train_lshapes}[name](args)
        partial = record_path.with_name(RECORD + ".partial")
        partial.write_text(json.dumps(record, indent=2))
        partial.replace(record_path)
        log.info("%s: %s", name, {k: v for k, v in record[name].items() if k != "loss_history"})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
