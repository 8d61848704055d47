"""The unlearning loop: forget and remember gradients, their combination, guards, progress, stop.

One step (docs/METHOD.md section 5):

1. draw the step's indices, noise levels and noise (one generator, so a seed fixes the run);
2. g_f and g_r, the gradients of the forget half's and the remember half's loss. When the
   denoiser offers a ``gradient_split`` (:mod:`unlearn_core.method.split_gradients`; the diffusers LoRA
   does), both come from one forward and one backward pass over the joined batch; otherwise
   from a forward + backward pass per half. Either way the work equals one ordinary training
   step on the whole batch, but the single pass pays the network's fixed per-call cost once;
3. g = objective.combine(g_f, g_r) (gradient surgery for ours), clip, optimizer step;
4. every ``check_every`` steps, with a :class:`~unlearn_core.method.stopping.ForgettingCheck`: regenerate
   the targets and stop once every one is verifiably forgotten (``stop_when_forgotten``), raising
   the learning rate while one is not (``rate_schedule="raise"``); while some are gone and others
   not, the forget draws come from those still produced.

The trainer only sees a :class:`~unlearn_core.diffusion.denoiser.Denoiser`; attaching and removing LoRA
(and so keeping the base model untouched) is the backend's job.

Example::

    config = UnlearnConfig(steps=50, learning_rate=1e-4)
    result = train_unlearning(denoiser, RectifiedFlow(), data, config,
                              callback=lambda step, total, m: print(step, m["forget_loss"]))
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..data.sets import UnlearnData
from ..diffusion.denoiser import Denoiser, concat
from ..diffusion.process import ForwardProcess
from ..errors import InputError, TrainingDiverged, TrainingStopped
from .config import NO_BITSANDBYTES, UnlearnConfig
from .objectives import (
    SISS,
    BasePrediction,
    EraseDiff,
    HalfBatch,
    NegGrad,
    Objective,
    SurrogateUnlearning,
)
from .split_gradients import LayerGradientSplit
from .stopping import ForgettingCheck, RateRaise, StopRule

__all__ = ["train_unlearning", "make_objective", "TrainResult", "Callback"]

log = logging.getLogger(__name__)

Callback = Callable[[int, int, dict], None]


@dataclass
class TrainResult:
    """``steps`` is the number taken (fewer than the config's when verified stopping ended
    training); ``verification`` says whether it ran, each check, and per target the step since
    which it has been forgotten (see :func:`train_unlearning`)."""

    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)
    verification: dict = field(default_factory=dict)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def make_objective(config: UnlearnConfig, process: ForwardProcess, remember_base: BasePrediction | None = None) -> Objective:
    """The config's method; ``remember_base`` is the base model's prediction that ours pulls the
    remember half towards with ``remember_target="base"``."""
    sizes = (process, config.forget_batch_size, config.remember_batch_size)
    if config.method == "surrogate":
        spread = config.own_noise_spread if config.forget_noise == "own" else None
        return SurrogateUnlearning(*sizes, weights=config.loss_weights(), surgery=config.surgery, balance=config.balance,
                                   balance_ratio=config.balance_ratio, own_noise_spread=spread,
                                   remember_base=remember_base if config.remember_target == "base" else None)  # fmt: skip
    if config.method == "neggrad":
        return NegGrad(*sizes)
    if config.method == "erasediff":
        return EraseDiff(*sizes, eta=config.erasediff_eta, noise=config.erasediff_noise)
    return SISS(*sizes, scale=config.siss_scale)


def compute_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """The dtype a config's ``dtype`` computes in on ``device``: "auto" is bfloat16 on a CUDA
    GPU that supports it (the dtype SD3's weights ship in; float32 would double the activation
    memory) and float32 elsewhere (CPUs and older GPUs compute bfloat16 slowly or not at all)."""
    if dtype == "auto":
        cuda = device.type == "cuda" and torch.cuda.is_available()
        return torch.bfloat16 if cuda and torch.cuda.is_bf16_supported() else torch.float32
    return getattr(torch, dtype)


def _autocast(dtype: torch.dtype, device: torch.device):
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def make_optimizer(params: list[torch.nn.Parameter], config: UnlearnConfig) -> torch.optim.Optimizer:
    """AdamW, or bitsandbytes' 8-bit AdamW (state quantised blockwise to 8 bits: 2 bytes a parameter
    instead of 8, which matters for adapter="full"; bitsandbytes keeps small tensors in 32 bits)."""
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.learning_rate, weight_decay=0.0)
    try:
        import bitsandbytes
    except ImportError as error:
        raise InputError(NO_BITSANDBYTES) from error  # installed but broken: the config found it
    return bitsandbytes.optim.AdamW8bit(params, lr=config.learning_rate, weight_decay=0.0)


def _flat_gradient(loss: torch.Tensor, params: list[torch.nn.Parameter]) -> torch.Tensor:
    """d loss / d params as one float32 vector (so surgery is a handful of vector ops)."""
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).float() for g, p in zip(grads, params, strict=True)])


def _joinable(first: HalfBatch, second: HalfBatch) -> bool:
    """Whether the two halves can run as one batch (same sample shape and conditioning layout)."""
    if first.x_t.shape[1:] != second.x_t.shape[1:] or first.x_t.dtype != second.x_t.dtype:
        return False
    if set(first.cond) != set(second.cond):
        return False
    return all(first.cond[k].shape[1:] == second.cond[k].shape[1:] for k in first.cond)


@dataclass
class _Gradients:
    """Each half's weighted loss (what the gradient is taken of), its native error (the eps / v MSE
    the history reports as ``forget_loss`` / ``remember_loss``) and its flat gradient."""

    forget_weighted: torch.Tensor
    forget_error: float
    forget: torch.Tensor
    remember_weighted: torch.Tensor
    remember_error: float
    remember: torch.Tensor


def _gradients(
    denoiser: Denoiser,
    split: LayerGradientSplit | None,
    forget: HalfBatch,
    remember: HalfBatch,
    params: list[torch.nn.Parameter],
    autocast: Callable[[], contextlib.AbstractContextManager],
    step: int,
) -> _Gradients:
    if split is not None and _joinable(forget, remember):
        k, total = len(forget.x_t), len(forget.x_t) + len(remember.x_t)
        with autocast(), split.recording(k, total) as halves:
            x0_hat = denoiser.predict_x0(
                torch.cat([forget.x_t, remember.x_t]), torch.cat([forget.t, remember.t]),
                concat([forget.cond, remember.cond]),
            )  # fmt: skip
            forget_loss, forget_error = forget.score(x0_hat[:k])
            remember_loss, remember_error = remember.score(x0_hat[k:])
        _check_finite(step, forget_loss=forget_loss, remember_loss=remember_loss)
        forget_grad, remember_grad = split.gradients(forget_loss + remember_loss, halves)
        return _Gradients(forget_loss, forget_error, forget_grad, remember_loss, remember_error, remember_grad)
    with autocast():
        forget_loss, forget_error = forget.loss(denoiser)
    _check_finite(step, forget_loss=forget_loss)
    forget_grad = _flat_gradient(forget_loss, params)
    with autocast():
        remember_loss, remember_error = remember.loss(denoiser)
    _check_finite(step, remember_loss=remember_loss)
    remember_grad = _flat_gradient(remember_loss, params)
    return _Gradients(forget_loss, forget_error, forget_grad, remember_loss, remember_error, remember_grad)


def _check_finite(step: int, **losses: torch.Tensor) -> None:
    for name, loss in losses.items():
        if not torch.isfinite(loss):
            raise TrainingDiverged(step, name.replace("_", " "))


def _base_prediction(denoiser: Denoiser, config: UnlearnConfig, autocast) -> BasePrediction | None:
    """The frozen base model's x0 prediction, when ours pulls the remember half towards it."""
    if config.remember_target != "base" or config.method != "surrogate":
        return None
    predict = getattr(denoiser, "base_predict_x0", None)
    if predict is None:
        raise InputError("remember_target='base' needs the base model's prediction, which this model's adapter cannot "
                         "give (adapters that can be switched off can); choose remember_target='data'")  # fmt: skip

    def base(x_t, t, cond):
        with torch.no_grad(), autocast():
            return predict(x_t, t, cond).float()

    return base


