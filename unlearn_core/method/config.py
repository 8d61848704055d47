"""The unlearning configuration: every knob, its default, its meaning, and its validation.

Each field carries one row of the options table (:class:`Option`): its help text, the values it
accepts (choices, or bounds) and the increments an input offers. Validation is that table, and
the ComfyUI node builds its inputs from the same rows, so a default, a bound or a choice is
written once, here. Validation names the field and what to change, and runs when the config is
built, before any model is touched.
"""

from __future__ import annotations

import functools
import importlib.util
import logging
import math
from dataclasses import asdict, dataclass, field, fields

from ..errors import InputError
from .objectives import OBJECTIVES, EraseDiff
from .surgery import BALANCE_MODES, SURGERY_MODES
from .weighting import FORGET_SPACES, REMEMBER_WEIGHTS, WEIGHTINGS, LossWeights, make_weighting

__all__ = ["UnlearnConfig", "Option", "options", "DTYPES", "ADAPTERS", "FORGET_NOISES", "OPTIMIZERS", "RATE_SCHEDULES",
           "REMEMBER_TARGETS"]  # fmt: skip

log = logging.getLogger(__name__)

DTYPES = ("auto", "float32", "bfloat16", "float16")
OPTIMIZERS = ("adamw", "adamw_8bit")
FORGET_NOISES = ("own", "fresh")
ADAPTERS = ("lora", "full")
RATE_SCHEDULES = ("fixed", "raise")
REMEMBER_TARGETS = ("data", "base")


#: options only ours (method "surrogate") reads; the baselines keep their published losses
OURS_ONLY = ("weighting", "gamma", "constant_lambda", "forget_space", "remember_weight", "balance", "balance_ratio",
             "surgery", "forget_noise", "own_noise_spread", "repair_when_forgotten")  # fmt: skip
NO_BITSANDBYTES = ("optimizer adamw_8bit needs bitsandbytes: pip install bitsandbytes (or the pack's lowmem extra), "
                   "or choose optimizer adamw")  # fmt: skip


@dataclass(frozen=True)
class Option:
    """What one config field means and accepts.

    ``kind`` is "choice" (one of ``choices``), "int" or "float" (within ``low``..``high``; with
    ``low_open`` the low end itself is refused; no ``high`` means no upper bound), "bool" or
    "names" (module names, None for the default set). ``optional`` fields also take None, which
    does what ``none_means`` says. ``step`` and ``round`` are the increments an input widget
    offers; ``hint`` (what to choose) is added to a refusal.
    """

    name: str
    kind: str
    help: str
    default: object
    optional: bool = False
    choices: tuple[str, ...] = ()
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    step: float | None = None
    round: float | None = None
    hint: str = ""
    none_means: str = ""

    def accepts(self, value) -> bool:
        if value is None:
            return self.optional
        if self.kind == "choice":
            return isinstance(value, str) and value in self.choices
        if self.kind == "bool":
            return isinstance(value, bool)
        if self.kind == "names":
            return isinstance(value, tuple) and bool(value) and all(isinstance(v, str) and v.strip() for v in value)
        if isinstance(value, bool) or not isinstance(value, int if self.kind == "int" else (int, float)):
            return False
        if not math.isfinite(value) or value < self.low or (self.low_open and value == self.low):
            return False
        return self.high is None or value <= self.high

    def check(self, value) -> None:
        """Raise the :class:`InputError` that says what is wrong and what to give instead."""
        if not self.accepts(value):
            raise InputError(self.refusal(value))

    def refusal(self, value) -> str:
        if self.kind == "choice":
            return f"{self.name}={value!r} is not one of: {', '.join(self.choices)}"
        if self.kind == "bool":
            return f"{self.name}={value!r} must be true or false"
        if self.kind == "names":
            if isinstance(value, tuple) and not value:
                return f"{self.name} is empty; give module names or None for the default set"
            return f"{self.name}={value!r} must be module name suffixes (non-empty strings), or None for the default set"
        text = f"{self.name}={value!r} {self.requirement()}"
        if self.optional:
            text += f", or None {self.none_means}"
        return f"{text}; {self.hint}" if self.hint else text

    def requirement(self) -> str:
        if self.kind == "int":
            return f"must be a whole number in [{self.low}, {self.high}]"
        if self.high is None:
            return "must be positive" if self.low == 0 and self.low_open else f"must be a finite number >= {self.low:g}"
        return f"must lie in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}]"


