"""The unlearning loop: forget and remember gradients, their combination, guards, progress, stop.

One step (METHOD.md section 5):

1. draw the step's indices, noise levels and noise (one generator, so a seed fixes the run);
2. g_f and g_r, the gradients of the forget half's and the remember half's loss. When the
   denoiser offers a ``gradient_split`` (:mod:`unlearn_core.split_gradients`; the diffusers LoRA
   does), both come from one forward and one backward pass over the joined batch; otherwise
   from a forward + backward pass per half. Either way the work equals one ordinary training
   step on the whole batch, but the single pass pays the network's fixed per-call cost once;
3. g = objective.combine(g_f, g_r) (gradient surgery for ours), clip, optimizer step.

The trainer only sees a :class:`~unlearn_core.denoiser.Denoiser`; attaching and removing LoRA
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

from .config import UnlearnConfig
from .data import UnlearnData
from .denoiser import Denoiser, concat
from .errors import InputError, TrainingDiverged, TrainingStopped
from .objectives import SISS, EraseDiff, HalfBatch, NegGrad, Objective, SurrogateUnlearning
from .process import ForwardProcess
from .split_gradients import LayerGradientSplit

__all__ = ["train_unlearning", "make_objective", "TrainResult", "Callback"]

log = logging.getLogger(__name__)

Callback = Callable[[int, int, dict], None]


@dataclass
class TrainResult:
    steps: int
    seconds: float
    history: list[dict] = field(default_factory=list)

    @property
    def final(self) -> dict:
        return self.history[-1] if self.history else {}


def make_objective(config: UnlearnConfig, process: ForwardProcess) -> Objective:
    sizes = (process, config.forget_batch_size, config.remember_batch_size)
    if config.method == "surrogate":
        spread = config.own_noise_spread if config.forget_noise == "own" else None
        return SurrogateUnlearning(*sizes, weights=config.loss_weights(), surgery=config.surgery, balance=config.balance,
                                   balance_ratio=config.balance_ratio, own_noise_spread=spread)  # fmt: skip
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
        raise InputError("optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes "
                         "(or the pack's lowmem extra), or choose optimizer adamw") from error  # fmt: skip
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
    forget_loss: torch.Tensor
    forget_error: float
    forget: torch.Tensor
    remember_loss: torch.Tensor
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


def train_unlearning(
    denoiser: Denoiser,
    process: ForwardProcess,
    data: UnlearnData,
    config: UnlearnConfig,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
) -> TrainResult:
    """Train the denoiser's trainable parameters to forget ``data.forget`` and keep ``data.remember``.

    Raises :class:`TrainingStopped` when ``should_stop()`` turns true and
    :class:`TrainingDiverged` on a non-finite loss or gradient; in both cases the trainable
    parameters are left as they were at the failing step and the caller discards them.
    """
    params = [p for p in denoiser.trainable_parameters() if p.requires_grad]
    if not params:
        raise InputError("the model has no trainable parameters: attach a LoRA (or use adapter='full') first")
    device = params[0].device
    sizes = [p.numel() for p in params]
    split = denoiser.gradient_split
    if split is not None and [id(p) for p in split.parameters()] != [id(p) for p in params]:
        raise ValueError("the denoiser's gradient_split covers other parameters than its trainable_parameters()")
    objective = make_objective(config, process)
    if config.method == "surrogate":  # the baselines do not use surrogates
        for index in data.forget.unchanged():
            log.warning("surrogate %d is identical to its target: nothing to learn from it; "
                        "raise the surrogate strength or edit the image", index)  # fmt: skip
    optimizer = make_optimizer(params, config)
    dtype = compute_dtype(config.dtype, device)
    generator = torch.Generator().manual_seed(config.seed)
    history: list[dict] = []
    started = time.perf_counter()

    with torch.inference_mode(False), torch.enable_grad():
        for step in range(1, config.steps + 1):
            if should_stop is not None and should_stop():
                raise TrainingStopped(f"stopped by the user before step {step} of {config.steps}; nothing was saved")
            plan = objective.plan(data, generator)
            grads = _gradients(
                denoiser, split, objective.forget_half(data, plan), objective.remember_half(data, plan), params,
                lambda: _autocast(dtype, device), step,
            )  # fmt: skip
            update, stats = objective.combine(grads.forget, grads.remember)
            norm = float(torch.linalg.vector_norm(update.double()))
            if not math.isfinite(norm):
                raise TrainingDiverged(step, "gradient")
            if config.grad_clip is not None and norm > config.grad_clip:
                update = update * (config.grad_clip / (norm + 1e-12))
            for param, grad in zip(params, update.split(sizes), strict=True):
                param.grad = grad.view_as(param).to(param.dtype)
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

            metrics = {
                "step": step,
                "forget_loss": grads.forget_error,
                "remember_loss": grads.remember_error,
                "objective": float(grads.forget_loss.detach()) + float(grads.remember_loss.detach()),
                "grad_norm": norm,
                **stats,
            }
            if not all(math.isfinite(v) for v in metrics.values()):
                raise TrainingDiverged(step, "loss")
            history.append(metrics)
            if callback is not None:
                callback(step, config.steps, metrics)

    seconds = time.perf_counter() - started
    log.info("unlearning: %d steps in %.1f s, final %s", config.steps, seconds, history[-1])
    return TrainResult(steps=config.steps, seconds=seconds, history=history)
