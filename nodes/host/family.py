"""Which ComfyUI models the pack trains, and how each noises: the model families, their default
LoRA targets, and the host's noising behind the core's process interface."""

from __future__ import annotations

import re

import torch
from comfy.model_base import ModelType

from ...unlearn_core.diffusion.prediction import Epsilon, FlowVelocity, Velocity
from ...unlearn_core.diffusion.process import ForwardProcess
from ...unlearn_core.errors import InputError

# FLUX is ComfyUI's rectified flow with a resolution-dependent shift (Flux.1, Flux.2, Chroma,
# Qwen-Image): the same noising as FLOW, with its own model_sampling read from the loaded model
SUPPORTED_TYPES = {ModelType.FLOW: "flow", ModelType.FLUX: "flow", ModelType.EPS: "eps", ModelType.V_PREDICTION: "v"}

#: The default LoRA targets per network (the class of ``model.diffusion_model``): the attention
#: projections the well-known trainers target, so that every key of a saved LoRA is one the stock
#: loaders map. MMDiT (SD3 / SD3.5): each stream's fused qkv and proj, diffusers' SD3 recipe. Flux
#: (Flux.1 dev / schnell, Flux.2, Chroma): the double blocks' image and text attention, and the
#: single blocks' linear1 (fused qkv and MLP in) and linear2 (attention out and MLP out), as kohya's and
#: ai-toolkit's Flux LoRAs. Qwen-Image: both streams' attention projections (to_q / k / v / out.0
#: and add_q / k / v_proj / to_add_out), as diffusers' and ai-toolkit's Qwen-Image LoRAs. Lumina 2 /
#: Z-Image (NextDiT): every attention's fused qkv and out, in the layers and both refiners. HiDream:
#: each block's attention projections of the image (to_q / k / v / out) and text (their _t) tokens.
#: UNets (SD1.5 / SDXL) and other DiTs: the separate to_q / k / v / out.
LORA_TARGETS = {
    "MMDiT": (r"\.attn2?\.(qkv|proj)$",),
    "Flux": (r"\.(img|txt)_attn\.(qkv|proj)$", r"\.single_blocks\.\d+\.linear[12]$"),
    "Chroma": (r"\.(img|txt)_attn\.(qkv|proj)$", r"\.single_blocks\.\d+\.linear[12]$"),
    "QwenImageTransformer2DModel": (r"\.attn\.(to_q|to_k|to_v|to_out\.0|add_q_proj|add_k_proj|add_v_proj|to_add_out)$",),
    "NextDiT": (r"\.attention\.(qkv|out)$",),
    "HiDreamImageTransformer2DModel": (r"\.attn1\.(to_q|to_k|to_v|to_out)(_t)?$",),
}
OTHER_TARGETS = (r"\.(to_q|to_k|to_v|to_out\.0)$",)


def model_family(patcher) -> str:
    """'flow', 'eps' or 'v'; anything else is refused with the reason."""
    model = getattr(patcher, "model", None)
    model_type = getattr(model, "model_type", None)
    if model_type not in SUPPORTED_TYPES:
        name = getattr(model_type, "name", type(model).__name__)
        raise InputError(
            f"this model ({type(model).__name__}, type {name}) is not supported: instance unlearning "
            "handles rectified-flow models (SD3, SD3.5, Flux.1, Flux.2, Chroma, Qwen-Image, Z-Image / Lumina 2) and "
            "epsilon/v-prediction diffusion models (SD1.5, SDXL)"
        )
    return SUPPORTED_TYPES[model_type]


