"""Instance Unlearn LoRA's training inputs, built from UnlearnConfig's options table.

Each input's default, bounds, increments, choices and help come from the field's
:class:`~unlearn_core.method.config.Option`; this module only says which input sets which field
(:data:`FIELDS`, the one mapping) and how the few values a widget cannot hold are written.
Names are a contract with saved workflows: an input keeps its name even where the field's
differs ("rank" sets lora_rank).
"""

from __future__ import annotations

from comfy_api.latest import io

from ..unlearn_core.errors import InputError
from ..unlearn_core.method.config import Option, UnlearnConfig, options

#: input name -> UnlearnConfig field: the inputs of the first release (required widgets) ...
FIRST = {
    "steps": "steps",
    "learning_rate": "learning_rate",
    "rank": "lora_rank",
    "forget_batch_size": "forget_batch_size",
    "remember_batch_size": "remember_batch_size",
    "weighting": "weighting",
    "gamma": "gamma",
    "surgery": "surgery",
    "method": "method",
    "seed": "seed",
    "dtype": "dtype",
    "gradient_checkpointing": "gradient_checkpointing",
}
#: ... and those added later: optional, so that a prompt saved before them still runs (with the
#: config's defaults), and after every older widget, because workflows store widget values by position
ADDED = {
    "lora_alpha": "lora_alpha",
    "target_modules": "target_modules",
    "grad_clip": "grad_clip",
    "constant_lambda": "constant_lambda",
    "forget_space": "forget_space",
    "remember_weight": "remember_weight",
    "balance": "balance",
    "balance_ratio": "balance_ratio",
    "erasediff_eta": "erasediff_eta",
    "erasediff_noise": "erasediff_noise",
    "siss_scale": "siss_scale",
    "forget_noise": "forget_noise",
    "own_noise_spread": "own_noise_spread",
    "optimizer": "optimizer",
    "stop_when_forgotten": "stop_when_forgotten",
    "check_every": "check_every",
    "check_margin": "check_margin",
    "check_nearby": "check_nearby",
    "rate_schedule": "rate_schedule",
    "raise_after": "raise_after",
    "raise_factor": "raise_factor",
    "remember_target": "remember_target",
    "repair_when_forgotten": "repair_when_forgotten",
    "check_confirmations": "check_confirmations",
}
FIELDS = {**FIRST, **ADDED}

#: UnlearnConfig fields the node deliberately has no input for, and why.
WITHOUT_INPUT = {
    "adapter": "the node always trains a LoRA on a clone of the loaded model: a full fine-tune would copy the "
    "network and could not be saved as a LoRA file for the stock loaders",
}

#: an optional number field's widget value that stands for None (a widget cannot hold None)
NONE_AS = 0.0


def input_for(name: str, optional: bool = False):
    """The widget input ``name`` (a key of :data:`FIELDS`), from its field's option."""
    option = options()[FIELDS[name]]
    common = {"optional": optional, "tooltip": tooltip(option)}
    if option.kind == "choice":
        return io.Combo.Input(name, options=list(option.choices), default=option.default, **common)
    if option.kind == "bool":
        return io.Boolean.Input(name, default=option.default, **common)
    if option.kind == "names":
        return io.String.Input(name, default=",".join(option.default or ()), **common)
    default = NONE_AS if option.default is None else option.default
    if option.kind == "int":
        return io.Int.Input(name, default=default, min=option.low, max=option.high, step=option.step, **common)
    return io.Float.Input(name, default=default, min=option.low, max=option.high, step=option.step,
                          round=option.round, **common)  # fmt: skip


def inputs(*names: str, optional: bool = False) -> list:
    return [input_for(name, optional) for name in names]


def tooltip(option: Option) -> str:
    text = option.help[0].upper() + option.help[1:] + "."
    if option.hint:
        text += f" {option.hint[0].upper()}{option.hint[1:]}."
    if option.kind == "names":
        return text + " Comma-separated; empty means None (on ComfyUI models: the attention projections)."
    if option.optional:
        return text + " Here 0 means None."
    return text


def config_from_inputs(values: dict) -> UnlearnConfig:
    """The UnlearnConfig of the node's training inputs; an input left out keeps the field's default."""
    unknown = sorted(set(values) - set(FIELDS))
    if unknown:
        raise InputError(f"unknown training inputs: {', '.join(unknown)}")
    config = {}
    for name, value in values.items():
        option = options()[FIELDS[name]]
        if option.kind == "names":
            value = _names(value)
        elif option.optional and value == NONE_AS and not isinstance(value, bool):
            value = None
        config[option.name] = value
    return UnlearnConfig(**config)


def _names(text) -> tuple[str, ...] | None:
    """'a, b' -> ('a', 'b'); empty -> None (the default set); only commas -> () (refused by the config)."""
    if not isinstance(text, str):
        raise InputError(f"target_modules={text!r} must be text: module names separated by commas")
    if not text.strip():
        return None
    return tuple(part.strip() for part in text.split(",") if part.strip())