class _Verification:
    """The forgetting check's part of the loop: the base model's baseline, each check's record,
    the stop rule and the rate schedule (see :mod:`unlearn_core.method.stopping`)."""

    def __init__(self, check: ForgettingCheck | None, config: UnlearnConfig, autocast):
        self.check, self.config, self.autocast = check, config, autocast
        self.record: dict = {"enabled": config.stop_when_forgotten, "checks": []}
        self.rule = self.rate = None
        self.repaired = 0  # steps that trained only the remember half
        if not config.stop_when_forgotten:
            self.record["status"] = "off: trained every step (stop_when_forgotten is false)"
            return
        if check is None:
            self.record["status"] = "unavailable: no forgetting check was given, so every step was trained"
            log.info("verified stopping is on but no forgetting check was given: training runs all %d steps", config.steps)
            return
        with autocast():
            baseline = check.baseline()
        # the marks, which a later request carries for these targets (ForgettingCheck's ``carried``)
        self.record["baseline"] = {**baseline.summary(), "counted": baseline.counted.tolist()}
        self.record["verifiable"] = check.verifiable
        self.rule = StopRule(len(check), config.check_confirmations)
        if config.rate_schedule == "raise":
            self.rate = RateRaise(config.learning_rate, config.raise_after, config.raise_factor, ceiling=0.1)
        self.seconds = 0.0
        if not all(check.verifiable):
            self.record["status"] = ("cannot verify every target (the base model does not copy it from its noise): "
                                     "trained every step")  # fmt: skip

    @property
    def still_produced(self) -> torch.Tensor | None:
        """The targets the forget draws focus on: those the last check found still produced while
        it found others gone (None: every target). A target found forgotten leaves the forget half
        until a check finds it produced again, so the push goes where it is still needed: with
        several targets (earlier requests' ones kept in the forget set, or a joint run), the one not
        yet gone gets the whole forget batch instead of a share of it."""
        produced = None if self.rule is None else self.rule.still_produced()
        return None if produced is None else torch.tensor(produced)

    @property
    def repairing(self) -> bool:
        """Every target was forgotten at the last check and ours repairs until the next confirms."""
        return (self.rule is not None and self.rule.streak > 0 and self.config.repair_when_forgotten
                and self.config.method == "surrogate")  # fmt: skip

    def after(self, step: int, optimizer: torch.optim.Optimizer) -> tuple[bool, dict]:
        """Run the check when it is due: (stop now?, metrics for the step's record)."""
        if self.rule is None or step % self.config.check_every:
            return False, {}
        started = time.perf_counter()
        with self.autocast():
            result = self.check(step)
        self.seconds += time.perf_counter() - started
        stop = self.rule.update(result)
        summary = result.summary()
        metrics = {"forgotten": float(sum(result.forgotten))}
        if self.rate is not None and not stop:
            rate = self.rate.update(result)
            if rate is not None:
                for group in optimizer.param_groups:
                    group["lr"] = rate
                summary["raised_learning_rate"] = rate
        self.record["checks"].append(summary)
        return stop, metrics

    def finish(self, steps: int, stopped: bool) -> dict:
        if self.rule is not None:
            self.record["forgotten_at"] = list(self.rule.forgotten_at)
            self.record["check_seconds"] = self.seconds
            self.record["repair_steps"] = self.repaired
            if "status" not in self.record:
                repaired = f", {self.repaired} of them repair steps" if self.repaired else ""
                self.record["status"] = (f"verified: every target forgotten, stopped at step {steps}{repaired}" if stopped else
                                         f"not verified: a target is still produced after {steps} steps (the maximum)")  # fmt: skip
            if self.rate is not None:
                self.record["final_learning_rate"] = self.rate.rate
        self.record["stopped_early"] = stopped
        return self.record


