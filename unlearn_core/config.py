"""The unlearning configuration: every knob, its default, its meaning, and its validation.

Node widgets and CLI flags map one-to-one onto these fields. Validation names the field and
what to change, and runs when the config is built, before any model is touched.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field, fields

from .errors import InputError
from .objectives import OBJECTIVES, EraseDiff
from .surgery import BALANCE_MODES, SURGERY_MODES
from .weighting import FORGET_SPACES, REMEMBER_WEIGHTS, WEIGHTINGS, LossWeights, make_weighting

__all__ = ["UnlearnConfig", "DTYPES", "ADAPTERS"]

DTYPES = ("float32", "bfloat16", "float16")
ADAPTERS = ("lora", "full")


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass
class UnlearnConfig:
    method: str = _help(
        "surrogate (ours), or a baseline for comparison: neggrad, erasediff, siss", default="surrogate"
    )
    steps: int = _help("optimizer steps; the paper used 100 for SD3 (LoRA)", default=100)
    learning_rate: float = _help("AdamW learning rate", default=1e-4)
    adapter: str = _help("lora (a small file, base untouched) or full (fine-tune a copy)", default="lora")
    lora_rank: int = _help("LoRA rank r", default=8)
    lora_alpha: float | None = _help("LoRA alpha; scale = alpha / rank. None means alpha = rank", default=None)
    target_modules: tuple[str, ...] | None = _help(
        "module name suffixes that get a LoRA; None uses the backend's default set", default=None
    )
    forget_batch_size: int = _help("forget samples (noise draws of the targets) per step", default=4)
    remember_batch_size: int = _help("remember samples per step", default=4)
    weighting: str = _help("lambda(t) schedule: power (t^gamma) or constant", default="power")
    gamma: float = _help("exponent of the power schedule; larger forgets only at high noise and keeps more of the "
                         "rest, but can forget less (README: the weighting exponent)", default=1.0)  # fmt: skip
    constant_lambda: float = _help("lambda for the constant schedule", default=0.5)
    forget_space: str = _help("where lambda(t) weights the forget loss: x0 (lambda is its effective weight over t, "
                              "rising with noise) or native (lambda times the eps/v weight, which peaks at low noise)",
                              default="x0")  # fmt: skip
    remember_weight: str = _help("weight of the remember loss: full (at every t) or complement (1 - lambda(t))",
                                 default="full")  # fmt: skip
    balance: str = _help("bound the forget gradient relative to the remember gradient before surgery: scale "
                         "(to balance_ratio times its norm every step), cap (only when larger) or none; "
                         "beyond the paper, after SISS's normalised forget gradient", default="none")  # fmt: skip
    balance_ratio: float = _help("rho: the forget gradient's norm as a multiple of the remember gradient's",
                                 default=0.5)  # fmt: skip
    surgery: str = _help("gradient surgery: project_forget (ours), none, pcgrad_both", default="project_forget")
    seed: int = _help("seed for every random draw of training", default=0)
    grad_clip: float | None = _help("clip the update's global norm to this; None disables", default=1.0)
    dtype: str = _help("compute dtype: float32, bfloat16 or float16 (autocast)", default="float32")
    gradient_checkpointing: bool = _help("trade compute for memory on large models", default=False)
    erasediff_eta: float = _help("EraseDiff baseline: eta of the first-order update", default=1.0)
    erasediff_noise: str = _help("EraseDiff baseline: the unrelated target noise, gaussian or uniform (its paper)",
                                 default="gaussian")  # fmt: skip
    siss_scale: float = _help("SISS baseline: forget-gradient norm relative to the keep gradient", default=0.5)

    def __post_init__(self):
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        self._choice("method", OBJECTIVES)
        self._choice("adapter", ADAPTERS)
        self._choice("weighting", WEIGHTINGS)
        self._choice("surgery", SURGERY_MODES)
        self._choice("forget_space", FORGET_SPACES)
        self._choice("remember_weight", REMEMBER_WEIGHTS)
        self._choice("balance", BALANCE_MODES)
        self._choice("erasediff_noise", EraseDiff.NOISES)
        self._choice("dtype", DTYPES)
        self._whole("steps", 1, 1_000_000, "zero steps would train nothing")
        self._whole("lora_rank", 1, 1024, "")
        self._whole("forget_batch_size", 1, 4096, "")
        self._whole("remember_batch_size", 1, 4096, "")
        if not (math.isfinite(self.learning_rate) and 0 < self.learning_rate <= 0.1):
            raise InputError(
                f"learning_rate={self.learning_rate} is outside (0, 0.1]; LoRA unlearning uses about "
                "1e-5 to 1e-3"
            )
        if self.lora_alpha is not None and not (math.isfinite(self.lora_alpha) and self.lora_alpha > 0):
            raise InputError(f"lora_alpha={self.lora_alpha} must be positive (or None for alpha = rank)")
        if not (math.isfinite(self.gamma) and 0 <= self.gamma <= 20):
            raise InputError(f"gamma={self.gamma} must lie in [0, 20]; 1 to 4 is the useful range")
        if not (math.isfinite(self.balance_ratio) and 0 < self.balance_ratio <= 100):
            raise InputError(f"balance_ratio={self.balance_ratio} must lie in (0, 100]; 0.1 to 1 is the useful range")
        if not (math.isfinite(self.erasediff_eta) and self.erasediff_eta >= 0):
            raise InputError(f"erasediff_eta={self.erasediff_eta} must be a finite number >= 0")
        if not (math.isfinite(self.siss_scale) and self.siss_scale > 0):
            raise InputError(f"siss_scale={self.siss_scale} must be positive")
        if not 0 <= self.constant_lambda <= 1:
            raise InputError(f"constant_lambda={self.constant_lambda} must lie in [0, 1]")
        if self.grad_clip is not None and not (math.isfinite(self.grad_clip) and self.grad_clip > 0):
            raise InputError(f"grad_clip={self.grad_clip} must be positive, or None to disable clipping")
        if self.target_modules is not None and not self.target_modules:
            raise InputError("target_modules is empty; give module names or None for the default set")

    def _choice(self, name: str, allowed: tuple[str, ...]) -> None:
        value = getattr(self, name)
        if value not in allowed:
            raise InputError(f"{name}={value!r} is not one of: {', '.join(allowed)}")

    def _whole(self, name: str, low: int, high: int, why: str) -> None:
        value = getattr(self, name)
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            hint = f" ({why})" if why else ""
            raise InputError(f"{name}={value!r} must be a whole number in [{low}, {high}]{hint}")

    @property
    def effective_alpha(self) -> float:
        return float(self.lora_rank if self.lora_alpha is None else self.lora_alpha)

    def make_weighting(self):
        return make_weighting(self.weighting, gamma=self.gamma, constant=self.constant_lambda)

    def loss_weights(self) -> LossWeights:
        return LossWeights(self.make_weighting(), self.forget_space, self.remember_weight)

    def to_dict(self) -> dict:
        values = asdict(self)
        if values["target_modules"] is not None:
            values["target_modules"] = list(values["target_modules"])
        return values

    @classmethod
    def from_dict(cls, values: dict) -> UnlearnConfig:
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise InputError(f"unknown config keys: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        return cls(**values)

    @classmethod
    def help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}
