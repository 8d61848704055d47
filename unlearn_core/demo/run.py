"""The whole job on a diffusers model, headless: generate, find/mark, surrogate, unlearn, check.

:func:`run_demo` runs it on the embedded flags model (an SD3-architecture rectified-flow
transformer trained by ``benchmarks/train_demo_models.py``) and writes a before/after grid,
the LoRA and a JSON + HTML report. Its preserve check is :func:`unlearn_core.verify.preserve.check_preservation`,
the one the ComfyUI node runs; its seeds follow :mod:`unlearn_core.data.seeds`.
"""

from __future__ import annotations

import base64
import contextlib
import html
import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from ..backends.diffusers_backend import DiffusersDenoiser, lora_attached, unlearn_diffusers
from ..data.forget_set import ForgetSetStore
from ..data.remember import RememberRequest, generate_remember
from ..data.seeds import MAX_REMEMBER, preserve_seeds
from ..data.sets import ForgetTargets, RememberSet, UnlearnData
from ..data.surrogate import SAMPLED_KINDS, build_surrogate
from ..diffusion.noise import seeded_noise
from ..diffusion.sampling import DenoiserSampler
from ..errors import InputError
from ..formats.files import atomic_write_text, tensor_hash
from ..formats.lora import LoraWeights, reproduction_metadata, save_lora
from ..method.config import UnlearnConfig
from ..method.stopping import CheckSettings
from ..verify.metrics import load_lpips, ssim, to_unit
from ..verify.preserve import HeldOut, Replay, Thresholds, check_preservation, paired, regenerate
from ..verify.previews import save_png, tile_grid

__all__ = ["DemoSettings", "LabelSampler", "run_demo", "generate"]

log = logging.getLogger(__name__)


@torch.no_grad()
def generate(model, process, cond_fn: Callable, labels: list[int], seeds: list[int], steps: int,
             lora: LoraWeights | None = None, clip: float | None = None) -> torch.Tensor:  # fmt: skip
    """Samples for (label, seed) pairs of an embedded model, in [-1, 1]; the same pair always
    gives the same image (the core's sampler, with ``lora`` attached while it samples)."""
    shape = (model.config.in_channels, model.config.sample_size, model.config.sample_size)
    with lora_attached(model, weights=lora) if lora is not None else contextlib.nullcontext():
        sampler = DenoiserSampler(DiffusersDenoiser(model, process), process, steps, clip)
        return sampler.generate(cond_fn(labels), seeds, shape).clamp(-1, 1)


class LabelSampler:
    """The embedded models' :class:`~unlearn_core.diffusion.sampling.Sampler`: a prompt is a class label (or
    one label per seed), turned into conditioning by ``cond_fn``."""

    def __init__(self, sampler: DenoiserSampler, cond_fn: Callable):
        self.sampler, self.cond_fn = sampler, cond_fn

    def generate(self, prompt, seeds, shape):
        return self.sampler.generate(self.cond_fn(prompt if isinstance(prompt, list) else [prompt]), seeds, shape)

    def edit(self, prompt, image, strength, seed, mask=None):
        return self.sampler.edit(self.cond_fn([prompt]), image, strength, seed, mask)


# --- the demo ----------------------------------------------------------------------------------


