"""Train the shipped demo models: the flags SD3 transformer, the shapes DDPM and the flags classifier.

Everything is seeded, runs on CPU (2 threads by default) and writes safetensors atomically into
``--out`` (default ``unlearn_core/assets``), plus ``demo_models.json`` with the settings, seconds
taken and final losses / accuracy of each model. The classifier is trained first because the
flags check uses it.

    python benchmarks/train_demo_models.py                  # all three (about 12 minutes)
    python benchmarks/train_demo_models.py --only flags --flags-steps 300
    python benchmarks/train_demo_models.py --only flags --grid /tmp/flags_grid.png
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
from unlearn_core.demo import models as dm
from unlearn_core.diffusion.noise import seeded_noise
from unlearn_core.diffusion.process import DDPMEpsilon, ForwardProcess
from unlearn_core.diffusion.sampling import sample
from unlearn_core.errors import InputError

log = logging.getLogger("train_demo_models")
RECORD = "demo_models.json"


# --------------------------------------------------------------------------- files


def save_atomic(state: dict[str, torch.Tensor], path: Path, dtype: torch.dtype, metadata: dict) -> int:
    """Write safetensors to a temp file in the same folder, then os.replace it into place."""
    from safetensors.torch import save_file

    state = {key: value.detach().to(dtype).contiguous().cpu() for key, value in state.items()}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        save_file(state, tmp, metadata={k: str(v) for k, v in metadata.items()})
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; shipped files must be world-readable
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path.stat().st_size


def update_record(out: Path, name: str, entry: dict) -> None:
    """Merge ``entry`` under ``name`` into the JSON record beside the weights (atomically)."""
    path = out / RECORD
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[name] = entry
    record["torch"] = torch.__version__
    fd, tmp = tempfile.mkstemp(prefix=RECORD + ".", suffix=".tmp", dir=out)
    with os.fdopen(fd, "w") as handle:
        json.dump(record, handle, indent=2, sort_keys=True)
        handle.write("\n")
    os.chmod(tmp, 0o644)
    os.replace(tmp, path)


# --------------------------------------------------------------------------- training helpers


class Ema:
    """Exponential moving average of a model's floating-point state (with a short warm-up)."""

    def __init__(self, model: torch.nn.Module, decay: float):
        self.decay = decay
        self.shadow = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.updates = 0

    @torch.no_grad()
    def update(self, model: torch.nn.Module) -> None:
        self.updates += 1
        decay = min(self.decay, (1 + self.updates) / (10 + self.updates))
        for key, value in model.state_dict().items():
            if value.dtype.is_floating_point:
                self.shadow[key].lerp_(value, 1 - decay)
            else:
                self.shadow[key].copy_(value)


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    """Linear warm-up, then cosine decay to 10% of the peak."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def diffusion_train(
    name: str,
    model: torch.nn.Module,
    process: ForwardProcess,
    images: torch.Tensor,
    cond_fn,
    steps: int,
    batch: int,
    lr: float,
    ema_decay: float,
    seed: int,
) -> tuple[dict[str, torch.Tensor], dict]:
    """Native-target MSE training (eps for DDPM, v for flow); returns the EMA state and stats."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    denoiser = DiffusersDenoiser(model, process)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.99), weight_decay=0.01)
    ema = Ema(model, ema_decay)
    started = time.perf_counter()
    running, history = None, []
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, lr, warmup=min(100, steps // 10 + 1))
        index = torch.randint(len(images), (batch,), generator=generator)
        x0 = images[index]
        t = process.sample_t(batch, generator)
        noise = torch.randn(x0.shape, generator=generator)
        x_t = process.add_noise(x0, noise, t)
        target = process.output_target(x_t, x0, t)
        output = denoiser.raw_output(x_t, t, cond_fn(index))
        loss = F.mse_loss(output.float(), target)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        ema.update(model)
        value = loss.item()
        running = value if running is None else 0.98 * running + 0.02 * value
        if step % 50 == 0 or step == steps - 1:
            elapsed = time.perf_counter() - started
            log.info("%s step %d/%d loss %.4f (avg %.4f) %.0fs", name, step + 1, steps, value, running, elapsed)
            history.append([step + 1, round(running, 5)])
    model.eval()
    stats = {"seconds": round(time.perf_counter() - started, 1), "final_loss_avg": round(running, 5),
             "loss_history": history}  # fmt: skip
    return ema.shadow, stats


def to_pil_grid(images: torch.Tensor, rows: int, scale: int = 4):
    """A PIL grid of images in [-1, 1] (N, 3, H, W), ``rows`` rows, upscaled ``scale`` times."""
    from PIL import Image

    n, _, h, w = images.shape
    cols = math.ceil(n / rows)
    pad = 2
    canvas = torch.ones(3, rows * (h + pad) + pad, cols * (w + pad) + pad)
    for i, image in enumerate(((images.float() + 1) / 2).clamp(0, 1)):
        r, c = divmod(i, cols)
        canvas[:, pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = image
    array = (canvas.permute(1, 2, 0).numpy() * 255).round().astype("uint8")
    return Image.fromarray(array).resize((array.shape[1] * scale, array.shape[0] * scale), Image.NEAREST)


# --------------------------------------------------------------------------- classifier


def augment(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Robustness augmentation in [0, 1]: shift, blur, contrast/brightness, colour cast, noise."""
    n = len(images)
    out = images
    # random translation by up to 2 pixels (edge replicate)
    padded = F.pad(out, (2, 2, 2, 2), mode="replicate")
    dy, dx = torch.randint(0, 5, (2, n), generator=generator)
    size = images.shape[-1]
    out = torch.stack([padded[i, :, dy[i]: dy[i] + size, dx[i]: dx[i] + size] for i in range(n)])
    # blur half of them (3x3 box blended in by a random amount)
    blurred = F.avg_pool2d(F.pad(out, (1, 1, 1, 1), mode="replicate"), 3, stride=1)
    amount = torch.rand(n, 1, 1, 1, generator=generator) * (torch.rand(n, 1, 1, 1, generator=generator) < 0.5)
    out = out + amount * (blurred - out)
    contrast = 1 + 0.2 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    brightness = 0.1 * (torch.rand(n, 1, 1, 1, generator=generator) - 0.5)
    cast = 0.06 * (torch.rand(n, 3, 1, 1, generator=generator) - 0.5)
    out = (out - 0.5) * contrast + 0.5 + brightness + cast
    sigma = 0.08 * torch.rand(n, 1, 1, 1, generator=generator)
    out = out + sigma * torch.randn(out.shape, generator=generator)
    # low-frequency blotches, like the smooth errors of a small generator
    blotch = F.interpolate(torch.randn(n, 3, 4, 4, generator=generator), size=size, mode="bilinear", align_corners=False)
    out = out + 0.04 * torch.rand(n, 1, 1, 1, generator=generator) * blotch
    return out.clamp(0, 1)


def train_classifier(args, out: Path) -> None:
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    images, labels = dm.flag_dataset(args.classifier_per_class, seed=args.seed + 10)
    test_images, test_labels = dm.flag_dataset(50, seed=args.seed + 11)
    images, test_images = (images + 1) / 2, (test_images + 1) / 2
    model = dm.FlagClassifier()
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=1e-4)
    started = time.perf_counter()
    steps, batch = args.classifier_steps, 128
    running = None
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, steps, 2e-3, warmup=20)
        index = torch.randint(len(images), (batch,), generator=generator)
        logits = model(augment(images[index], generator))
        loss = F.cross_entropy(logits, labels[index], label_smoothing=0.05)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        value = loss.item()
        running = value if running is None else 0.95 * running + 0.05 * value
        if step % 50 == 0 or step == steps - 1:
            log.info("classifier step %d/%d loss %.4f %.0fs", step + 1, steps, running, time.perf_counter() - started)
    model.eval()
    with torch.no_grad():
        clean_acc = float((model(test_images).argmax(1) == test_labels).float().mean())
        aug_acc = float((model(augment(test_images, generator)).argmax(1) == test_labels).float().mean())
        canonical = torch.stack([dm.draw_flag(name) for name in dm.FLAG_CLASSES])
        canonical_ok = bool((model((canonical + 1) / 2).argmax(1) == torch.arange(len(dm.FLAG_CLASSES))).all())
    seconds = round(time.perf_counter() - started, 1)
    log.info("classifier: held-out accuracy %.4f, augmented %.4f, canonical all right: %s (%.0fs)",
             clean_acc, aug_acc, canonical_ok, seconds)  # fmt: skip
    settings = {"steps": steps, "batch": batch, "lr": 2e-3, "per_class": args.classifier_per_class, "seed": args.seed}
    size = save_atomic(model.state_dict(), out / dm.CLASSIFIER_WEIGHTS, torch.float32, {"settings": json.dumps(settings)})
    update_record(out, "classifier", {
        "file": dm.CLASSIFIER_WEIGHTS, "bytes": size, "parameters": sum(p.numel() for p in model.parameters()),
        "settings": settings, "seconds": seconds, "final_loss_avg": round(running, 5),
        "heldout_accuracy": clean_acc, "augmented_accuracy": aug_acc, "canonical_correct": canonical_ok,
    })  # fmt: skip


# --------------------------------------------------------------------------- flags


def evaluate_flags(model, process, classifier, seeds: int, steps: int, grid: Path | None) -> dict:
    """Sample ``seeds`` seeds per class, classify them, report accuracy and the wrong ones."""
    denoiser = DiffusersDenoiser(model, process)
    n_classes = len(dm.FLAG_CLASSES)
    per_class, wrong, rows = {}, [], []
    for label, name in enumerate(dm.FLAG_CLASSES):
        seed_list = list(range(seeds))
        noise = seeded_noise(seed_list, (3, dm.FLAG_SIZE, dm.FLAG_SIZE))
        images = sample(denoiser, process, noise, dm.flags_conditioning([label] * seeds), steps=steps)
        rows.append(images[: min(seeds, 16)])
        if classifier is None:
            continue
        predicted, confidence = dm.classify_flags(classifier, images)
        per_class[name] = float((predicted == label).float().mean())
        for seed, p, c in zip(seed_list, predicted.tolist(), confidence.tolist()):
            if p != label:
                wrong.append({"class": name, "seed": seed, "classified_as": dm.FLAG_CLASSES[p], "confidence": round(c, 3)})
    if grid is not None:
        to_pil_grid(torch.cat(rows), rows=n_classes).save(grid)
        log.info("flags grid (rows = %s) written to %s", ", ".join(dm.FLAG_CLASSES), grid)
    result = {"seeds_per_class": seeds, "sampling_steps": steps}
    if classifier is not None:
        result.update(per_class_accuracy=per_class, accuracy=sum(per_class.values()) / n_classes, wrong=wrong)
        log.info("flags sample accuracy %s", json.dumps(per_class))
        for item in wrong:
            log.info("wrong: %s", item)
    return result


CONFUSABLE = ("ireland", "italy", "ivory_coast")


def add_caption_noise(images: torch.Tensor, labels: torch.Tensor, fraction: float, seed: int) -> int:
    """Swap a fraction of the confusable trio's images for another trio flag, keeping the caption.

    Scraped training data has such wrong captions; a model trained on it sometimes draws the
    wrong flag for a prompt, which is the kind of output the demo unlearns.
    """
    generator = torch.Generator().manual_seed(seed)
    trio = [dm.FLAG_CLASSES.index(name) for name in CONFUSABLE]
    swapped = 0
    for index in range(len(labels)):
        label = int(labels[index])
        if label in trio and float(torch.rand(1, generator=generator)) < fraction:
            others = [c for c in trio if c != label]
            wrong = others[int(torch.randint(len(others), (1,), generator=generator))]
            images[index] = dm.draw_flag(dm.FLAG_CLASSES[wrong], generator)
            swapped += 1
    return swapped


def train_flags(args, out: Path) -> None:
    torch.manual_seed(args.seed)
    images, labels = dm.flag_dataset(args.flags_per_class, seed=args.seed)
    swapped = add_caption_noise(images, labels, args.caption_noise, args.seed + 7)
    log.info("flags: %d of the confusable trio's captions are wrong (%.0f%%)", swapped, 100 * args.caption_noise)
    model = dm.build_flags_transformer()
    process = dm.flags_process()
    tokens, pooled = dm.flags_conditioning(torch.arange(len(dm.FLAG_CLASSES))).values()

    def cond(index):
        return {"encoder_hidden_states": tokens[labels[index]], "pooled_projections": pooled[labels[index]]}

    log.info("flags: %d images, %d parameters", len(images), sum(p.numel() for p in model.parameters()))
    state, stats = diffusion_train("flags", model, process, images, cond, args.flags_steps, args.flags_batch,
                                   args.flags_lr, args.ema, args.seed)  # fmt: skip
    settings = {"steps": args.flags_steps, "batch": args.flags_batch, "lr": args.flags_lr, "ema": args.ema,
                "per_class": args.flags_per_class, "seed": args.seed, "process": "RectifiedFlow(shift=3.0)",
                "caption_noise": args.caption_noise, "wrong_captions": swapped,
                "threads": torch.get_num_threads()}  # fmt: skip
    size = save_atomic(state, out / dm.FLAGS_WEIGHTS, torch.float16, {"settings": json.dumps(settings)})
    entry = {"file": dm.FLAGS_WEIGHTS, "bytes": size, "parameters": sum(p.numel() for p in model.parameters()),
             "settings": settings, **stats}  # fmt: skip
    entry["check"] = check_flags(args, out)
    update_record(out, "flags", entry)


def check_flags(args, out: Path) -> dict:
    """Reload the saved (fp16-stored) flags model and judge its samples with the classifier."""
    model, process = dm.load_flags_model(out)
    try:
        classifier = dm.load_flags_classifier(out)
    except InputError:
        log.warning("no classifier in %s: sampling without accuracy", out)
        classifier = None
    return evaluate_flags(model, process, classifier, args.check_seeds, args.check_steps, args.grid)


# --------------------------------------------------------------------------- shapes


def train_shapes(args, out: Path) -> None:
    torch.manual_seed(args.seed)
    images = dm.draw_shapes_dataset(args.shapes_n, seed=args.seed + 20)
    model = dm.build_shapes_unet()
    process = DDPMEpsilon.from_scheduler(dm.shapes_scheduler())
    log.info("shapes: %d images, %d parameters", len(images), sum(p.numel() for p in model.parameters()))
    state, stats = diffusion_train("shapes", model, process, images, lambda index: {}, args.shapes_steps,
                                   args.shapes_batch, args.shapes_lr, args.ema, args.seed)  # fmt: skip
    settings = {"steps": args.shapes_steps, "batch": args.shapes_batch, "lr": args.shapes_lr, "ema": args.ema,
                "n_images": args.shapes_n, "seed": args.seed, "scheduler": "DDPMScheduler(1000, linear, epsilon)",
                "threads": torch.get_num_threads()}  # fmt: skip
    size = save_atomic(state, out / dm.SHAPES_WEIGHTS, torch.float16, {"settings": json.dumps(settings)})
    model, process = dm.load_shapes_model(out)
    samples = sample(DiffusersDenoiser(model, process), process,
                     seeded_noise(list(range(16)), (3, dm.SHAPES_SIZE, dm.SHAPES_SIZE)), {}, steps=args.check_steps)  # fmt: skip
    if args.shapes_grid is not None:
        to_pil_grid(samples, rows=2, scale=6).save(args.shapes_grid)
        log.info("shapes grid written to %s", args.shapes_grid)
    check = {"samples": 16, "sampling_steps": args.check_steps, "mean_abs": round(float(samples.abs().mean()), 4),
             "finite": bool(torch.isfinite(samples).all())}  # fmt: skip
    update_record(out, "shapes", {"file": dm.SHAPES_WEIGHTS, "bytes": size,
                                  "parameters": sum(p.numel() for p in model.parameters()),
                                  "settings": settings, **stats, "check": check})  # fmt: skip


# --------------------------------------------------------------------------- main


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("unlearn_core/assets"))
    parser.add_argument("--only", choices=["flags", "shapes", "classifier"], action="append",
                        help="train only this model (repeatable); default: all three")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--ema", type=float, default=0.995)
    parser.add_argument("--flags-steps", type=int, default=1400)
    parser.add_argument("--flags-batch", type=int, default=32)
    parser.add_argument("--flags-lr", type=float, default=1e-3)
    parser.add_argument("--flags-per-class", type=int, default=1000)
    parser.add_argument("--caption-noise", type=float, default=0.05,
                        help="fraction of Ireland/Italy/Ivory Coast images drawn as another of the three")
    parser.add_argument("--shapes-steps", type=int, default=1000)
    parser.add_argument("--shapes-batch", type=int, default=64)
    parser.add_argument("--shapes-lr", type=float, default=1e-3)
    parser.add_argument("--shapes-n", type=int, default=20000)
    parser.add_argument("--classifier-steps", type=int, default=300)
    parser.add_argument("--classifier-per-class", type=int, default=500)
    parser.add_argument("--check-seeds", type=int, default=16, help="flags check: seeds per class")
    parser.add_argument("--check-steps", type=int, default=25, help="sampling steps of the checks")
    parser.add_argument("--check-only", action="store_true", help="only re-run the flags check")
    parser.add_argument("--grid", type=Path, default=None, help="write a PNG grid of flags samples")
    parser.add_argument("--shapes-grid", type=Path, default=None, help="write a PNG grid of shapes samples")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # tiny Adam moments/gradients otherwise slow CPU steps many-fold
    args.out.mkdir(parents=True, exist_ok=True)
    if args.check_only:
        log.info("check: %s", json.dumps({k: v for k, v in check_flags(args, args.out).items() if k != "wrong"}))
        return 0
    todo = args.only or ["classifier", "flags", "shapes"]
    for name in ("classifier", "flags", "shapes"):  # classifier first: the flags check uses it
        if name in todo:
            {"classifier": train_classifier, "flags": train_flags, "shapes": train_shapes}[name](args, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