def _help(text: str, *, default, **option):
    """A config field with its help text and its row of the options table (see :class:`Option`)."""
    return field(metadata={"help": text, "option": option}, default=default)


_KINDS = {"int": "int", "float": "float", "str": "choice", "bool": "bool", "tuple[str, ...]": "names"}


@dataclass
class UnlearnConfig:
    method: str = _help("surrogate (ours), or a baseline for comparison: neggrad, erasediff, siss",
                        choices=OBJECTIVES, default="surrogate")  # fmt: skip
    steps: int = _help("optimizer steps; with stop_when_forgotten the most it may take (the paper used 100 for SD3)",
                       low=1, high=1_000_000, hint="zero steps would train nothing", default=200)  # fmt: skip
    learning_rate: float = _help("AdamW learning rate", low=0, low_open=True, high=0.1, step=1e-5, round=1e-7,
                                 hint="LoRA unlearning uses about 1e-4 to 1e-2", default=1e-3)  # fmt: skip
    stop_when_forgotten: bool = _help("verified stopping: every check_every steps regenerate each target from its "
                                      "own and nearby noises and stop once every one is forgotten with check_margin "
                                      "at check_confirmations checks in a row (needs a forgetting check; docs/LIBRARY.md: verified stopping)",
                                      default=True)  # fmt: skip
    check_every: int = _help("steps between two forgetting checks", low=1, high=100_000, default=10)
    check_confirmations: int = _help("checks in a row at which every target must be forgotten before training stops "
                                     "(with repair_when_forgotten, the steps after the first are repair steps)",
                                     low=1, high=100, default=3)  # fmt: skip
    repair_when_forgotten: bool = _help("ours: once a check finds every target forgotten, train only the remember half "
                                        "until the next check, so the confirmation also asks that the forgetting "
                                        "survives the pull back towards the other outputs, and what the forget push "
                                        "moved elsewhere is repaired; forget training resumes if a target returns",
                                        default=True)  # fmt: skip
    check_margin: float = _help("how far below the copy threshold every probe must score to count as forgotten",
                                low=0, high=0.5, step=0.01, default=0.05)  # fmt: skip
    check_nearby: int = _help("nearby noises per target the check also regenerates (slerped 0.05 to 0.2 from its own)",
                              low=0, high=8, default=2)  # fmt: skip
    rate_schedule: str = _help("fixed learning rate, or raise it by raise_factor each time raise_after steps went "
                               "by with a target still produced (needs the forgetting check)",
                               choices=RATE_SCHEDULES, default="fixed")  # fmt: skip
    raise_after: int = _help("step budget before the rate is raised for a target that is still produced",
                             low=1, high=100_000, default=20)  # fmt: skip
    raise_factor: float = _help("how much each raise multiplies the learning rate (capped at 0.1)",
                                low=1, high=10, step=0.5, default=2.0)  # fmt: skip
    adapter: str = _help("lora (a small file, base untouched) or full (fine-tune a copy)",
                         choices=ADAPTERS, default="lora")  # fmt: skip
    lora_rank: int = _help("LoRA rank r", low=1, high=1024, default=8)
    lora_alpha: float | None = _help("LoRA alpha; scale = alpha / rank. None means alpha = rank",
                                     low=0, low_open=True, step=0.5, none_means="for alpha = rank", default=None)  # fmt: skip
    target_modules: tuple[str, ...] | None = _help(
        "module name suffixes that get a LoRA; None uses the backend's default set", default=None
    )
    forget_batch_size: int = _help("forget samples (noise draws of the targets) per step",
                                   low=1, high=4096, default=4)  # fmt: skip
    remember_batch_size: int = _help("remember samples per step", low=1, high=4096, default=16)
    weighting: str = _help("lambda(t) schedule: power (t^gamma) or constant",
                           choices=WEIGHTINGS, default="power")  # fmt: skip
    gamma: float = _help("exponent of the power schedule; larger forgets only at high noise and keeps more of the "
                         "rest, but can forget less (docs/LIBRARY.md: the method's options)",
                         low=0, high=20, step=0.1, hint="1 to 4 is the useful range", default=1.0)  # fmt: skip
    constant_lambda: float = _help("lambda for the constant schedule", low=0, high=1, step=0.05, default=0.5)
    forget_space: str = _help("where lambda(t) weights the forget loss: x0 (lambda is its effective weight over t, "
                              "rising with noise), min_snr (x0 times min(SNR, 1): no pull on pure-noise inputs, "
                              "acts at middle noise) or native (lambda times the eps/v "
                              "weight, which peaks at low noise)",
                              choices=FORGET_SPACES, default="min_snr")  # fmt: skip
    remember_target: str = _help("what the remember loss pulls towards: data (the remember samples) or base (the "
                                 "frozen base model's own prediction at the same noisy input: zero at the start, it "
                                 "penalises any drift of other outputs; one more forward pass without gradients)",
                                 choices=REMEMBER_TARGETS, default="base")  # fmt: skip
    remember_weight: str = _help("weight of the remember loss: full (at every t) or complement (1 - lambda(t))",
                                 choices=REMEMBER_WEIGHTS, default="full")  # fmt: skip
    balance: str = _help("bound the forget gradient relative to the remember gradient before surgery: scale "
                         "(to balance_ratio times its norm every step), cap (only when larger) or none; "
                         "beyond the paper, after SISS's normalised forget gradient",
                         choices=BALANCE_MODES, default="none")  # fmt: skip
    balance_ratio: float = _help("rho: the forget gradient's norm as a multiple of the remember gradient's",
                                 low=0, low_open=True, high=100, step=0.05, hint="0.1 to 1 is the useful range", default=0.5)  # fmt: skip
    forget_noise: str = _help("noise of ours' forget draws: own (the noise each target was sampled from, slerped "
                              "towards fresh noise by up to own_noise_spread: the target's own sampling path; "
                              "fresh where a target's noise is unknown) or fresh (any noise, as the paper)",
                              choices=FORGET_NOISES, default="own")  # fmt: skip
    own_noise_spread: float = _help("how far own forget draws stray from the target's noise: the largest slerp "
                                    "weight towards fresh noise (0 = exactly its noise, 1 = anywhere)",
                                    low=0, high=1, step=0.05, default=0.3)  # fmt: skip
    surgery: str = _help("gradient surgery: project_forget (ours), none, pcgrad_both",
                         choices=SURGERY_MODES, default="project_forget")  # fmt: skip
    seed: int = _help("seed for every random draw of training", low=0, high=2**64 - 1, default=0)
    grad_clip: float | None = _help("clip the update's global norm to this; None disables",
                                    low=0, low_open=True, step=0.1, none_means="to disable clipping", default=1.0)  # fmt: skip
    dtype: str = _help("compute dtype (autocast): auto (bfloat16 on a CUDA GPU that has it, else float32), "
                       "float32, bfloat16 or float16", choices=DTYPES, default="auto")  # fmt: skip
    optimizer: str = _help("adamw, or adamw_8bit (bitsandbytes' 8-bit AdamW: its state in a quarter of the memory; "
                           "needs pip install bitsandbytes)", choices=OPTIMIZERS, default="adamw")  # fmt: skip
    gradient_checkpointing: bool = _help("trade compute for memory on large models", default=False)
    erasediff_eta: float = _help("EraseDiff baseline: eta of the first-order update", low=0, step=0.1, default=1.0)
    erasediff_noise: str = _help("EraseDiff baseline: the unrelated target noise, gaussian or uniform (its paper)",
                                 choices=EraseDiff.NOISES, default="gaussian")  # fmt: skip
    siss_scale: float = _help("SISS baseline: forget-gradient norm relative to the keep gradient",
                              low=0, low_open=True, step=0.05, default=0.5)  # fmt: skip

    def __post_init__(self):
        if self.target_modules is not None:
            self.target_modules = tuple(self.target_modules)
        for option in options().values():
            option.check(getattr(self, option.name))
        if self.rate_schedule == "raise" and not self.stop_when_forgotten:
            raise InputError("rate_schedule='raise' raises the rate on the forgetting check's verdicts, which run with "
                             "stop_when_forgotten: turn it on, or choose rate_schedule='fixed'")  # fmt: skip
        if self.remember_target == "base" and self.balance != "none" and self.method == "surrogate":
            raise InputError(f"balance={self.balance!r} bounds the forget gradient by the remember gradient's norm, which "
                             "remember_target='base' makes zero at the start (nothing has drifted yet), so nothing would "
                             "be forgotten: choose balance='none' with it, or remember_target='data'")  # fmt: skip
        if self.remember_target == "base" and self.method != "surrogate":
            log.warning("remember_target='base' is an option of ours (method 'surrogate'); the %s baseline keeps its "
                        "published remember loss on the data", self.method)  # fmt: skip
        if self.optimizer == "adamw_8bit" and importlib.util.find_spec("bitsandbytes") is None:
            raise InputError(NO_BITSANDBYTES)  # here, before a remember set is generated or a model loaded
        for name, reason in self.ignored().items():
            log.warning("%s=%r is ignored: %s", name, getattr(self, name), reason)

    def surrogate_below(self, forget_below: float) -> float:
        """The copy similarity a surrogate must stay under. Training pulls the target's output
        towards its surrogate, so a surrogate that the forgetting check would not call forgotten
        (within ``check_margin`` of the threshold) leaves a target the check can never confirm as
        gone: it trains every step. Without the check the threshold itself is the bar."""
        return forget_below - self.check_margin if self.stop_when_forgotten else forget_below

    def ignored(self) -> dict[str, str]:
        """Fields set away from their defaults that this combination never reads, each with the
        field that makes it so (one reason per field: the first rule that applies)."""
        rules = [
            (self.method != "surrogate", OURS_ONLY, f"an option of ours (method='surrogate'), and method={self.method!r}"),
            (self.method != "erasediff", ("erasediff_eta", "erasediff_noise"), f"EraseDiff's, and method={self.method!r}"),
            (self.method != "siss", ("siss_scale",), f"SISS's, and method={self.method!r}"),
            (self.adapter == "full", ("lora_rank", "lora_alpha", "target_modules"), "adapter='full' trains every weight"),
            (self.balance == "none", ("balance_ratio",), "balance='none' does not bound the forget gradient"),
            (self.weighting == "power", ("constant_lambda",), "weighting='power' uses gamma"),
            (self.weighting == "constant", ("gamma",), "weighting='constant' uses constant_lambda"),
            (self.forget_noise == "fresh", ("own_noise_spread",), "forget_noise='fresh' draws any noise"),
            (not self.stop_when_forgotten, ("check_every", "check_confirmations", "check_margin", "check_nearby",
                                            "repair_when_forgotten"), "stop_when_forgotten is off: nothing is checked"),
            (self.rate_schedule == "fixed", ("raise_after", "raise_factor"), "rate_schedule='fixed' never raises the rate"),
        ]  # fmt: skip
        defaults = {name: option.default for name, option in options().items()}
        found: dict[str, str] = {}
        for applies, names, reason in rules:
            for name in names:
                if applies and name not in found and getattr(self, name) != defaults[name]:
                    found[name] = reason
        return found

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


@functools.cache
def options() -> dict[str, Option]:
    """The options table: one :class:`Option` per field of :class:`UnlearnConfig`, in field order."""
    table = {}
    for f in fields(UnlearnConfig):
        # annotations are strings here (PEP 563): "float | None" is an optional float
        parts = [part.strip() for part in f.type.split("|")]
        kind = _KINDS["".join(part for part in parts if part != "None")]
        option = Option(f.name, kind, f.metadata["help"], f.default, optional="None" in parts, **f.metadata["option"])
        if (kind == "choice" and not option.choices) or (kind in ("int", "float") and option.low is None):
            raise TypeError(f"UnlearnConfig.{f.name}: a {kind} field needs {'choices' if kind == 'choice' else 'a low bound'}")
        table[f.name] = option
    return table
