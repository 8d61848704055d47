"""The preserve check: did the unlearned model forget each target, and does it keep the rest?

One check for every caller (the ComfyUI node, the demo, the benchmarks). It judges images that
were already generated, so each caller only regenerates with its own sampler and passes them in:

- **reproduction**: the base model's regeneration of a target (its recorded seed and settings)
  must be the target, SSIM >= :data:`~unlearn_core.verify.metrics.SAME_OUTPUT_SSIM`. Otherwise the
  unlearned model's output differs from the target whatever the LoRA did, so the target is
  reported as *cannot verify forgetting* (with the reason), never as forgotten.
- **forgetting** (the method's definition): the copy similarity (a
  :class:`~unlearn_core.verify.metrics.CopyDetector`: SSCD when given, else an offline proxy) of the
  unlearned model's regeneration to the target is below ``forget_below``.
- **integrity**: SSIM, PSNR and LPIPS (when available) between base and unlearned outputs on
  held-out seeds (passes when the mean SSIM reaches ``integrity_at_least``), and the Fréchet
  distance between the two sets' copy-detector features.

Images are (3, H, W) in [0, 1]. A regeneration of another size than its target is resized to
the target for the comparison.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from ..diffusion.sampling import Sampler
from ..errors import InputError
from .metrics import (
    SAME_OUTPUT_SSIM,
    CopyDetector,
    Unavailable,
    at_size,
    copy_similarity,
    frechet_distance,
    judge_forgetting,
    lpips_distance,
    psnr,
    ssim,
    to_unit,
)

__all__ = ["Replay", "HeldOut", "Regenerated", "regenerate", "paired", "TargetImages", "PreservePair", "Thresholds",
           "PreserveReport", "Evaluation", "check_preservation", "evaluate"]  # fmt: skip


@dataclass(frozen=True)
class Replay:
    """What regenerates one target: its image (3, H, W) in [0, 1], the sampler's latent shape, and
    the prompt and seed that made it; without a seed, the sampler ``noise`` (``shape``) recovered
    for it (``noise_source`` says how); with neither it cannot be regenerated (``not_regenerated``
    says why)."""

    id: str
    image: torch.Tensor
    shape: tuple[int, ...]
    prompt: Any
    seed: int | None
    replay_problems: tuple[str, ...] = ()
    not_regenerated: str = "no recorded seed, the target cannot be regenerated"
    noise: torch.Tensor | None = None
    noise_source: str | None = None


@dataclass(frozen=True)
class HeldOut:
    """Held-out outputs to compare base and unlearned on: a prompt, its seeds (from
    :func:`~unlearn_core.data.seeds.preserve_seeds`) and one report label dict per seed."""

    prompt: Any
    seeds: list[int]
    shape: tuple[int, ...]
    labels: list[dict]


@dataclass
class Regenerated:
    """One model's images (3, H, W) for the replays (None where it could not) and the held-out seeds, in order."""

    targets: list[torch.Tensor | None]
    held_out: list[torch.Tensor]


def regenerate(sampler: Sampler, to_images: Callable[[torch.Tensor], torch.Tensor], replays: list[Replay],
               held_out: list[HeldOut]) -> Regenerated:  # fmt: skip
    """Every image the check compares, from one model; ``to_images`` maps the sampler's latents to
    images (B, 3, H, W) in [0, 1]."""
    def replayed(r: Replay) -> torch.Tensor | None:
        if r.seed is not None:
            return to_images(sampler.generate(r.prompt, [r.seed], r.shape))[0]
        return None if r.noise is None else to_images(sampler.generate_from_noise(r.prompt, r.noise[None]))[0]

    targets = [replayed(r) for r in replays]
    others = [image for h in held_out for image in to_images(sampler.generate(h.prompt, h.seeds, h.shape))]
    return Regenerated(targets, others)


def paired(replays: list[Replay], held_out: list[HeldOut], base: Regenerated,
           unlearned: Regenerated) -> tuple[list[TargetImages], list[PreservePair]]:  # fmt: skip
    """The inputs of :func:`check_preservation` from the base and the unlearned model's regenerations."""
    targets = [
        TargetImages(r.id, r.image, before, after, r.seed, r.replay_problems, r.not_regenerated, r.noise_source)
        for r, before, after in zip(replays, base.targets, unlearned.targets, strict=True)
    ]
    labels = [label for h in held_out for label in h.labels]
    pairs = [PreservePair(before, after, label) for before, after, label in zip(base.held_out, unlearned.held_out, labels, strict=True)]
    return targets, pairs


@dataclass(frozen=True)
class TargetImages:
    """One target and its regenerations from the target's own seed and settings.

    ``base`` and ``unlearned`` are None when the target could not be regenerated
    (``not_regenerated`` says why); ``replay_problems`` are what the recorded provenance tells
    about why a replay may not be exact (reported when the base model does not reproduce it).
    """

    id: str
    image: torch.Tensor
    base: torch.Tensor | None = None
    unlearned: torch.Tensor | None = None
    seed: int | None = None
    replay_problems: tuple[str, ...] = ()
    not_regenerated: str = "the target cannot be regenerated"
    noise_source: str | None = None  # how its noise was found when it has no seed


