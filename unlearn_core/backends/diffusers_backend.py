"""diffusers models as denoisers, LoRA through peft, and the unlearning entry point for them.

Supported: ``SD3Transformer2DModel`` (rectified flow, conditioned on ``encoder_hidden_states`` and
``pooled_projections``) and ``UNet2DModel`` (epsilon DDPM, optionally ``class_labels``).

The base model is never written: a LoRA is injected for the duration of a ``with`` block and
removed in ``finally`` (on success, error or stop alike), and full fine-tuning trains a copy.
"""

from __future__ import annotations

import contextlib
import copy
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from peft import LoraConfig, LoraModel
from peft.tuners.lora import LoraLayer as PeftLoraLayer

from ..config import UnlearnConfig
from ..data import UnlearnData
from ..denoiser import Conditioning
from ..errors import InputError
from ..lora import LoraLayer, LoraWeights, reproduction_metadata
from ..objectives import BasePrediction
from ..process import ForwardProcess
from ..split_gradients import LayerGradientSplit
from ..stopping import CheckSettings, sampler_check
from ..trainer import Callback, TrainResult, train_unlearning

__all__ = [
    "DiffusersDenoiser",
    "SD3_LORA_TARGETS",
    "UNET_LORA_TARGETS",
    "model_kind",
    "lora_attached",
    "unlearn_diffusers",
    "UnlearnOutcome",
]

log = logging.getLogger(__name__)

ADAPTER = "unlearn"
#: diffusers' own SD3 LoRA recipe: every attention projection of both streams.
SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
#: UNet attention projections and the resnet convolutions (the paper fine-tuned all of a DDPM).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")


def model_kind(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name == "SD3Transformer2DModel":
        return "sd3"
    if name == "UNet2DModel":
        return "unet"
    raise InputError(
        f"{name} is not supported: unlearning handles diffusers SD3Transformer2DModel (flow) and "
        "UNet2DModel (epsilon DDPM)"
    )


class DiffusersDenoiser:
    """A diffusers network + its forward process behind the :class:`Denoiser` interface.

    ``gradient_split`` (optional, covering exactly ``parameters``) lets the trainer take the
    forget and remember gradients from one pass (:mod:`unlearn_core.split_gradients`).
    """

    def __init__(
        self,
        model: torch.nn.Module,
        process: ForwardProcess,
        parameters=None,
        gradient_split: LayerGradientSplit | None = None,
        base_predict_x0: BasePrediction | None = None,
    ):
        self.model = model
        self.process = process
        self.kind = model_kind(model)
        self._parameters = parameters
        self.gradient_split = gradient_split
        #: the frozen base model's prediction (the adapter off), for ``remember_target="base"``
        self.base_predict_x0 = base_predict_x0

    def raw_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        timestep = self.process.model_timestep(t).to(x_t.device)
        if self.kind == "sd3":
            missing = {"encoder_hidden_states", "pooled_projections"} - set(cond)
            if missing:
                raise InputError(f"SD3 conditioning lacks {sorted(missing)}")
            return self.model(
                hidden_states=x_t,
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
                timestep=timestep,
                return_dict=False,
            )[0]
        return self.model(x_t, timestep, class_labels=cond.get("class_labels"), return_dict=False)[0]

    def predict_x0(self, x_t, t, cond):
        output = self.raw_output(x_t, t, cond)
        return self.process.predict_x0(x_t, output.to(x_t.dtype), t.to(x_t.device))

    def trainable_parameters(self):
        if self._parameters is not None:
            return list(self._parameters)
        return [p for p in self.model.parameters() if p.requires_grad]


def _default_targets(model: torch.nn.Module) -> tuple[str, ...]:
    return SD3_LORA_TARGETS if model_kind(model) == "sd3" else UNET_LORA_TARGETS


def _check_rank(model: torch.nn.Module, targets: tuple[str, ...], rank: int) -> None:
    matched = False
    for name, module in model.named_modules():
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() < 2:
            continue
        matched = True
        smallest = min(weight.shape[0], weight.shape[1])
        if rank > smallest:
            raise InputError(
                f"LoRA rank {rank} is larger than layer {name} ({tuple(weight.shape)}) allows "
                f"(at most {smallest}); lower lora_rank"
            )
    if not matched:
        raise InputError(
            f"no layer of {type(model).__name__} matches target_modules {list(targets)}; name layers of this "
            "model (e.g. attn.to_q) or use None for the default set"
        )


@dataclass
class AttachedLora:
    """A LoRA living inside a model for the duration of :func:`lora_attached`."""

    model: torch.nn.Module

    def layers(self) -> Iterator[tuple[str, PeftLoraLayer]]:
        for name, module in self.model.named_modules():
            if isinstance(module, PeftLoraLayer) and ADAPTER in module.lora_A:
                yield name, module

    def parameters(self) -> list[torch.nn.Parameter]:
        return [p for _, m in self.layers() for p in (m.lora_A[ADAPTER].weight, m.lora_B[ADAPTER].weight)]

    def gradient_split(self) -> LayerGradientSplit:
        """Per-half gradients of :meth:`parameters` (same order) from one pass."""
        return LayerGradientSplit([(m.lora_A[ADAPTER], m.lora_B[ADAPTER]) for _, m in self.layers()])

    def denoiser(self, process: ForwardProcess, split: bool = True) -> DiffusersDenoiser:
        """The model with this LoRA as trainable parameters (``split``: one-pass gradients); its
        base prediction is the same model with the LoRA switched off."""
        denoiser = DiffusersDenoiser(self.model, process, self.parameters(), self.gradient_split() if split else None)

        def base_predict_x0(x_t, t, cond):
            with self.switched_off():
                return denoiser.predict_x0(x_t, t, cond)

        denoiser.base_predict_x0 = base_predict_x0
        return denoiser

    @contextlib.contextmanager
    def switched_off(self) -> Iterator[None]:
        """The base model's outputs for the duration: every LoRA layer passes its input through
        the base layer alone (peft's adapter switch; the LoRA tensors and their flags stay)."""
        layers = [module for _, module in self.layers()]
        flags = [p.requires_grad for p in self.parameters()]
        for module in layers:
            module.enable_adapters(False)
        try:
            yield
        finally:
            for module in layers:
                module.enable_adapters(True)
            for param, flag in zip(self.parameters(), flags, strict=True):
                param.requires_grad_(flag)

    def weights(self) -> LoraWeights:
        layers = {}
        for name, module in self.layers():
            down = module.lora_A[ADAPTER].weight.detach().float().cpu().clone()
            up = module.lora_B[ADAPTER].weight.detach().float().cpu().clone()
            layers[name] = LoraLayer(down, up, float(module.scaling[ADAPTER] * down.shape[0]))
        return LoraWeights(layers, "diffusers")


@contextlib.contextmanager
def lora_attached(
    model: torch.nn.Module,
    rank: int = 8,
    alpha: float | None = None,
    target_modules: tuple[str, ...] | None = None,
    weights: LoraWeights | None = None,
    seed: int = 0,
) -> Iterator[AttachedLora]:
    """Inject a LoRA (fresh, or ``weights`` in the diffusers namespace) and remove it on exit.

    A fresh LoRA starts with up = 0, so the model's output is unchanged until training moves it.
    The base weights and their ``requires_grad`` flags are restored whatever happens inside.
    """
    if weights is not None:
        if weights.namespace != "diffusers":
            raise InputError("apply a diffusers-namespace LoRA (convert with unlearn_core.lora.to_diffusers)")
        targets = tuple(weights.layers)
        ranks = {name: layer.rank for name, layer in weights.layers.items()}
        alphas = {name: layer.alpha for name, layer in weights.layers.items()}
        config = LoraConfig(
            r=max(ranks.values()), lora_alpha=1.0, target_modules=list(targets),
            rank_pattern={f"^{k}$": v for k, v in ranks.items()},
            alpha_pattern={f"^{k}$": v for k, v in alphas.items()},
        )  # fmt: skip
    else:
        targets = tuple(target_modules or _default_targets(model))
        _check_rank(model, targets, rank)
        config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=list(targets))
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # peft initialises lora_A from the global RNG
        tuner = LoraModel(model, config, ADAPTER)
    try:
        attached = AttachedLora(model)
        if weights is not None:
            with torch.no_grad():
                for name, module in attached.layers():
                    layer = weights.layers[name]
                    module.lora_A[ADAPTER].weight.copy_(layer.down)
                    module.lora_B[ADAPTER].weight.copy_(layer.up)
        yield attached
    finally:
        tuner.unload()  # puts every original module (and its untouched weight) back
        for name, p in model.named_parameters():
            p.requires_grad_(flags.get(name, False))


