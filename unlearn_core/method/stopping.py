r"""Verified stopping: train until every target is verifiably gone, then stop.

A fixed (learning rate, steps) pair cannot suit every model and target: an easy target is gone
after a few steps and every step after that only costs the other outputs, a hard one needs more.
So the trainer asks a :class:`ForgettingCheck` every ``check_every`` steps whether each target is
still produced, and :class:`StopRule` ends training once the answer is *no* for every target,
with a margin, at ``check_confirmations`` checks in a row (``steps`` becomes the maximum).

The check regenerates each target the way the preserve check does, with the model as it is now
(the adapter on): from the noise the target was sampled from (its own *probe*) and from a few
nearby noises, that noise slerped by :func:`probe_weights` towards fixed fresh noise, since a
target that only moved off its exact seed would come back for a neighbouring one. Each
regeneration is judged with the copy detector (cosine of embeddings, as
:func:`~unlearn_core.verify.metrics.copy_similarity`); a target counts as forgotten when every probe on
which the *base* model makes a copy (similarity >= ``forget_below``) now scores below
``forget_below - margin``. A probe the base model already does not copy cannot show forgetting
and is left out; a target whose own probe is not a copy cannot be verified at all (its noise is
not the one that made it), and the check says so.

Staging keeps the cost low: only the own probes are regenerated until a target is forgotten on
its own probe, and the nearby ones only then, so most checks cost one regeneration per target.
:class:`RateRaise` uses the same verdicts to raise the learning rate for a target that a step
budget did not forget (start conservative, train a hard target harder).

Example::

    check = ForgettingCheck(regenerate, targets, own_noise, detector, forget_below=0.6)
    result = train_unlearning(denoiser, process, data, config, check=check)
    result.verification["forgotten_at"]   # per target: the step it was verified gone, or None
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..diffusion.denoiser import select
from ..diffusion.noise import slerp
from ..diffusion.sampling import sample
from ..errors import InputError
from ..verify.metrics import CopyDetector

__all__ = ["NEARBY_RANGE", "probe_weights", "CheckResult", "ForgettingCheck", "StopRule", "RateRaise", "Regenerate",
           "CheckSettings", "sampler_check"]

log = logging.getLogger(__name__)

#: how far the nearby probes stray from a target's own noise (slerp weights towards fresh noise)
NEARBY_RANGE = (0.05, 0.2)

#: regenerate(noise (M, *shape), target_index (M,)) -> the current model's outputs for those
#: noises under each target's conditioning, in the space the detector embeds
Regenerate = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def probe_weights(nearby: int) -> tuple[float, ...]:
    """Slerp weights of one target's probes: 0 (its own noise), then ``nearby`` weights spread
    evenly over :data:`NEARBY_RANGE`."""
    if nearby < 0:
        raise InputError(f"nearby probe count {nearby} must be >= 0")
    if nearby == 0:
        return (0.0,)
    low, high = NEARBY_RANGE
    if nearby == 1:
        return (0.0, high)
    return (0.0, *(low + (high - low) * i / (nearby - 1) for i in range(nearby)))


@dataclass
class CheckResult:
    """One check: the copy similarity of each probe's regeneration to its target.

    ``similarity`` is (N, P) with NaN for probes not regenerated at this check (staging);
    ``counted`` (N, P) marks the probes the base model copies; ``forgotten`` is per target.
    """

    step: int
    similarity: torch.Tensor
    counted: torch.Tensor
    forgotten: list[bool]
    regenerated: int

    def summary(self) -> dict:
        """The record kept in the training history (plain numbers)."""
        own = [None if torch.isnan(v) else round(float(v), 4) for v in self.similarity[:, 0]]
        worst = []
        for row, counted in zip(self.similarity, self.counted, strict=True):
            values = row[counted & ~torch.isnan(row)]
            worst.append(None if len(values) == 0 else round(float(values.max()), 4))
        return {"step": self.step, "own_similarity": own, "worst_similarity": worst,
                "forgotten": list(self.forgotten), "regenerated": self.regenerated}  # fmt: skip


class ForgettingCheck:
    """Regenerates each target from its own and nearby noises and judges it with a copy detector.

    ``targets`` (N, ...) are the outputs to forget as the detector sees them (``regenerate``'s
    output space) and ``noise`` (N, ...) the sampler noise each was made from (its input space).
    ``seed`` fixes the nearby probes' fresh noise, so every check asks the same question.

    ``carried`` (E, P) are the base-copy marks of the first E targets when they come from earlier
    requests (their results already applied, so the model at hand no longer copies them): the
    marks their own request measured on the model they came from, which decide what counts for
    them here too. The baseline then regenerates only the other targets.
    """

    def __init__(self, regenerate: Regenerate, targets: torch.Tensor, noise: torch.Tensor, detector: CopyDetector,
                 forget_below: float, margin: float = 0.05, nearby: int = 2, seed: int = 0,
                 carried: torch.Tensor | None = None):  # fmt: skip
        if len(noise) != len(targets):
            raise InputError(f"the check has {len(noise)} noises for {len(targets)} targets: give each target's own")
        if not math.isfinite(forget_below):
            raise InputError(f"forget_below={forget_below} must be a finite copy-similarity (cosine) threshold")
        if not 0 <= margin <= 1:
            raise InputError(f"margin={margin} must lie in [0, 1]")
        self.regenerate = regenerate
        self.targets = targets
        self.detector = detector
        self.forget_below = float(forget_below)
        self.margin = float(margin)
        self.weights = probe_weights(nearby)
        generator = torch.Generator().manual_seed(int(seed))
        fresh = torch.randn((len(self.weights), *noise.shape), generator=generator).to(noise)
        # probes[n, p]: target n's noise slerped by weights[p] towards fixed fresh noise
        self.probes = torch.stack([noise if w == 0 else slerp(noise, fresh[p], w) for p, w in enumerate(self.weights)], dim=1)
        self._target_features = detector.embed(targets.float())
        self.counted: torch.Tensor | None = None
        if carried is not None and (carried.dim() != 2 or len(carried) > len(targets) or carried.shape[1] != len(self.weights)):
            raise InputError(f"carried base-copy marks {tuple(carried.shape)} do not fit {len(targets)} targets with "
                             f"{len(self.weights)} probes each: check earlier targets with the check_nearby they were checked with")  # fmt: skip
        self.carried = None if carried is None else carried.bool()

    def __len__(self) -> int:
        return len(self.targets)

    @property
    def verifiable(self) -> list[bool]:
        """Per target: whether the base model copies it from its own noise (see :meth:`baseline`)."""
        if self.counted is None:
            raise RuntimeError("call baseline() before training: it says which probes the base model copies")
        return self.counted[:, 0].tolist()

    def _similarity(self, pairs: list[tuple[int, int]]) -> torch.Tensor:
        index = torch.tensor([n for n, _ in pairs])
        noise = torch.stack([self.probes[n, p] for n, p in pairs])
        with torch.no_grad():
            outputs = self.regenerate(noise, index)
        features = self.detector.embed(outputs.float())
        return torch.nn.functional.cosine_similarity(features, self._target_features[index].to(features), dim=1).cpu()

    def baseline(self) -> CheckResult:
        """Every probe on the model before training: which ones the base model copies (for
        carried targets: the marks they bring, their similarity left NaN)."""
        first = 0 if self.carried is None else len(self.carried)
        pairs = [(n, p) for n in range(first, len(self)) for p in range(len(self.weights))]
        similarity = torch.full((len(self), len(self.weights)), float("nan"))
        if pairs:
            similarity[first:] = self._similarity(pairs).reshape(len(self) - first, len(self.weights))
        self.counted = similarity >= self.forget_below
        if first:
            self.counted[:first] = self.carried
        for n in range(first, len(self)):
            if not self.counted[n, 0]:
                log.warning("target %d: the base model's regeneration from its noise is no copy of it (copy similarity "
                            "%.3f < %g), so forgetting it cannot be verified: its noise is not the one that made it",
                            n, float(similarity[n, 0]), self.forget_below)  # fmt: skip
        return CheckResult(0, similarity, self.counted.clone(), [False] * len(self), len(pairs))

    def __call__(self, step: int) -> CheckResult:
        """Own probes of the targets that can be verified, and the nearby probes of those forgotten on theirs."""
        if self.counted is None:
            raise RuntimeError("call baseline() before the first check")
        below = self.forget_below - self.margin
        similarity = torch.full((len(self), len(self.weights)), float("nan"))
        own = [(n, 0) for n in range(len(self)) if self.counted[n, 0]]
        regenerated = len(own)
        if own:
            similarity[[n for n, _ in own], 0] = self._similarity(own)
        nearby = [(n, p) for n, _ in own if similarity[n, 0] < below for p in range(1, len(self.weights)) if self.counted[n, p]]
        if nearby:
            similarity[[n for n, _ in nearby], [p for _, p in nearby]] = self._similarity(nearby)
            regenerated += len(nearby)
        forgotten = []
        for n in range(len(self)):
            counted = self.counted[n]
            values = similarity[n][counted]
            forgotten.append(bool(counted[0]) and not torch.isnan(values).any() and bool((values < below).all()))
        return CheckResult(step, similarity, self.counted.clone(), forgotten, regenerated)


@dataclass
class StopRule:
    """Stop once every target is forgotten at ``confirmations`` checks in a row (the config's
    ``check_confirmations``); remember per target the step since which it has been forgotten
    (None while it is not)."""

    targets: int
    confirmations: int
    forgotten_at: list[int | None] = field(init=False)
    streak: int = field(init=False, default=0)

    def __post_init__(self):
        self.forgotten_at = [None] * self.targets

    def update(self, result: CheckResult) -> bool:
        for n, gone in enumerate(result.forgotten):
            if not gone:
                self.forgotten_at[n] = None
            elif self.forgotten_at[n] is None:
                self.forgotten_at[n] = result.step
        self.streak = self.streak + 1 if all(result.forgotten) else 0
        return self.streak >= self.confirmations

    def still_produced(self) -> list[int] | None:
        """The targets the last check found still produced, while it found others gone; None
        before the first check, or when all or none are produced."""
        produced = [n for n, at in enumerate(self.forgotten_at) if at is None]
        return produced if 0 < len(produced) < self.targets else None


@dataclass
class RateRaise:
    """Start conservative, and multiply the learning rate by ``factor`` (up to ``ceiling``) each
    time ``budget`` steps went by since the last raise with some target still produced."""

    rate: float
    budget: int
    factor: float
    ceiling: float
    last_raise: int = 0

    def update(self, result: CheckResult) -> float | None:
        """The new learning rate, or None to keep the current one."""
        if all(result.forgotten) or result.step - self.last_raise < self.budget or self.rate >= self.ceiling:
            return None
        self.rate = min(self.rate * self.factor, self.ceiling)
        self.last_raise = result.step
        return self.rate


@dataclass(frozen=True)
class CheckSettings:
    """How a caller that samples with the core's own sampler wants targets judged: the copy
    detector and its threshold, the sampler steps and x0 clamp of each regeneration, and
    ``to_images``, which maps the sampler's outputs to what the detector embeds (identity: the
    model's own space)."""

    detector: CopyDetector
    forget_below: float
    sampler_steps: int = 20
    clip: float | None = None
    to_images: Callable[[torch.Tensor], torch.Tensor] | None = None
    #: the base-copy marks the first targets bring from earlier requests (see :class:`ForgettingCheck`)
    carried: torch.Tensor | None = None


def sampler_check(denoiser, process, forget, settings: CheckSettings, margin: float, nearby: int,
                  seed: int = 0) -> ForgettingCheck | None:  # fmt: skip
    """A :class:`ForgettingCheck` that regenerates ``forget``'s targets (a
    :class:`~unlearn_core.data.sets.ForgetTargets`) with ``denoiser`` as it is at each check, through
    :func:`~unlearn_core.diffusion.sampling.sample`; None when the targets' noise is unknown."""
    if forget.noise is None:
        return None
    to_images = settings.to_images or (lambda x: x)

    def regenerate(noise: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        cond = select(forget.cond, index)
        return to_images(sample(denoiser, process, noise.to(forget.targets), cond, settings.sampler_steps, clip=settings.clip))

    return ForgettingCheck(regenerate, to_images(forget.targets), forget.noise, settings.detector, settings.forget_below,
                           margin, nearby, seed, settings.carried)  # fmt: skip