@dataclass(frozen=True)
class PreservePair:
    """The base and the unlearned model's outputs for one held-out seed; ``labels`` go into its report row."""

    base: torch.Tensor
    unlearned: torch.Tensor
    labels: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Thresholds:
    forget_below: float  # copy similarity of the unlearned regeneration to the target
    integrity_at_least: float  # mean SSIM between base and unlearned outputs on held-out seeds
    same_output_ssim: float = SAME_OUTPUT_SSIM  # the base model's regeneration counts as the target

    def as_dict(self) -> dict:
        return {"forget_copy_similarity_below": self.forget_below, "reproduction_ssim_at_least": self.same_output_ssim,
                "integrity_ssim_at_least": self.integrity_at_least}  # fmt: skip


@dataclass
class Evaluation:
    """The check's figures in the shape the benchmarks and the demo report keep (no per-row detail)."""

    target_copy_similarity: list[float]
    target_ssim: list[float]
    forgotten: list[bool | None]
    integrity_ssim: float
    integrity_psnr: float
    integrity_lpips: float | str
    feature_distance: float | None = None
    details: dict = field(default_factory=dict)


@dataclass
class PreserveReport:
    """The check's result: what was measured, one row per target and per held-out pair, the summary."""

    measure: dict
    targets: list[dict]
    preserve: list[dict]
    summary: dict

    @property
    def passed(self) -> bool:
        return self.summary["passed"]

    def as_dict(self) -> dict:
        """The verdict first (the summary), then the rows, then what each figure measures."""
        return {"summary": self.summary, "targets": self.targets, "preserve": self.preserve, "measure": self.measure}

    @property
    def evaluation(self) -> Evaluation:
        regenerated = [row for row in self.targets if "copy_similarity_unlearned_to_target" in row]
        return Evaluation(
            target_copy_similarity=[row["copy_similarity_unlearned_to_target"] for row in regenerated],
            target_ssim=[row["ssim_unlearned_to_target"] for row in regenerated],
            forgotten=[row["forgotten"] for row in self.targets],
            integrity_ssim=self.summary["mean_preserve_ssim"],
            integrity_psnr=self.summary["mean_preserve_psnr"],
            integrity_lpips=self.summary["mean_preserve_lpips"],
            feature_distance=self.summary["feature_distance"],
        )


def check_preservation(
    targets: list[TargetImages],
    preserve: list[PreservePair],
    detector: CopyDetector,
    thresholds: Thresholds,
    lpips_model=None,
    semantic: CopyDetector | None = None,
) -> PreserveReport:
    """Judge forgetting on ``targets`` and integrity on ``preserve`` (see the module docstring).

    ``lpips_model`` is a model from :func:`~unlearn_core.verify.metrics.load_lpips` (or its
    :class:`~unlearn_core.verify.metrics.Unavailable`); ``semantic`` adds a column of cosine
    similarities in another embedding (e.g. CLIP vision), named after it, that no verdict uses.
    """
    if not targets:
        raise InputError("the preserve check has no targets: mark and unlearn at least one output first")
    if not preserve:
        raise InputError("the preserve check has no held-out outputs: give at least one preserve seed")
    target_rows = [_target_row(target, detector, thresholds, semantic) for target in targets]
    preserve_rows, base_features, unlearned_features = _preserve_rows(preserve, detector, lpips_model, semantic)
    judged = [row["forgotten"] for row in target_rows if row["forgotten"] is not None]
    unverified = [row for row in target_rows if row["forgotten"] is None]
    mean_ssim = statistics.fmean(row["ssim"] for row in preserve_rows)
    if lpips_model is None or isinstance(lpips_model, Unavailable):
        mean_lpips: float | str = getattr(lpips_model, "reason", "LPIPS not requested")
    else:
        mean_lpips = statistics.fmean(row["lpips"] for row in preserve_rows)
    summary = {
        "forgotten": f"{sum(judged)}/{len(target_rows)}",
        "cannot_verify": len(unverified),
        # a target that cannot be verified is never counted as forgotten
        "forgetting_passed": bool(judged) and all(judged) and not unverified,
        "mean_preserve_ssim": mean_ssim,
        "mean_preserve_psnr": statistics.fmean(row["psnr"] for row in preserve_rows),
        "mean_preserve_lpips": mean_lpips,
        "feature_distance": frechet_distance(base_features, unlearned_features),
        "integrity_passed": mean_ssim >= thresholds.integrity_at_least,
        "thresholds": thresholds.as_dict(),
    }
    passed = summary["forgetting_passed"] and summary["integrity_passed"]
    # the verdict in words leads, then the figures it rests on
    summary = {"verdict": _verdict_text(summary, target_rows, detector.name), "passed": passed, **summary}
    measure = {
        "forgetting": f"copy similarity ({detector.name}) of the unlearned model's regeneration to the target",
        "reproduction": "SSIM of the base model's regeneration to the target",
        "integrity": "SSIM, PSNR and LPIPS between base and unlearned outputs on held-out seeds; Fréchet distance "
        f"of their {detector.name} features",
    }
    return PreserveReport(measure, target_rows, preserve_rows, summary)


