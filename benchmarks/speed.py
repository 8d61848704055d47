"""Time per unlearning step vs one plain LoRA step on the same model, batch and rank.

Ours takes the forget and the remember gradient from one forward + one backward pass over the
joined batch (per-half LoRA gradients, :mod:`unlearn_core.method.split_gradients`), then projects and
steps; the plain step trains the same LoRA on the whole batch in one pass. For reference the
two-pass form (a forward + backward per half, what a host without the split runs) is timed too.
All are timed in one process after warm-up, in short interleaved blocks (``--steps`` steps of
each kind back to back, ``--repeats`` times): a ratio is the median over blocks of ours / plain
within a block, so a change in the machine's load (this machine is shared) hits both sides of
each pair alike. Memory: the bytes autograd keeps for the backward pass of one step (activations, model
weights excluded), which is what grows with batch and resolution; the process's peak RSS covers
all of them together. Prints a markdown table and writes JSON.

    python benchmarks/speed.py                   # tiny SD3 transformer + the flags demo model, and the demo's training
    python benchmarks/speed.py --models flags --batch 16 --skip-demo
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import statistics
import time
from pathlib import Path

import torch

from unlearn_core import ForgetTargets, RememberSet, UnlearnConfig, UnlearnData
from unlearn_core.backends.diffusers_backend import lora_attached, unlearn_diffusers
from unlearn_core.diffusion.denoiser import concat, select
from unlearn_core.diffusion.process import RectifiedFlow
from unlearn_core.method.objectives import denoising_loss
from unlearn_core.method.trainer import train_unlearning


def tiny_sd3_setup(batch: int):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=32, patch_size=2, in_channels=16, out_channels=16, num_layers=2, attention_head_dim=64,
        num_attention_heads=2, joint_attention_dim=64, caption_projection_dim=128, pooled_projection_dim=32,
        pos_embed_max_size=32,
    )  # fmt: skip
    g = torch.Generator().manual_seed(1)

    def cond(n):
        return {"encoder_hidden_states": torch.randn(n, 8, 64, generator=g), "pooled_projections": torch.randn(n, 32, generator=g)}

    shape = (16, 32, 32)
    targets = torch.randn(2, *shape, generator=g)
    data = UnlearnData(
        ForgetTargets(targets, targets + 0.3 * torch.randn(targets.shape, generator=g), cond(2)),
        RememberSet(torch.randn(16, *shape, generator=g), cond(16)),
    )
    return model, RectifiedFlow(), data


def flags_data(n_targets: int = 2, n_remember: int = 16) -> UnlearnData:
    """Drawn flags in the model's input space: "ireland" targets with noisy surrogates and a
    balanced remember set. Step time does not depend on the pixels, so no sampling is needed."""
    from unlearn_core.demo.models import FLAG_CLASSES, draw_flag, flag_dataset, flags_conditioning

    generator = torch.Generator().manual_seed(0)
    ireland = FLAG_CLASSES.index("ireland")
    targets = torch.stack([draw_flag("ireland", generator) for _ in range(n_targets)])
    surrogates = (targets + 0.2 * torch.randn(targets.shape, generator=generator)).clamp(-1, 1)
    remember, labels = flag_dataset(-(-n_remember // len(FLAG_CLASSES)), seed=1)
    remember, labels = remember[:n_remember], labels[:n_remember]
    own_noise = torch.randn(targets.shape, generator=generator)  # so forget_noise="own" runs its path
    return UnlearnData(ForgetTargets(targets, surrogates, flags_conditioning([ireland] * n_targets), own_noise),
                       RememberSet(remember, flags_conditioning(labels)))  # fmt: skip


def flags_setup(batch: int):
    from unlearn_core.demo.models import load_flags_model

    model, process = load_flags_model()
    return model, process, flags_data()


def demo_training_seconds(settings=None) -> dict:
    """Wall time of the demo's training (its config, model and set sizes: one target, the
    remember set of ``DemoSettings``), without the demo's sampling before and after."""
    from unlearn_core.demo.models import FLAG_CLASSES, load_flags_model
    from unlearn_core.demo.run import DemoSettings

    settings = settings or DemoSettings()
    config = settings.config
    model, process = load_flags_model()
    n_remember = settings.remember_same_prompt + settings.remember_per_other_class * (len(FLAG_CLASSES) - 1)
    outcome = unlearn_diffusers(model, process, flags_data(1, n_remember), config)
    return {"steps": config.steps, "forget_batch": config.forget_batch_size, "remember_batch": config.remember_batch_size,
            "rank": config.lora_rank, "seconds": outcome.training.seconds}  # fmt: skip


SETUPS = {"tiny-sd3": tiny_sd3_setup, "flags": flags_setup}