@dataclass
class DemoSettings:
    seeds_per_class: int = 64
    sample_steps: int = 20
    target: str | None = None  # "class:seed"; None picks the most confidently wrong output
    surrogate: str = "inpaint"  # regenerate the outer bands under the prompt; or "sdedit"
    strength: float = 1.0
    remember_same_prompt: int = 24
    remember_per_other_class: int = 4
    integrity_seeds: int = 64
    # copy similarity in flag-classifier features: two outputs of the same flag score >= 0.98,
    # different flags <= 0.88 (measured on 48 samples), so below 0.9 the target is gone
    forget_threshold: float = 0.9
    integrity_ssim_min: float = 0.85
    config: UnlearnConfig = field(default_factory=UnlearnConfig)  # the library's defaults, as a user gets them

    def __post_init__(self):
        if self.surrogate not in SAMPLED_KINDS:  # the demo makes its surrogate with the model
            raise InputError(f"surrogate={self.surrogate!r}: choose {' or '.join(SAMPLED_KINDS)}")
        for name in ("seeds_per_class", "sample_steps", "remember_same_prompt", "integrity_seeds"):
            if getattr(self, name) < 1:
                raise InputError(f"{name} must be at least 1")
        for name in ("remember_same_prompt", "remember_per_other_class"):
            if not 0 <= getattr(self, name) <= MAX_REMEMBER:
                raise InputError(f"{name}={getattr(self, name)} must lie in [0, {MAX_REMEMBER}] (the seed rule's remember range)")
        if not 0 < self.strength <= 1:
            raise InputError(f"strength={self.strength} must lie in (0, 1]; 0.3-0.7 edits mildly (sdedit), 1.0 repaints fully")


def parse_target(text: str, classes: tuple[str, ...]) -> tuple[int, int]:
    try:
        name, seed = text.split(":")
        return classes.index(name), int(seed)
    except ValueError:
        raise InputError(f"target {text!r} must look like CLASS:SEED with CLASS one of {', '.join(classes)}") from None


def find_undesired(labels: list[int], predicted: torch.Tensor, confidence: torch.Tensor) -> int:
    """The output most confidently classified as another class (else the least confident one)."""
    wrong = [i for i, label in enumerate(labels) if int(predicted[i]) != label]
    if wrong:
        return max(wrong, key=lambda i: float(confidence[i]))
    return int(torch.argmin(confidence))