def evaluate(
    base_targets: torch.Tensor,
    unlearned_targets: torch.Tensor,
    base_others: torch.Tensor,
    unlearned_others: torch.Tensor,
    detector: CopyDetector,
    forget_threshold: float,
    lpips_model=None,
) -> Evaluation:
    """:func:`check_preservation` on batches in model space [-1, 1], for callers that generate
    in-process: each base target *is* the base model's output for its seed, so it reproduces by
    construction. Returns the figures only; the integrity verdict is the caller's."""
    targets = [TargetImages(str(index), to_unit(target), base=to_unit(target), unlearned=to_unit(unlearned))
               for index, (target, unlearned) in enumerate(zip(base_targets, unlearned_targets, strict=True))]  # fmt: skip
    preserve = [PreservePair(to_unit(base), to_unit(unlearned), {"index": index})
                for index, (base, unlearned) in enumerate(zip(base_others, unlearned_others, strict=True))]  # fmt: skip
    return check_preservation(targets, preserve, detector, Thresholds(forget_threshold, 0.0), lpips_model).evaluation


def _target_row(target: TargetImages, detector: CopyDetector, thresholds: Thresholds, semantic) -> dict:
    row = {"target": target.id, "seed": target.seed, "measure": detector.name}
    if target.noise_source is not None:
        row["noise"] = target.noise_source
    if target.base is None or target.unlearned is None:
        return {**row, "reproduced": False, "forgotten": None, "note": f"cannot verify forgetting: {target.not_regenerated}"}
    reference = target.image.float().unsqueeze(0)
    base, unlearned = at_size(target.base, reference), at_size(target.unlearned, reference)
    reproduction = float(ssim(base, reference))
    similarity = float(copy_similarity(detector, unlearned, reference))
    verdict = judge_forgetting(reproduction, similarity, thresholds.forget_below, thresholds.same_output_ssim,
                               list(target.replay_problems))  # fmt: skip
    row.update({
        "copy_similarity_unlearned_to_target": similarity,
        "copy_similarity_base_to_target": float(copy_similarity(detector, base, reference)),
        "ssim_unlearned_to_target": float(ssim(unlearned, reference)),
        "ssim_base_to_target": reproduction,
        "reproduced": verdict.reproduced,
        "forgotten": verdict.forgotten,
        "note": verdict.reason,
    })  # fmt: skip
    if semantic is not None:
        row[f"{semantic.name}_unlearned_to_target"] = float(copy_similarity(semantic, unlearned, reference))
    return row


def _preserve_rows(preserve: list[PreservePair], detector, lpips_model, semantic):
    """Rows in the given order; metrics run batched over the pairs of each size."""
    by_size: dict[tuple, list[int]] = defaultdict(list)
    for index, pair in enumerate(preserve):
        if pair.base.shape != pair.unlearned.shape:
            raise InputError(f"held-out pair {index}: base {tuple(pair.base.shape)} and unlearned "
                             f"{tuple(pair.unlearned.shape)} outputs differ in size; generate both at one size")  # fmt: skip
        by_size[tuple(pair.base.shape)].append(index)
    rows: list[dict] = [{} for _ in preserve]
    base_features, unlearned_features = [], []
    for indices in by_size.values():
        base = torch.stack([preserve[i].base.float() for i in indices])
        unlearned = torch.stack([preserve[i].unlearned.float() for i in indices])
        columns = {"ssim": ssim(base, unlearned).tolist(), "psnr": psnr(base, unlearned).tolist()}
        usable_lpips = lpips_model is not None and not isinstance(lpips_model, Unavailable)
        columns["lpips"] = lpips_distance(lpips_model, base, unlearned).tolist() if usable_lpips else [None] * len(indices)
        if semantic is not None:
            columns[semantic.name] = copy_similarity(semantic, base, unlearned).tolist()
        for position, index in enumerate(indices):
            rows[index] = {**preserve[index].labels, **{name: values[position] for name, values in columns.items()}}
        base_features.append(detector.embed(base))
        unlearned_features.append(detector.embed(unlearned))
    return rows, torch.cat(base_features), torch.cat(unlearned_features)


def _verdict_text(summary: dict, target_rows: list[dict], measure: str) -> str:
    """One line a user reads first: forgetting (or why it cannot be told), then integrity."""
    if summary["cannot_verify"]:
        first = next(row["note"] for row in target_rows if row["forgotten"] is None)
        forgetting = f"{summary['cannot_verify']} of {len(target_rows)} target(s): {first}"
    else:
        forgetting = f"forgotten: {summary['forgotten']} (copy similarity, {measure})"
    integrity = "integrity passed" if summary["integrity_passed"] else "integrity failed"
    return f"{forgetting}; {integrity} (mean preserve SSIM {summary['mean_preserve_ssim']:.3f})"