def train_unlearning(
    denoiser: Denoiser,
    process: ForwardProcess,
    data: UnlearnData,
    config: UnlearnConfig,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    check: ForgettingCheck | None = None,
) -> TrainResult:
    """Train the denoiser's trainable parameters to forget ``data.forget`` and keep ``data.remember``.

    With ``config.stop_when_forgotten`` and a ``check`` (regenerating ``data.forget``'s targets
    with this denoiser), training ends once every target is verified forgotten, else after
    ``config.steps``; without a check every step is trained and the result says so.

    Raises :class:`TrainingStopped` when ``should_stop()`` turns true and
    :class:`TrainingDiverged` on a non-finite loss or gradient; in both cases the trainable
    parameters are left as they were at the failing step and the caller discards them.
    """
    params = [p for p in denoiser.trainable_parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters: attach a LoRA (or use adapter='full') first")
    if check is not None and len(check) != len(data.forget):
        raise InputError(f"the forgetting check covers {len(check)} targets but the forget set has {len(data.forget)}")
    device = params[0].device
    sizes = [p.numel() for p in params]
    split = denoiser.gradient_split
    if split is not None and [id(p) for p in split.parameters()] != [id(p) for p in params]:
        raise ValueError("the denoiser's gradient_split covers other parameters than its trainable_parameters()")
    dtype = compute_dtype(config.dtype, device)

    def autocast():
        return _autocast(dtype, device)

    objective = make_objective(config, process, _base_prediction(denoiser, config, autocast))
    if config.method == "surrogate":  # the baselines do not use surrogates
        for index in data.forget.unchanged():
            log.warning("surrogate %d is identical to its target: nothing to learn from it; "
                        "raise the surrogate strength or edit the image", index)  # fmt: skip
    optimizer = make_optimizer(params, config)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    started = time.perf_counter()
    stopped = False

    with torch.inference_mode(False), torch.enable_grad():
        verification = _Verification(check, config, autocast)
        for step in range(1, config.steps + 1):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"stopped by the user before step {step} of {config.steps}; nothing was saved")
            plan = objective.plan(data, generator)
            grads = _gradients(
                denoiser, split, objective.forget_half(data, plan), objective.remember_half(data, plan), params,
                autocast, step,
            )  # fmt: skip
            update, stats = objective.combine(grads.forget, grads.remember)
            if verification.repairing:  # the forget push has done its work; only the other outputs are pulled back
                update, stats = grads.remember, {**stats, "repairing": 1.0}
                verification.repaired += 1
            norm = float(torch.linalg.vector_norm(update.double()))
            if not math.isfinite(norm):
                raise TrainingDiverged(step, "gradient")
            if config.grad_clip is not None and norm > config.grad_clip:
                update = update * (config.grad_clip / (norm + 1e-12))
            for param, grad in zip(params, update.split(sizes), strict=True):
                param.grad = grad.view_as(param).to(param.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            metrics = {  # the losses as native (eps / v) errors, comparable between methods and weightings
                "step": step,
                "forget_loss": grads.forget_error,
                "remember_loss": grads.remember_error,
                "objective": float(grads.forget_weighted.detach()) + float(grads.remember_weighted.detach()),
                "grad_norm": norm,
                "learning_rate": optimizer.param_groups[0]["lr"],
                **stats,
            }
            if not all(math.isfinite(v) for v in metrics.values()):
                raise TrainingDiverged(step, "loss")
            stopped, checked = verification.after(step, optimizer)
            if checked:  # the verdicts change only at a check
                objective.draw_from = verification.still_produced
            metrics.update(checked)
            history.append(metrics)
            if callback is not None:
                callback(step, config.steps, metrics)
            if stopped:
                break

    seconds = time.perf_counter() - started
    record = verification.finish(len(history), stopped)
    log.info("unlearning: %d steps in %.1f s (%s), final %s", len(history), seconds, record.get("status"), history[-1])
    return TrainResult(steps=len(history), seconds=seconds, history=history, verification=record)
