"""diffusers models as denoisers, LoRA through peft, and the unlearning entry point for them.

Supported networks, by kind (:func:`model_kind`; a CLI job's ``model.kind``):

- ``sd3``: ``SD3Transformer2DModel`` (SD3, SD3.5), rectified flow;
- ``flux``: ``FluxTransformer2DModel`` (Flux.1 dev with its guidance input, schnell), rectified flow;
- ``qwen_image``: ``QwenImageTransformer2DModel`` (Qwen-Image), rectified flow;
- ``unet``: ``UNet2DModel`` (pixel DDPMs), epsilon or v DDPM, optionally ``class_labels``;
- ``unet_cond``: ``UNet2DConditionModel`` (SD1.5, SD2, SDXL), epsilon or v DDPM.

What each kind reads as conditioning is :data:`CONDITIONING` (and :func:`conditioning_keys`);
which layers get a LoRA by default is :data:`DEFAULT_LORA_TARGETS`.

Latents are (B, C, H, W) everywhere in the core. Flux and Qwen-Image transformers take their
pipelines' packed form instead, 2x2 patches as tokens (B, H/2 * W/2, 4C) with the patch grid's
positions (:func:`pack_latents`); :meth:`DiffusersDenoiser.raw_output` packs before each call and
unpacks the output, exactly as ``FluxPipeline`` and ``QwenImagePipeline`` do.

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

from ..data.sets import UnlearnData
from ..diffusion.denoiser import Conditioning
from ..diffusion.process import ForwardProcess
from ..errors import InputError
from ..formats.lora import LoraLayer, LoraWeights, reproduction_metadata
from ..formats.model_folders import COMPONENTS
from ..method.config import UnlearnConfig
from ..method.lora_run import train_lora
from ..method.objectives import BasePrediction
from ..method.split_gradients import LayerGradientSplit
from ..method.stopping import CheckSettings, sampler_check
from ..method.trainer import Callback, TrainResult, train_unlearning

__all__ = [
    "DiffusersDenoiser",
    "SD3_LORA_TARGETS",
    "FLUX_LORA_TARGETS",
    "QWEN_IMAGE_LORA_TARGETS",
    "UNET_LORA_TARGETS",
    "UNET_COND_LORA_TARGETS",
    "DEFAULT_LORA_TARGETS",
    "CONDITIONING",
    "conditioning_keys",
    "model_kind",
    "pack_latents",
    "unpack_latents",
    "lora_attached",
    "lora_target_names",
    "DiffusersModel",
    "unlearn_diffusers",
    "UnlearnOutcome",
]

log = logging.getLogger(__name__)

ADAPTER = "unlearn"
#: diffusers class -> kind
KINDS = {cls: kind for kind, (_, cls) in COMPONENTS.items()}
#: kinds whose transformer takes 2x2-packed latent tokens (the core keeps (B, C, H, W))
PACKED_KINDS = ("flux", "qwen_image")

# Default LoRA targets: layer-name suffixes, matched (as peft does) inside the network's blocks
# only, and the same layers the ComfyUI side of this pack trains on that network (nodes/host/family.py).

#: diffusers' own SD3 LoRA recipe: every attention projection of both streams.
SD3_LORA_TARGETS = (
    "attn.to_q", "attn.to_k", "attn.to_v", "attn.to_out.0",
    "attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj", "attn.to_add_out",
)  # fmt: skip
#: Flux: the double blocks' attention of both streams (ComfyUI's img_attn.qkv / proj and
#: txt_attn.qkv / proj), and in the single blocks attn.to_q/k/v with proj_mlp (ComfyUI's fused
#: linear1) and proj_out (linear2). Defaults match inside the blocks only, so the final output
#: layer, also named proj_out, gets no LoRA.
FLUX_LORA_TARGETS = SD3_LORA_TARGETS + ("proj_mlp", "proj_out")
#: Qwen-Image: every attention projection of both streams (ComfyUI uses the same names).
QWEN_IMAGE_LORA_TARGETS = SD3_LORA_TARGETS
#: UNet attention projections and the resnet convolutions (the paper fine-tuned all of a DDPM).
UNET_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "conv1", "conv2")
#: SD1.5 / SDXL: the self- and cross-attention projections (attn1, attn2), as the common SD LoRA
#: trainers and ComfyUI's side of this pack target them.
UNET_COND_LORA_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
DEFAULT_LORA_TARGETS = {
    "sd3": SD3_LORA_TARGETS,
    "flux": FLUX_LORA_TARGETS,
    "qwen_image": QWEN_IMAGE_LORA_TARGETS,
    "unet": UNET_LORA_TARGETS,
    "unet_cond": UNET_COND_LORA_TARGETS,
}

#: The conditioning each kind reads, (required, optional): batch-first tensors under these names
#: (a CLI targets file holds them so, and prefixed ``remember.`` for a given remember set).
#: :func:`conditioning_keys` adds what a model's config asks for besides:
#:
#: - sd3: ``encoder_hidden_states`` (B, L, joint_attention_dim), ``pooled_projections`` (B, pooled);
#: - flux: the same (T5 tokens, CLIP pooled), and ``guidance`` (B,), the distilled guidance scale
#:   (FluxPipeline's guidance_scale), when the transformer has ``guidance_embeds`` (dev; not schnell);
#: - qwen_image: ``encoder_hidden_states`` (B, L, joint_attention_dim), optionally
#:   ``encoder_hidden_states_mask`` (B, L; 1 for tokens, 0 for padding), and ``guidance`` only when
#:   the config has ``guidance_embeds``;
#: - unet: nothing, or ``class_labels`` (B,) for a class-conditional UNet;
#: - unet_cond: ``encoder_hidden_states`` (B, L, cross_attention_dim), and for SDXL
#:   (``addition_embed_type`` "text_time") ``text_embeds`` (B, pooled) and ``time_ids`` (B, 6).
#:
#: Position ids (Flux's txt_ids / img_ids, Qwen-Image's img_shapes) are built from the latent size.
CONDITIONING = {
    "sd3": (("encoder_hidden_states", "pooled_projections"), ()),
    "flux": (("encoder_hidden_states", "pooled_projections"), ()),
    "qwen_image": (("encoder_hidden_states",), ("encoder_hidden_states_mask",)),
    "unet": ((), ("class_labels",)),
    "unet_cond": (("encoder_hidden_states",), ()),
}
_LABELS = {"sd3": "SD3", "flux": "Flux", "qwen_image": "Qwen-Image", "unet": "UNet2DModel",
           "unet_cond": "UNet2DConditionModel (SD1.5/SDXL)"}  # fmt: skip
#: config flags of model variants whose extra inputs this backend does not build
_UNSUPPORTED = {
    "qwen_image": ("use_additional_t_cond", "use_layer3d_rope"),  # Qwen-Image-Layered
}


def model_kind(model: torch.nn.Module) -> str:
    name = type(model).__name__
    if name not in KINDS:
        known = ", ".join(f"{cls} ({kind})" for kind, (_, cls) in COMPONENTS.items())
        raise InputError(f"{name} is not supported: unlearning handles diffusers {known}")
    kind = KINDS[name]
    config = getattr(model, "config", {})
    flags = [flag for flag in _UNSUPPORTED.get(kind, ()) if config.get(flag)]
    if flags:
        raise InputError(f"this {name} has {', '.join(flags)} set, a variant whose extra inputs unlearning does not build; "
                         "use the text-to-image model")  # fmt: skip
    if kind == "unet_cond" and (config.get("addition_embed_type") not in (None, "text_time") or config.get("class_embed_type")
                                or config.get("num_class_embeds")):  # fmt: skip
        raise InputError("this UNet2DConditionModel takes inputs besides the prompt's (addition_embed_type="
                         f"{config.get('addition_embed_type')!r}, class_embed_type={config.get('class_embed_type')!r}); "
                         "unlearning builds those of SD1.5 / SD2 (none) and SDXL (addition_embed_type 'text_time')")  # fmt: skip
    return kind


def conditioning_keys(model: torch.nn.Module) -> tuple[tuple[str, ...], tuple[str, ...]]:
    """(required, optional) conditioning names of ``model``: :data:`CONDITIONING` for its kind, plus
    ``guidance`` for a guidance-distilled Flux / Qwen-Image and ``text_embeds`` / ``time_ids`` for SDXL."""
    kind = model_kind(model)
    required, optional = CONDITIONING[kind]
    config = model.config
    if kind in PACKED_KINDS and config.get("guidance_embeds"):
        required += ("guidance",)
    if kind == "unet_cond" and config.get("addition_embed_type") == "text_time":
        required += ("text_embeds", "time_ids")
    return required, optional


def _check_conditioning(kind: str, keys: tuple[tuple[str, ...], tuple[str, ...]], cond: Conditioning) -> None:
    required, optional = keys
    missing = [key for key in required if key not in cond]
    unknown = sorted(set(cond) - set(required) - set(optional))
    if not missing and not unknown:
        return
    problems = ([f"lacks {missing}"] if missing else []) + ([f"has unknown {unknown}"] if unknown else [])
    needs = f"this model reads {', '.join(required) or 'nothing'}" + (f" (optionally {', '.join(optional)})" if optional else "")
    hint = ""
    if "guidance" in unknown:
        hint = "; it has no guidance embedding (guidance_embeds off, as in Flux.1 schnell and Qwen-Image): remove guidance"
    elif "guidance" in missing:
        hint = "; it is guidance-distilled (guidance_embeds on, as in Flux.1 dev): give the guidance scale the target was sampled with"
    raise InputError(f"{_LABELS[kind]} conditioning {' and '.join(problems)}: {needs}{hint}; name the tensors so "
                     "(batch first) in the targets file")  # fmt: skip


def pack_latents(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches as tokens, row-major, channels then the patch
    (``FluxPipeline._pack_latents``; Qwen-Image's frame axis of one drops out the same way)."""
    batch, channels, height, width = latents.shape
    patches = latents.reshape(batch, channels, height // 2, 2, width // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return patches.reshape(batch, (height // 2) * (width // 2), channels * 4)


def unpack_latents(tokens: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of :func:`pack_latents` for latents of ``height`` x ``width``."""
    batch, _, features = tokens.shape
    patches = tokens.reshape(batch, height // 2, width // 2, features // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return patches.reshape(batch, features // 4, height, width)


def flux_image_ids(height: int, width: int, device, dtype) -> torch.Tensor:
    """(h * w, 3) positions (0, row, col) of an h x w token grid (``FluxPipeline._prepare_latent_image_ids``)."""
    rows = torch.arange(height, device=device).repeat_interleave(width)
    cols = torch.arange(width, device=device).repeat(height)
    return torch.stack([torch.zeros_like(rows), rows, cols], dim=1).to(dtype)


class DiffusersDenoiser:
    """A diffusers network + its forward process behind the :class:`Denoiser` interface.

    ``gradient_split`` (optional, covering exactly ``parameters``) lets the trainer take the
    forget and remember gradients from one pass (:mod:`unlearn_core.method.split_gradients`).
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
        self.conditioning = conditioning_keys(model)
        self._parameters = parameters
        self.gradient_split = gradient_split
        #: the frozen base model's prediction (the adapter off), for ``remember_target="base"``
        self.base_predict_x0 = base_predict_x0

    def raw_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """The network's native output (velocity or epsilon) for ``x_t`` (B, C, H, W), same shape."""
        _check_conditioning(self.kind, self.conditioning, cond)
        timestep = self.process.model_timestep(t).to(x_t.device)
        if self.kind == "sd3":
            return self.model(
                hidden_states=x_t,
                encoder_hidden_states=cond["encoder_hidden_states"],
                pooled_projections=cond["pooled_projections"],
                timestep=timestep,
                return_dict=False,
            )[0]
        if self.kind in PACKED_KINDS:
            return self._packed_output(x_t, timestep, cond)
        if self.kind == "unet_cond":
            added = {key: cond[key] for key in ("text_embeds", "time_ids")} if "time_ids" in cond else None
            return self.model(x_t, timestep, encoder_hidden_states=cond["encoder_hidden_states"], added_cond_kwargs=added,
                              return_dict=False)[0]  # fmt: skip
        return self.model(x_t, timestep, class_labels=cond.get("class_labels"), return_dict=False)[0]

    def _packed_output(self, x_t: torch.Tensor, timestep: torch.Tensor, cond: Conditioning) -> torch.Tensor:
        """Flux / Qwen-Image called as their pipelines call them, on packed tokens."""
        _, channels, height, width = x_t.shape
        expected = self.model.config.in_channels
        if height % 2 or width % 2 or 4 * channels != expected:
            raise InputError(f"{_LABELS[self.kind]} packs 2x2 latent patches into {expected} features: latents must be "
                             f"(B, {expected // 4}, H, W) with H and W even, got {tuple(x_t.shape)}")  # fmt: skip
        inputs = {
            "hidden_states": pack_latents(x_t),
            "encoder_hidden_states": cond["encoder_hidden_states"],
            "timestep": timestep / 1000,  # both pipelines hand over timestep / 1000: the noise fraction itself
            "guidance": cond.get("guidance"),  # the scale as given (the transformer multiplies it by 1000)
            "return_dict": False,
        }
        if self.kind == "flux":
            text_length = cond["encoder_hidden_states"].shape[1]
            inputs["pooled_projections"] = cond["pooled_projections"]
            inputs["txt_ids"] = torch.zeros(text_length, 3, device=x_t.device, dtype=x_t.dtype)
            inputs["img_ids"] = flux_image_ids(height // 2, width // 2, x_t.device, x_t.dtype)
        else:
            inputs["encoder_hidden_states_mask"] = cond.get("encoder_hidden_states_mask")
            inputs["img_shapes"] = [[(1, height // 2, width // 2)]] * len(x_t)
        return unpack_latents(self.model(**inputs)[0], height, width)

    def predict_x0(self, x_t, t, cond):
        output = self.raw_output(x_t, t, cond)
        return self.process.predict_x0(x_t, output.to(x_t.dtype), t.to(x_t.device))

    def trainable_parameters(self):
        if self._parameters is not None:
            return list(self._parameters)
        return [p for p in self.model.parameters() if p.requires_grad]


def lora_target_names(model: torch.nn.Module, target_modules: tuple[str, ...] | None, rank: int) -> list[str]:
    """Full names of the layers that get a LoRA: those whose name ends in one of ``target_modules``
    (peft's rule), or with None the kind's :data:`DEFAULT_LORA_TARGETS` inside its blocks. Refuses a
    rank a layer cannot hold, and targets that match no layer."""
    targets = tuple(target_modules or DEFAULT_LORA_TARGETS[model_kind(model)])
    inside_blocks_only = not target_modules  # Flux's final layer is called proj_out too
    names = []
    for name, module in model.named_modules():
        if inside_blocks_only and "." not in name:
            continue
        if not any(name == t or name.endswith("." + t) for t in targets):
            continue
        weight = getattr(module, "weight", None)
        if weight is None or weight.dim() < 2:
            continue
        smallest = min(weight.shape[0], weight.shape[1])
        if rank > smallest:
            raise InputError(
                f"LoRA rank {rank} is larger than layer {name} ({tuple(weight.shape)}) allows "
                f"(at most {smallest}); lower lora_rank"
            )
        names.append(name)
    if not names:
        raise InputError(
            f"no layer of {type(model).__name__} matches target_modules {list(targets)}; name layers of this "
            "model (e.g. attn.to_q) or use None for the default set"
        )
    return names


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
        return LoraWeights(layers, "diffusers", kind=model_kind(self.model))


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
            raise InputError("apply a diffusers-namespace LoRA (convert with unlearn_core.formats.lora.to_diffusers)")
        targets = tuple(weights.layers)
        ranks = {name: layer.rank for name, layer in weights.layers.items()}
        alphas = {name: layer.alpha for name, layer in weights.layers.items()}
        config = LoraConfig(
            r=max(ranks.values()), lora_alpha=1.0, target_modules=list(targets),
            rank_pattern={f"^{k}$": v for k, v in ranks.items()},
            alpha_pattern={f"^{k}$": v for k, v in alphas.items()},
        )  # fmt: skip
    else:
        targets = lora_target_names(model, target_modules, rank)
        config = LoraConfig(r=rank, lora_alpha=float(rank if alpha is None else alpha), target_modules=targets)
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


@dataclass(frozen=True)
class DiffusersLoraTraining:
    """A LoRA in training on a diffusers module (a :class:`~unlearn_core.method.lora_run.LoraInTraining`)."""

    denoiser: DiffusersDenoiser
    attached: AttachedLora

    def weights(self) -> LoraWeights:
        return self.attached.weights()


@dataclass(frozen=True)
class DiffusersModel:
    """A diffusers module as a :class:`~unlearn_core.method.lora_run.TrainableModel`: a LoRA lives
    in it for the duration of a block (:func:`lora_attached`), so there is no served model to hand
    back; apply a trained LoRA with ``lora_attached(module, weights=...)``."""

    module: torch.nn.Module

    @contextlib.contextmanager
    def lora_training(self, config: UnlearnConfig, process: ForwardProcess) -> Iterator[DiffusersLoraTraining]:
        with (
            lora_attached(self.module, config.lora_rank, config.effective_alpha, config.target_modules, seed=config.seed) as lora,
            gradient_checkpointing(self.module, config.gradient_checkpointing),
        ):
            # Checkpointing re-runs blocks in the backward pass; the split would keep every LoRA
            # input alive across the whole forward and undo the memory it saves, so use two passes.
            yield DiffusersLoraTraining(lora.denoiser(process, split=not config.gradient_checkpointing), lora)

    def with_lora(self, weights: LoraWeights) -> None:
        return None


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

    def verify(denoiser: DiffusersDenoiser):
        if check is None or not config.stop_when_forgotten:
            return None
        return sampler_check(denoiser, process, data.forget, check, config.check_margin, config.check_nearby, config.seed)

    if config.adapter == "full":
        trained = copy.deepcopy(model)
        trained.requires_grad_(True)
        denoiser = DiffusersDenoiser(trained, process, base_predict_x0=DiffusersDenoiser(model, process).predict_x0)
        with gradient_checkpointing(trained, config.gradient_checkpointing):
            result = train_unlearning(denoiser, process, data, config, callback, should_stop, check=verify(denoiser))
        trained.requires_grad_(False)
        return UnlearnOutcome(training=result, finetuned=trained)
    trained = train_lora(DiffusersModel(model), process, data, config, callback, should_stop,
                         check=lambda training: verify(training.denoiser))  # fmt: skip
    trained.weights.metadata.update(reproduction_metadata(config, data, model_kind(model)))  # callers add what they know
    return UnlearnOutcome(training=trained.result, lora=trained.weights)