def run_demo(out_dir: str | Path = "out/demo", settings: DemoSettings | None = None,
             callback: Callable | None = None) -> dict:  # fmt: skip
    """The main job on the embedded flags model. Returns the report (also written to out_dir)."""
    from . import models as demo_model

    settings = settings or DemoSettings()
    classes = demo_model.FLAG_CLASSES
    if settings.target:  # refuse a bad target before any work or any file
        label, seed = parse_target(settings.target, classes)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise InputError(f"the output folder {str(out)!r} is a file; give a folder (--out)")
    started = time.perf_counter()
    model, process = demo_model.load_flags_model()
    classifier = demo_model.load_flags_classifier()
    cond_fn = demo_model.flags_conditioning
    base_fingerprint = {name: tensor_hash(p) for name, p in model.state_dict().items()}

    # 1. generate outputs for fixed seeds and find (or take) the undesired one
    labels = [c for c in range(len(classes)) for _ in range(settings.seeds_per_class)]
    seeds = [s for _ in classes for s in range(settings.seeds_per_class)]
    if settings.target:
        if (label, seed) not in zip(labels, seeds, strict=True):
            labels.append(label)
            seeds.append(seed)
    log.info("generating %d outputs", len(seeds))
    outputs = generate(model, process, cond_fn, labels, seeds, settings.sample_steps)
    predicted, confidence = demo_model.classify_flags(classifier, outputs)
    if settings.target:
        index = list(zip(labels, seeds, strict=True)).index((label, seed))
    else:
        index = find_undesired(labels, predicted, confidence)
    target_label, target_seed = labels[index], seeds[index]
    target = outputs[index : index + 1]
    log.info("undesired output: prompt %s, seed %d, looks like %s (p=%.2f)", classes[target_label], target_seed,
             classes[int(predicted[index])], float(confidence[index]))  # fmt: skip

    # 2. mark it in a forget set on disk
    provenance = {"prompt": classes[target_label], "seed": target_seed, "steps": settings.sample_steps,
                  "classified_as": classes[int(predicted[index])], "model": "flags_sd3 (embedded demo)"}  # fmt: skip
    record, _ = ForgetSetStore(out / "forget_sets").add("demo", to_unit(target[0]).permute(1, 2, 0), provenance=provenance)

    # 3. surrogate from the same model, same prompt
    sampler = LabelSampler(DenoiserSampler(DiffusersDenoiser(model, process), process, settings.sample_steps), cond_fn)
    target_cond = cond_fn([target_label])
    mask = demo_model.outer_bands_mask(*target.shape[-2:]) if settings.surrogate == "inpaint" else None
    surrogate = build_surrogate(settings.surrogate, target, sampler=sampler, prompt=target_label, strength=settings.strength,
                                seed=1, mask=mask).clamp(-1, 1)  # fmt: skip

    # 4. remember set: other seeds of the same prompt (the paper's choice) plus a few of each other class,
    # all from the seed rule's remember range, so the preserve check never sees an output training saw
    requests = [RememberRequest(target_label, target_seed, settings.remember_same_prompt)]
    requests += [RememberRequest(other, target_seed, settings.remember_per_other_class)
                 for other in range(len(classes)) if other != target_label]  # fmt: skip
    remember, remember_labels = generate_remember(sampler, requests, tuple(target.shape[1:]))
    own_noise = seeded_noise([target_seed], tuple(target.shape[1:]))  # the noise that sampled the target
    data = UnlearnData(ForgetTargets(target, surrogate, target_cond, own_noise),
                       RememberSet(remember.clamp(-1, 1), cond_fn(remember_labels)))  # fmt: skip

    # 5. train the unlearning LoRA
    to_images = lambda samples: to_unit(samples.clamp(-1, 1))  # noqa: E731
    check = CheckSettings(demo_model.flag_copy_detector(classifier), settings.forget_threshold, settings.sample_steps,
                          to_images=to_images)  # fmt: skip
    outcome = unlearn_diffusers(model, process, data, settings.config, callback=callback, check=check)
    train_seconds = outcome.training.seconds
    lora = outcome.lora
    metadata = reproduction_metadata(
        settings.config, data, "flags_sd3 (embedded demo)", target_ids=[record.id], demo_settings={k: v for k, v in asdict(settings).items() if k != "config"},
    )
    lora_file = save_lora(out / "unlearn_lora.safetensors", lora, "diffusers", metadata)

    # 6. preserve check (the node's): the target's seed regenerated by the base model (it must reproduce
    # the target) and the unlearned one, and held-out seeds of every class, base vs unlearned
    integrity_seeds = preserve_seeds(target_seed, settings.integrity_seeds)
    integrity_labels = [index % len(classes) for index in range(len(integrity_seeds))]
    replays = [Replay(record.id, to_unit(target[0]), tuple(target.shape[1:]), target_label, target_seed)]
    held_out = [HeldOut(integrity_labels, integrity_seeds, tuple(target.shape[1:]),
                        [{"prompt": classes[label], "seed": seed} for label, seed in zip(integrity_labels, integrity_seeds, strict=True)])]  # fmt: skip
    base = regenerate(sampler, to_images, replays, held_out)
    with lora_attached(model, weights=lora):
        unlearned = regenerate(sampler, to_images, replays, held_out)
    check = check_preservation(
        *paired(replays, held_out, base, unlearned), demo_model.flag_copy_detector(classifier),
        Thresholds(settings.forget_threshold, settings.integrity_ssim_min), load_lpips(),
    )  # fmt: skip
    after_target = unlearned.targets[0].unsqueeze(0) * 2 - 1
    evaluation = check.evaluation
    after_predicted, after_confidence = demo_model.classify_flags(classifier, after_target)
    base_intact = all(tensor_hash(p) == base_fingerprint[n] for n, p in model.state_dict().items())

    checks = {
        "forgotten": check.summary["forgetting_passed"],
        "integrity": check.summary["integrity_passed"],
        "base_model_untouched": base_intact,
    }
    report = {
        "model": "flags_sd3 (embedded demo: SD3 transformer, rectified flow, 32x32 pixels)",
        "target": {**provenance, "id": record.id, "confidence": float(confidence[index])},
        "after": {"classified_as": classes[int(after_predicted[0])], "confidence": float(after_confidence[0])},
        "surrogate": {"method": settings.surrogate, "strength": settings.strength,
                      "ssim_to_target": float(ssim(to_unit(surrogate), to_unit(target)))},  # fmt: skip
        "training": {"steps": outcome.training.steps, "max_steps": settings.config.steps, "seconds": train_seconds,
                     "final": outcome.training.final, "verification": outcome.training.verification,
                     "config": settings.config.to_dict()},  # fmt: skip
        "evaluation": asdict(evaluation),
        "preserve_check": check.as_dict(),
        "thresholds": check.summary["thresholds"],
        "integrity_seeds": settings.integrity_seeds,
        "checks": checks,
        "passed": all(checks.values()),
        "files": {"lora": lora_file.name, "grid": "grid.png", "report_html": "report.html"},
        "seconds": time.perf_counter() - started,
    }
    base_others = torch.stack(base.held_out[:8]) * 2 - 1
    after_others = torch.stack(unlearned.held_out[:8]) * 2 - 1
    save_png(out / "grid.png", demo_grid(target, surrogate, after_target, base_others, after_others))
    atomic_write_text(out / "report.json", json.dumps(report, indent=2))
    atomic_write_text(out / "report.html", report_html(report, out / "grid.png"))
    return report