@contextlib.contextmanager
def gradient_checkpointing(model: torch.nn.Module, enabled: bool):
    was = bool(getattr(model, "is_gradient_checkpointing", False))
    if enabled and not was:
        model.enable_gradient_checkpointing()
    try:
        yield
    finally:
        if enabled and not was:
            model.disable_gradient_checkpointing()


@dataclass
class UnlearnOutcome:
    """What :func:`unlearn_diffusers` produced: a LoRA, or a fine-tuned copy (adapter='full')."""

    training: TrainResult
    lora: LoraWeights | None = None
    finetuned: torch.nn.Module | None = None


def unlearn_diffusers(
    model: torch.nn.Module,
    process: ForwardProcess,
    data: UnlearnData,
    config: UnlearnConfig,
    callback: Callback | None = None,
    should_stop: Callable[[], bool] | None = None,
    check: CheckSettings | None = None,
) -> UnlearnOutcome:
    """Unlearn ``data.forget`` from a diffusers model; the model itself is left as it was.

    With ``check`` (how to judge a regeneration) and the targets' noise known, training stops
    once every target is verified forgotten (``config.stop_when_forgotten``)."""
    model_kind(model)

    def train(denoiser: DiffusersDenoiser) -> TrainResult:
        verify = None
        if check is not None and config.stop_when_forgotten:
            verify = sampler_check(denoiser, process, data.forget, check, config.check_margin, config.check_nearby, config.seed)
        return train_unlearning(denoiser, process, data, config, callback, should_stop, check=verify)

    if config.adapter == "full":
        trained = copy.deepcopy(model)
        trained.requires_grad_(True)
        with gradient_checkpointing(trained, config.gradient_checkpointing):
            result = train(DiffusersDenoiser(trained, process, base_predict_x0=DiffusersDenoiser(model, process).predict_x0))
        trained.requires_grad_(False)
        return UnlearnOutcome(training=result, finetuned=trained)
    with (
        lora_attached(model, config.lora_rank, config.effective_alpha, config.target_modules, seed=config.seed) as lora,
        gradient_checkpointing(model, config.gradient_checkpointing),
    ):
        # Checkpointing re-runs blocks in the backward pass; the split would keep every LoRA
        # input alive across the whole forward and undo the memory it saves, so use two passes.
        result = train(lora.denoiser(process, split=not config.gradient_checkpointing))
        weights = lora.weights()
    weights.metadata.update(reproduction_metadata(config, data, model_kind(model)))  # callers add what they know
    return UnlearnOutcome(training=result, lora=weights)