def plain_lora_step(denoiser, process, data, optimizer, params, batch, generator):
    """One ordinary LoRA training step on ``batch`` samples drawn from both sets."""
    forget_index = torch.randint(len(data.forget), (batch // 2,), generator=generator)
    remember_index = torch.randint(len(data.remember), (batch - batch // 2,), generator=generator)
    x0 = torch.cat([data.forget.surrogates[forget_index], data.remember.samples[remember_index]])
    cond = concat([select(data.forget.cond, forget_index), select(data.remember.cond, remember_index)])
    t = process.sample_t(batch, generator).to(x0.device)
    noise = torch.randn(x0.shape, generator=generator).to(x0)
    loss = denoising_loss(denoiser, process, x0, x0, cond, noise, t).mean()
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


@contextlib.contextmanager
def saved_for_backward(model: torch.nn.Module):
    """{storage: bytes} of every tensor autograd saves inside the block, model weights excluded."""
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            storages[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        yield storages


def measure(name: str, steps: int, batch: int, rank: int, repeats: int, balance: str | None = None) -> dict:
    """``balance`` None keeps UnlearnConfig's default (as every other option here)."""
    model, process, data = SETUPS[name](batch)
    options = {} if balance is None else {"balance": balance}
    config = UnlearnConfig(steps=steps, lora_rank=rank, forget_batch_size=batch // 2, **options,
                           remember_batch_size=batch - batch // 2, learning_rate=1e-4)  # fmt: skip
    ours, two_pass, plain = [], [], []
    with lora_attached(model, rank=rank, seed=0) as lora:
        denoiser, unsplit = lora.denoiser(process), lora.denoiser(process, split=False)
        params = lora.parameters()
        optimizer = torch.optim.AdamW(params, lr=1e-4)
        generator = torch.Generator().manual_seed(0)
        warm_up = UnlearnConfig(**{**config.to_dict(), "steps": 3})
        for _ in range(3):
            plain_lora_step(denoiser, process, data, optimizer, params, batch, generator)
        train_unlearning(denoiser, process, data, warm_up)
        train_unlearning(unsplit, process, data, warm_up)
        with saved_for_backward(model) as plain_saved:
            plain_lora_step(denoiser, process, data, optimizer, params, batch, generator)
        with saved_for_backward(model) as ours_saved:
            train_unlearning(denoiser, process, data, UnlearnConfig(**{**config.to_dict(), "steps": 1}))
        for _ in range(repeats):  # interleave so drift in machine load hits all alike
            started = time.perf_counter()
            for _ in range(steps):
                plain_lora_step(denoiser, process, data, optimizer, params, batch, generator)
            plain.append((time.perf_counter() - started) / steps)
            ours.append(train_unlearning(denoiser, process, data, config).seconds / steps)
            two_pass.append(train_unlearning(unsplit, process, data, config).seconds / steps)
    return {
        "model": name,
        "batch": batch,
        "rank": rank,
        "plain_step_s": statistics.median(plain),
        "unlearn_step_s": statistics.median(ours),
        "two_pass_step_s": statistics.median(two_pass),
        "ratio": statistics.median(o / p for o, p in zip(ours, plain, strict=True)),
        "two_pass_ratio": statistics.median(t / p for t, p in zip(two_pass, plain, strict=True)),
        # The spread of the per-block ratios shows how much the machine's load moved them.
        "ratios": [o / p for o, p in zip(ours, plain, strict=True)],
        "plain_saved_mb": sum(plain_saved.values()) / 2**20,
        "unlearn_saved_mb": sum(ours_saved.values()) / 2**20,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(SETUPS), choices=list(SETUPS))
    parser.add_argument("--steps", type=int, default=5, help="steps per timed block")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=30, help="interleaved blocks of each kind")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip-demo", action="store_true", help="do not time the demo's training")
    parser.add_argument("--balance", choices=["none", "scale", "cap"], help="ours' gradient balance (default: the config's)")
    parser.add_argument("--json", type=Path, default=Path("out/benchmarks/speed.json"))
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.set_flush_denormal(True)  # denormal LoRA values slow CPU kernels many times over
    rows = [{**measure(name, args.steps, args.batch, args.rank, args.repeats, args.balance), "balance": args.balance or UnlearnConfig().balance}
            for name in args.models]  # fmt: skip
    demo = None if args.skip_demo else demo_training_seconds()
    print("| model | batch | rank | plain LoRA step (ms) | unlearning step (ms) | ratio | two-pass step (ms) | ratio "
          "| saved for backward, plain / ours (MB) | peak RSS (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(f"| {row['model']} | {row['batch']} | {row['rank']} | {1000 * row['plain_step_s']:.1f} | "
              f"{1000 * row['unlearn_step_s']:.1f} | {row['ratio']:.3f} | {1000 * row['two_pass_step_s']:.1f} | "
              f"{row['two_pass_ratio']:.3f} | {row['plain_saved_mb']:.1f} / {row['unlearn_saved_mb']:.1f} | "
              f"{row['peak_rss_mb']:.0f} |")  # fmt: skip
    if demo:
        print(f"\ndemo training (flags, {demo['steps']} steps, batch {demo['forget_batch']} + {demo['remember_batch']}, "
              f"rank {demo['rank']}): {demo['seconds']:.1f} s")  # fmt: skip
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"threads": args.threads, "torch": torch.__version__, "rows": rows,
                                     "demo_training": demo}, indent=2))  # fmt: skip
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