class HostProcess(ForwardProcess):
    """The host model's own noising, in sigma form, behind the core's process interface.

    Noise fraction t is sigma itself for flow models (as in SD3) and the timestep fraction for
    discrete eps/v models, whose noise ComfyUI writes as x0 + sigma eps (alpha = 1). The network's
    output converts to x0 through the core's prediction types, the same objects the library's
    processes use: ComfyUI's CONST, EPS and V_PREDICTION (sigma_data 1) are exactly
    :class:`FlowVelocity`, :class:`Epsilon` and :class:`Velocity` on these scales (tested against
    its calculate_denoised). Training noise levels follow the core's processes: the shifted flow
    schedule clamped at 0.02, and for discrete models every timestep 1..T with equal probability
    (as :class:`~unlearn_core.diffusion.process.DDPMEpsilon`).
    """

    PREDICTIONS = {"flow": FlowVelocity(), "eps": Epsilon(), "v": Velocity()}

    def __init__(self, model_sampling, family: str):
        self.model_sampling = model_sampling
        self.family = family
        self.prediction = self.PREDICTIONS[family]
        self.t_min = 0.02 if family == "flow" else 1.0 / len(model_sampling.sigmas)

    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        if self.family == "flow":
            return t.float()
        steps = len(self.model_sampling.sigmas)
        return self.model_sampling.sigma(t.float() * steps - 1).float()

    def scales(self, t):
        sigma = self.sigma(t)
        if self.family == "flow":
            return 1 - sigma, sigma
        return torch.ones_like(sigma), sigma

    def add_noise(self, x0, noise, t):
        return self.model_sampling.noise_scaling(self.sigma(t).to(x0), noise, x0)

    def sample_t(self, n, generator=None):
        u = torch.rand(n, generator=generator)
        if self.family == "flow":
            sigma = torch.tensor([float(self.model_sampling.percent_to_sigma(1 - float(v))) for v in u])
            return sigma.clamp(min=self.t_min, max=1.0)
        steps = len(self.model_sampling.sigmas)
        return torch.randint(1, steps + 1, (n,), generator=generator).float() / steps


def training_process(patcher) -> HostProcess:
    # the patcher's, so that a ModelSamplingAuraFlow / ModelSamplingSD3 shift in the graph holds
    return HostProcess(patcher.get_model_object("model_sampling"), model_family(patcher))


def _is_target(name: str, patterns: tuple[str, ...]) -> bool:
    return any(re.search(p, name) for p in patterns)


def default_targets(patcher) -> tuple[str, ...]:
    """The network's default LoRA targets (:data:`LORA_TARGETS`)."""
    for cls in type(patcher.model.diffusion_model).__mro__:  # SD3's network is a subclass of MMDiT
        if cls.__name__ in LORA_TARGETS:
            return LORA_TARGETS[cls.__name__]
    return OTHER_TARGETS


def target_patterns(patcher, target_modules: tuple[str, ...] | None) -> tuple[str, ...]:
    if not target_modules:
        return default_targets(patcher)
    return tuple(r"(^|\.)" + re.escape(t) + "$" for t in target_modules)


def lora_target_names(patcher, rank: int, target_modules: tuple[str, ...] | None) -> set[str]:
    """Names of the layers that get a LoRA; refuses a rank a layer cannot hold, or no match at all.

    Cheap (no weights are touched), so the node calls it before any sampling or training.
    """
    patterns = target_patterns(patcher, target_modules)
    names = set()
    for name, module in patcher.model.named_modules():
        weight = getattr(module, "weight", None)
        if not hasattr(module, "weight_function") or weight is None or weight.dim() < 2 or not _is_target(name, patterns):
            continue
        smallest = min(weight.shape[0], weight[0].numel())
        if rank > smallest:
            raise InputError(f"LoRA rank {rank} is larger than layer {name} allows (at most {smallest}); lower the rank")
        names.add(name)
    if not names:
        raise InputError(
            f"no layer of this model matches the LoRA targets {list(target_modules or default_targets(patcher))}; "
            "leave target_modules empty for the default attention projections"
        )
    return names


def model_name(patcher) -> str:
    """A stable description of the base model for provenance (class, type, size)."""
    model = patcher.model
    size = sum(p.numel() for p in model.diffusion_model.parameters())
    return f"{type(model).__name__}/{model.model_type.name}/{size}"