# --- pictures and the report -------------------------------------------------------------------


#: the grid's labels: row 1's columns (one seed), and rows 2-3 (other seeds)
GRID_COLUMNS = ("target", "surrogate", "after")
GRID_ROWS = ("", "before", "after")


def demo_grid(target, surrogate, after_target, base_others, after_others, scale: int = 4, gap: int = 2) -> torch.Tensor:
    """Row 1: target | surrogate | after unlearning (same seed). Rows 2-3: other seeds, base vs after.
    Labelled (:data:`GRID_COLUMNS` above, :data:`GRID_ROWS` on the left)."""
    blank = torch.ones_like(target[0])
    rows = [[target[0], surrogate[0], after_target[0]] + [blank] * (len(base_others) - 3),
            list(base_others), list(after_others)]  # fmt: skip
    cells = [[to_unit(torch.nn.functional.interpolate(c[None], scale_factor=scale, mode="nearest")[0]) for c in row]
             for row in rows]  # fmt: skip
    return tile_grid(cells, gap, column_labels=GRID_COLUMNS, row_labels=GRID_ROWS)


def report_html(report: dict, grid_path: Path) -> str:
    encoded = base64.b64encode(grid_path.read_bytes()).decode()
    evaluation = report["evaluation"]
    rows = [
        ("target", f"prompt <b>{html.escape(report['target']['prompt'])}</b>, seed {report['target']['seed']}, "
                   f"looked like {html.escape(report['target']['classified_as'])}"),
        ("after unlearning", f"looks like {html.escape(report['after']['classified_as'])}"),
        ("copy similarity to target", ", ".join(f"{v:.3f}" for v in evaluation["target_copy_similarity"])),
        ("integrity SSIM / PSNR", f"{evaluation['integrity_ssim']:.4f} / {evaluation['integrity_psnr']:.2f} dB"),
        ("integrity LPIPS", html.escape(str(evaluation["integrity_lpips"]))),
        ("feature Fréchet distance", f"{evaluation['feature_distance']:.4f}"),
        ("training", f"{report['training']['steps']} steps in {report['training']['seconds']:.1f} s"),
        ("checks", ", ".join(f"{k}: {'pass' if v else 'FAIL'}" for k, v in report["checks"].items())),
    ]  # fmt: skip
    table = "\n".join(f"<tr><th>{html.escape(k)}</th><td>{v}</td></tr>" for k, v in rows)
    verdict = "PASSED" if report["passed"] else "FAILED"
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>Instance unlearning demo: {verdict}</title>
<style>body{{font-family:sans-serif;max-width:900px;margin:2em auto}}th{{text-align:left;padding-right:1em}}
img{{image-rendering:pixelated;border:1px solid #ccc}}</style></head>
<body><h1>Instance unlearning demo: {verdict}</h1>
<p>Row 1: the undesired output | its surrogate | the same seed after unlearning.
Rows 2-3: other seeds before and after (they should not change).</p>
<img src="data:image/png;base64,{encoded}" alt="before/after grid">
<table>{table}</table></body></html>
"""
