"""The one module that knows ComfyUI's model objects: ModelPatcher -> core denoiser, LoRA on a clone.

How training stays off the user's cached model (docs/COMFYUI.md):

- everything happens on ``patcher.clone()``: the clone shares the network but carries its own
  weight wrappers and object patches, which ComfyUI applies only while the clone is loaded and
  removes when it is unloaded;
- LoRA adapters are ComfyUI's own trainable ``LoraDiff`` modules attached with
  ``add_weight_wrapper`` (the native trainer's approach), so the trained tensors are already
  in the LORA_MODEL key format that SaveLoRA / LoraModelLoader understand;
- the loaded weights are inference tensors that autograd may not save. Instead of deep-copying
  the network (what TrainLoraNode does, doubling memory), each weight gets an object patch with
  a *non-inference alias of the same storage*: no bytes are copied and nothing can write
  through it, because the aliases never require grad and the optimizer only sees LoRA tensors;
- on exit (success, error or cancel) the clone is unloaded and every module's wrapper list is
  emptied, so the next use of the base model loads it exactly as before;
- a model under ComfyUI's dynamic VRAM (``ModelPatcherDynamic``, 0.33 on a GPU) streams each
  weight onto the GPU for one op and drops it, which a backward pass cannot use: training runs
  on its non-dynamic delegate instead (the same file loaded again by ComfyUI, what ComfyUI itself
  does for hooks and torch.compile), released after training.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import comfy.conds
import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.sd
import comfy.utils
import torch
import torch.utils.checkpoint
from comfy.model_base import ModelType
from comfy.weight_adapter.lora import LoRAAdapter

from ..unlearn_core.diffusion.denoiser import Conditioning
from ..unlearn_core.diffusion.prediction import Epsilon, FlowVelocity, Velocity
from ..unlearn_core.diffusion.process import ForwardProcess
from ..unlearn_core.errors import InputError
from ..unlearn_core.formats.lora import LoraLayer, LoraWeights
from ..unlearn_core.verify.metrics import CopyDetector

log = logging.getLogger(__name__)

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


class PatcherDenoiser:
    """x0 predictions of a loaded ModelPatcher (the clone that carries the LoRA); with its
    ``adapters``, also the base model's (every adapter switched off)."""

    gradient_split = None  # ComfyUI's weight wrappers give no per-layer hooks: two passes

    def __init__(self, patcher, process: HostProcess, parameters: list[torch.nn.Parameter],
                 adapters: dict[str, torch.nn.Module] | None = None):  # fmt: skip
        self.patcher = patcher
        self.process = process
        self._parameters = parameters
        self._adapters = adapters
        if adapters is None:
            self.base_predict_x0 = None

    def predict_x0(self, x_t, t, cond):
        sigma = self.process.sigma(t).to(x_t.device)
        x = model_latent(self.patcher, x_t)
        return image_latent(self.patcher.model.apply_model(x, sigma, transformer_options={}, **with_constants(cond)))

    def base_predict_x0(self, x_t, t, cond):
        with adapters_off(self._adapters):
            return self.predict_x0(x_t, t, cond)

    def trainable_parameters(self):
        return self._parameters


def conditioning_tensors(patcher, conditioning, n: int, latent: torch.Tensor) -> Conditioning:
    """ComfyUI CONDITIONING -> the model's keyword tensors (c_crossattn, y, ...) for n samples.

    Uses the model's own ``extra_conds`` so that whatever the model family needs is built the
    way ComfyUI's samplers build it.
    """
    if not conditioning:
        return {}
    if not isinstance(conditioning, list) or not isinstance(conditioning[0], (list, tuple)):
        raise InputError("CONDITIONING is malformed: connect the output of a text encode node")
    cross_attn, extra = conditioning[0][0], dict(conditioning[0][1])
    extra.pop("cross_attn", None)
    built = patcher.model.extra_conds(
        cross_attn=cross_attn, device=latent.device, noise=latent[:1], latent_image=latent[:1], **extra
    )
    tensors: Conditioning = {}
    for key, value in built.items():
        tensor = getattr(value, "cond", None)
        if isinstance(value, comfy.conds.CONDConstant) and isinstance(tensor, (int, float)) and not isinstance(tensor, bool):
            tensors[CONSTANT + key] = torch.full((n,), tensor)  # Lumina 2 / Z-Image's num_tokens
            continue
        if not isinstance(tensor, torch.Tensor):
            continue
        if key == "c_concat":
            raise InputError("inpainting/concat-conditioned models are not supported for unlearning")
        tensor = tensor.detach().clone().to(latent.device)
        tensors[key] = tensor[:1].expand(n, *tensor.shape[1:]).clone() if len(tensor) != n else tensor
    return tensors


#: A number the model takes once per batch (ComfyUI's CONDConstant, such as Lumina 2's text length)
#: rides in the core's batch-first conditioning as one value per sample under this prefix, so that
#: selecting and joining batches keeps it; :func:`with_constants` hands it back as the number.
CONSTANT = "constant:"


def with_constants(cond: Conditioning) -> dict:
    """The model's keyword arguments: every constant as its single value. Samples with different
    values cannot share a batch, as in ComfyUI's own batching of CONDConstant."""
    out = {}
    for key, value in cond.items():
        if not key.startswith(CONSTANT):
            out[key] = value
            continue
        values = value.unique()
        if len(values) != 1:
            raise InputError(f"the conditionings in one batch differ in {key.removeprefix(CONSTANT)} ({values.tolist()}): "
                             "use prompts of the same length for the targets")  # fmt: skip
        out[key.removeprefix(CONSTANT)] = values.item()  # an int stays an int (a length)
    return out


def conditioning_to_store(conditioning, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors of a CONDITIONING under flat names, for a file: the text tokens, every tensor the
    text encoder gave besides them (pooled output, attention mask, HiDream's Llama layers) and Flux's
    guidance scale, which FluxGuidance sets: all a replay needs to condition as the sampler did."""
    if not conditioning:
        return {}
    tensor, extra = conditioning[0][0], conditioning[0][1]
    tensors = {f"{prefix}cross_attn": tensor}
    for key, value in extra.items():
        if isinstance(value, torch.Tensor) and key != "cross_attn":
            tensors[f"{prefix}{key}"] = value
    if isinstance(extra.get("guidance"), (int, float)):
        tensors[f"{prefix}guidance"] = torch.tensor(float(extra["guidance"]))
    return tensors


def conditioning_from_store(tensors: dict[str, torch.Tensor] | None, prefix: str = ""):
    """The CONDITIONING stored by :func:`conditioning_to_store` (None when there is none). Names
    with a further prefix (the negative's, beside the positive's) belong to another conditioning."""
    if not tensors or f"{prefix}cross_attn" not in tensors:
        return None
    extra = {}
    for name, value in tensors.items():
        key = name.removeprefix(prefix)
        if not name.startswith(prefix) or "." in key or key == "cross_attn":
            continue
        extra[key] = float(value) if key == "guidance" else value
    return [[tensors[f"{prefix}cross_attn"], extra]]


def process_latent_in(patcher, samples: torch.Tensor) -> torch.Tensor:
    """Raw LATENT samples (VAE space) -> the space the network denoises."""
    return image_latent(patcher.model.process_latent_in(model_latent(patcher, samples.detach().clone().float())))


def image_latent(samples: torch.Tensor) -> torch.Tensor:
    """Raw samples in the core's (B, C, h, w): an image model with a video VAE (Qwen-Image's Wan
    latent format) keeps its latents as (B, C, 1, h, w), one frame; the frame axis is dropped."""
    return samples.squeeze(2) if samples.dim() == 5 and samples.shape[2] == 1 else samples


def model_latent(patcher, samples: torch.Tensor) -> torch.Tensor:
    """The core's (B, C, h, w) in the layout the model takes (the frame axis back where its latent
    format has one)."""
    frames = patcher.get_model_object("latent_format").latent_dimensions == 3
    return samples.unsqueeze(2) if frames and samples.dim() == 4 else samples


def _alias(tensor: torch.Tensor) -> torch.nn.Parameter:
    """A non-inference tensor over the same storage (no copy), frozen.

    Only plain tensors get one. A quantized weight (ComfyUI's QuantizedTensor, e.g. from a
    scaled-fp8 file) is a wrapper without storage of its own, and the layer dequantizes it into a
    fresh tensor at every forward, layer by layer, before the LoRA adds to it: that tensor, not the
    inference weight, is what autograd keeps."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return torch.nn.Parameter(alias, requires_grad=False)


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


def release(clone) -> None:
    """Unload ``clone`` and leave its shared modules without any wrapper of ours."""
    management = comfy.model_management
    for index in reversed(range(len(management.current_loaded_models))):
        loaded = management.current_loaded_models[index]
        if loaded.model is clone:
            loaded.model_unload()
            management.current_loaded_models.pop(index)
    for module in clone.model.modules():
        if hasattr(module, "weight_function"):
            module.weight_function = []
        if hasattr(module, "bias_function"):
            module.bias_function = []


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


@contextlib.contextmanager
def lora_training_clone(
    patcher, rank: int, alpha: float, target_modules: tuple[str, ...] | None, seed: int
) -> Iterator[tuple[object, dict[str, torch.nn.Module]]]:
    """A loaded clone of ``patcher`` with fresh LoRA adapters on the target layers.

    Yields (clone, adapters by module name). The base patcher and its network are left
    exactly as they were, whatever happens inside the block.
    """
    model_family(patcher)
    targets = lora_target_names(patcher, rank, target_modules)
    with (
        non_dynamic(patcher) as source,
        _loaded_lora_clone(source, targets, rank, alpha, seed) as trained,
        _host_training_mode(),
    ):
        yield trained


@contextlib.contextmanager
def _host_training_mode() -> Iterator[None]:
    """What backward passes through ComfyUI's networks need, undone on exit.

    - ComfyUI's flag for its own LoRA trainer (0.33; absent before): while it is set, layers
      pick their differentiable forms (Flux's rotary embedding has a fused inference kernel
      without a backward pass);
    - inference-style in-place updates of tensors that autograd saved (Flux's blocks add their
      residuals with ``+=``) are allowed: torch then keeps a copy of what the update overwrote.
    """
    management = comfy.model_management
    before = getattr(management, "in_training", None)
    if before is not None:
        management.in_training = True
    try:
        with torch.autograd.graph.allow_mutation_on_saved_tensors():
            yield
    finally:
        if before is not None:
            management.in_training = before


def is_dynamic(patcher) -> bool:
    """Whether ComfyUI loads this model with dynamic VRAM (0.3.x has no such patcher)."""
    return bool(getattr(patcher, "is_dynamic", lambda: False)())


@contextlib.contextmanager
def non_dynamic(patcher) -> Iterator[object]:
    """``patcher`` itself, or for a dynamic-VRAM patcher ComfyUI's non-dynamic delegate of it (with
    the same patches), which is forgotten again on exit so that its copy of the weights is freed."""
    if not is_dynamic(patcher):
        yield patcher
        return
    kept = patcher.non_dynamic_delegate_model
    log.info("dynamic VRAM model: training on ComfyUI's non-dynamic copy of it (its file loaded again)")
    try:
        delegate = patcher.get_non_dynamic_delegate()
    except RuntimeError as error:  # a custom loader that registered no way to load the file again
        raise InputError(f"this model's loader cannot give ComfyUI's non-dynamic copy that training needs ({error}); "
                         "load it with Load Checkpoint or Load Diffusion Model, or start ComfyUI with "
                         "--disable-dynamic-vram") from error  # fmt: skip
    try:
        yield delegate
    finally:
        patcher.non_dynamic_delegate_model = kept


@contextlib.contextmanager
def _loaded_lora_clone(patcher, targets: set[str], rank: int, alpha: float, seed: int):
    clone = patcher.clone()
    adapters: dict[str, torch.nn.Module] = {}
    with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # LoraDiff initialises lora_up from the global RNG
        for name, module in clone.model.named_modules():
            # every parameter the forward reads: a layer's weight and bias and what else it
            # multiplies in (scaled fp8's scale_weight / scale_input in ComfyUI 0.3.x), and the
            # plain parameters some networks use directly (HiDream's expert gate, Z-Image's pad token)
            for kind, tensor in list(module.named_parameters(recurse=False)):
                key = f"{name}.{kind}"
                if type(tensor.data) is torch.Tensor:  # a quantized weight needs none: see _alias
                    clone.add_object_patch(key, _alias(tensor))
                if kind == "weight" and name in targets and hasattr(module, "weight_function"):
                    adapter = LoRAAdapter.create_train(tensor, rank=rank, alpha=alpha).to(torch.float32)
                    adapter.train().requires_grad_(True)
                    adapter.alpha.requires_grad_(False)
                    clone.add_weight_wrapper(key, adapter)
                    adapters[name] = adapter
    try:
        comfy.model_management.load_models_gpu([clone], force_full_load=True)
        yield clone, adapters
    finally:
        release(clone)


@contextlib.contextmanager
def adapters_off(adapters: dict[str, torch.nn.Module]) -> Iterator[None]:
    """The base model's weights for the duration: a LoRA adapter adds alpha / rank * up @ down to
    its weight at every forward, so alpha 0 adds exactly nothing (its tensors stay as trained)."""
    alphas = {name: adapter.alpha.detach().clone() for name, adapter in adapters.items()}
    with torch.no_grad():
        for adapter in adapters.values():
            adapter.alpha.zero_()
    try:
        yield
    finally:
        with torch.no_grad():
            for name, adapter in adapters.items():
                adapter.alpha.copy_(alphas[name])


def adapter_parameters(adapters: dict[str, torch.nn.Module]) -> list[torch.nn.Parameter]:
    return [p for adapter in adapters.values() for p in (adapter.lora_up.weight, adapter.lora_down.weight)]


def lora_weights(patcher, adapters: dict[str, torch.nn.Module]) -> LoraWeights:
    """The trained adapters as the core's LoRA, in the namespace of the model's own module names
    (``mmdit`` for SD3's MMDiT, else ``comfy``); ``lora.state_dict_for(weights, "comfy")`` is the
    LORA_MODEL that SaveLoRA / LoraModelLoader take."""
    prefix = "diffusion_model."
    layers = {}
    for name, adapter in adapters.items():
        layers[name.removeprefix(prefix)] = LoraLayer(adapter.lora_down.weight.detach().float().cpu().clone(),
                                                      adapter.lora_up.weight.detach().float().cpu().clone(),
                                                      float(adapter.alpha))  # fmt: skip
    is_mmdit = type(patcher.model.diffusion_model).__name__ == "MMDiT"
    return LoraWeights(dict(sorted(layers.items())), "mmdit" if is_mmdit else "comfy")


def with_lora(patcher, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``patcher`` with ``lora`` applied the way the stock LoRA loaders apply it."""
    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    return model


def model_name(patcher) -> str:
    """A stable description of the base model for provenance (class, type, size)."""
    model = patcher.model
    size = sum(p.numel() for p in model.diffusion_model.parameters())
    return f"{type(model).__name__}/{model.model_type.name}/{size}"


# --- sampling and the VAE (ComfyUI's own) -------------------------------------------------------

SAMPLERS = comfy.samplers.KSampler.SAMPLERS
SCHEDULERS = comfy.samplers.KSampler.SCHEDULERS


def zero_conditioning(conditioning):
    """The empty-prompt stand-in SD3 graphs build with ConditioningZeroOut."""
    out = []
    for tensor, extra in conditioning:
        extra = dict(extra)
        if isinstance(extra.get("pooled_output"), torch.Tensor):
            extra["pooled_output"] = torch.zeros_like(extra["pooled_output"])
        out.append([torch.zeros_like(tensor), extra])
    return out


def ksample(
    patcher, seed: int, steps: int, cfg: float, sampler: str, scheduler: str, positive, negative,
    latent: torch.Tensor, denoise: float = 1.0, noise_mask: torch.Tensor | None = None, batch_index: int = 0,
) -> torch.Tensor:  # fmt: skip
    """ComfyUI's KSampler on raw LATENT samples; returns raw samples (as KSampler does).

    ``batch_index`` picks the noise that image had in its original batch (KSampler draws one
    noise tensor per batch from the seed), so a marked image can be regenerated exactly.
    """
    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    noise = comfy.sample.prepare_noise(latent, seed, [batch_index] * len(latent) if batch_index else None)
    return image_latent(comfy.sample.sample(
        patcher, noise, steps, cfg, sampler, scheduler, positive, negative or zero_conditioning(positive),
        latent, denoise=denoise, noise_mask=noise_mask, disable_pbar=True, seed=seed,
    ))  # fmt: skip


def ksample_from_noise(patcher, prompt: HostPrompt, noise: torch.Tensor, seed: int) -> torch.Tensor:
    """ComfyUI's sampler from a given initial ``noise`` (B, C, h, w) rather than a seed's: the
    forgetting check's nearby probes. With the seed's own noise it is :func:`ksample` exactly."""
    noise = model_latent(patcher, noise)
    return image_latent(comfy.sample.sample(
        patcher, noise, prompt.steps, prompt.cfg, prompt.sampler_name, prompt.scheduler, prompt.positive,
        prompt.negative or zero_conditioning(prompt.positive), torch.zeros_like(noise), denoise=1.0, disable_pbar=True, seed=seed,
    )).float()  # fmt: skip


def invert_to_noise(patcher, prompt: HostPrompt, latent: torch.Tensor, refine: int = 3) -> torch.Tensor:
    """The initial noise (B, C, h, w) from which ComfyUI's Euler sampler, with ``prompt``'s
    scheduler, steps, cfg and conditionings, makes the raw LATENT samples ``latent``: its sigma
    schedule walked backwards, for a target whose seed is unknown (an image loaded into ComfyUI).

    The walk runs inside ComfyUI's own sampling (as a custom sampler over the reversed
    schedule), so the guided prediction is the one the sampler uses: cfg, negative, model
    patches. Each backward step is the usual inversion guess, corrected ``refine`` times by the
    fixed-point iteration of :func:`~unlearn_core.diffusion.sampling.invert` (an exact inverse of the
    Euler step makes the step back land on where the walk came from). Another sampler, or a
    latent the model did not make, gives a noise that may not reproduce it: the forgetting
    check's baseline says so.
    """
    sampling = patcher.get_model_object("model_sampling")
    sigmas = comfy.samplers.calculate_sigmas(sampling, prompt.scheduler, prompt.steps).cpu()
    reached: list[torch.Tensor] = []

    def walk_back(model, x, up, extra_args=None, callback=None, disable=None):
        extra_args = extra_args or {}

        def slope(x, sigma):  # the Euler sampler's d = (x - denoised) / sigma
            return (x - model(x, sigma * x.new_ones([len(x)]), **extra_args)) / sigma

        for sigma, sigma_next in zip(up[:-1], up[1:], strict=True):
            # the clean end has no slope of its own: the first guess takes the one at the next level
            guess = x + slope(x, sigma if float(sigma) > 0 else sigma_next) * (sigma_next - sigma)
            for _ in range(refine):
                guess = guess + (x - (guess + slope(guess, sigma_next) * (sigma - sigma_next)))
            x = guess
        reached.append(x.float())
        return x

    latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
    comfy.sample.sample_custom(
        patcher, torch.zeros_like(latent), prompt.cfg, comfy.samplers.KSAMPLER(walk_back), sigmas.flip(0), prompt.positive,
        prompt.negative or zero_conditioning(prompt.positive), latent, disable_pbar=True, seed=0,
    )  # fmt: skip
    # ComfyUI starts a full denoise from noise_scaling(sigma_max, noise, 0): the reached level over that scale
    scale = sampling.noise_scaling(sigmas[:1].float(), torch.ones(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), max_denoise=True)
    return image_latent(reached[0].cpu() / scale.reshape(1, 1, 1, 1)).float()


#: how a target with no recorded sampler settings is regenerated
DEFAULT_SAMPLING = {"steps": 20, "cfg": 4.5, "sampler_name": "euler", "scheduler": "sgm_uniform"}


@dataclass(frozen=True)
class HostPrompt:
    """What an output was sampled with in ComfyUI: both conditionings, the KSampler settings and
    the image's place in its batch (which noise of the seed it had)."""

    positive: list
    negative: list | None
    steps: int
    cfg: float
    sampler_name: str
    scheduler: str
    batch_index: int = 0


def replay_prompt(provenance: dict, positive, negative, steps: int, batch_index: int = 0) -> HostPrompt:
    """The prompt that samples like a recorded output (its settings, from its provenance); ``steps``
    (and the defaults) where it has none recorded, or names this ComfyUI does not know.
    ``batch_index`` is the output's place in its batch: give it to replay that very output; other
    seeds are sampled as images 0 of their batch."""
    settings = dict(DEFAULT_SAMPLING, steps=steps)
    known = {"sampler_name": SAMPLERS, "scheduler": SCHEDULERS}
    for key in ("steps", "cfg", "sampler_name", "scheduler"):
        value = provenance.get(key)
        if value is not None and (key not in known or value in known[key]):
            settings[key] = value
    return HostPrompt(positive, negative, int(settings["steps"]), float(settings["cfg"]), settings["sampler_name"],
                      settings["scheduler"], batch_index)  # fmt: skip


class HostSampler:
    """ComfyUI's KSampler on a ModelPatcher as the core's :class:`~unlearn_core.diffusion.sampling.Sampler`
    (raw LATENT samples in and out; prompts are :class:`HostPrompt`)."""

    def __init__(self, patcher):
        self.patcher = patcher

    def generate(self, prompt: HostPrompt, seeds: Sequence[int], shape: tuple[int, ...]) -> torch.Tensor:
        empty = torch.zeros(1, *shape)
        return torch.cat([self._sample(prompt, int(seed), empty) for seed in seeds])

    def generate_from_noise(self, prompt: HostPrompt, noise: torch.Tensor) -> torch.Tensor:
        return torch.cat([ksample_from_noise(self.patcher, prompt, row[None], 0) for row in noise])

    def edit(self, prompt: HostPrompt, image: torch.Tensor, strength: float, seed: int,
             mask: torch.Tensor | None = None) -> torch.Tensor:  # fmt: skip
        return self._sample(prompt, int(seed), image, denoise=strength, noise_mask=mask)

    def _sample(self, prompt: HostPrompt, seed: int, latent: torch.Tensor, **kwargs) -> torch.Tensor:
        return ksample(self.patcher, seed, prompt.steps, prompt.cfg, prompt.sampler_name, prompt.scheduler,
                       prompt.positive, prompt.negative, latent, batch_index=prompt.batch_index, **kwargs).float()  # fmt: skip


def decoder(vae):
    """Raw LATENT samples -> images (B, 3, H, W) in [0, 1], the core's layout."""
    return lambda samples: decode(vae, samples).movedim(-1, 1).float()


def sampling_noise(patcher, shape: tuple[int, ...], seed: int, batch_index: int = 0) -> torch.Tensor:
    """The noise (C, h, w) KSampler started image ``batch_index`` of a batch from ``seed`` with
    (what :func:`ksample` draws to replay it)."""
    latent = comfy.sample.fix_empty_latent_channels(patcher, torch.zeros(1, *shape))
    return image_latent(comfy.sample.prepare_noise(latent, seed, [batch_index] if batch_index else None))[0].float()


def latent_shape(patcher, vae, height: int, width: int) -> tuple[int, int, int]:
    """(C, h, w) of the raw latent this model samples for an image of height x width pixels."""
    scale = vae_scale(vae)
    channels = patcher.model.latent_format.latent_channels
    return channels, max(1, round(height / scale)), max(1, round(width / scale))


def encode(vae, images: torch.Tensor) -> torch.Tensor:
    """IMAGE (B, H, W, 3) -> raw LATENT samples.

    ComfyUI's VAE silently centre-crops sides that are not a multiple of its scale; the whole
    image is resized to the nearest multiple instead (with a warning), so nothing of the target
    is cut away.
    """
    images = images[:, :, :, :3]
    scale = vae_scale(vae)
    height, width = images.shape[1:3]
    size = (max(scale, round(height / scale) * scale), max(scale, round(width / scale) * scale))
    if size != (height, width) and getattr(vae, "crop_input", True):
        log.warning(
            "image %dx%d is not a multiple of the VAE's scale %d: resized to %dx%d (not cropped); "
            "mark images whose sides are multiples of %d to avoid resizing", width, height, scale, size[1], size[0], scale,
        )  # fmt: skip
        resized = torch.nn.functional.interpolate(images.movedim(-1, 1).float(), size=size, mode="bilinear", antialias=True)
        images = resized.movedim(1, -1).clamp(0, 1)
    return image_latent(vae.encode(images))


def vae_scale(vae) -> int:
    """How many pixels one latent cell covers (8 for SD3's VAE)."""
    spatial = getattr(vae, "spacial_compression_encode", None)
    scale = spatial() if callable(spatial) else getattr(vae, "downscale_ratio", 8)
    return scale if isinstance(scale, int) and scale > 0 else 8


def decode(vae, samples: torch.Tensor) -> torch.Tensor:
    """Raw LATENT samples -> IMAGE (B, H, W, 3)."""
    if getattr(vae, "latent_dim", 2) == 3 and samples.dim() == 4:  # a video VAE: one frame
        samples = samples.unsqueeze(2)
    images = vae.decode(samples)
    if images.dim() == 5:  # video VAEs return (B, T, H, W, C)
        images = images.reshape(-1, *images.shape[-3:])
    return images.clamp(0, 1)


class ClipVisionEmbedder(CopyDetector):
    """A CLIP_VISION model as an image embedder for the core's metrics (a semantic similarity column)."""

    name = "clip"

    def __init__(self, clip_vision):
        self.clip_vision = clip_vision

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        return self.clip_vision.encode_image(images.permute(0, 2, 3, 1)).image_embeds.float()


@contextlib.contextmanager
def gradient_checkpointing(patcher, enabled: bool):
    """Recompute each transformer block in backward (memory for compute), undone on exit.

    The blocks are shared with the base model, so their forwards are restored in ``finally``.
    """
    if not enabled:
        yield
        return
    blocks = [
        block
        for child in patcher.model.diffusion_model.children()
        if isinstance(child, torch.nn.ModuleList)
        for block in child
    ]
    originals = []
    try:
        for block in blocks:
            original = block.forward

            def checkpointed(*args, _forward=original, **kwargs):
                return torch.utils.checkpoint.checkpoint(_forward, *args, use_reentrant=False, **kwargs)

            originals.append((block, original))
            block.forward = checkpointed
        yield
    finally:
        for block, _ in originals:
            del block.forward  # drops the instance attribute: the class forward is back


# --- progress and events (the UI) ---------------------------------------------------------------


def progress_bar(total: int, node_id: str | None):
    return comfy.utils.ProgressBar(total, node_id=node_id)


def raise_if_interrupted() -> None:
    """Raises ComfyUI's interrupt when the user cancelled the prompt."""
    comfy.model_management.throw_exception_if_processing_interrupted()


def _server():
    try:
        from server import PromptServer
    except ImportError:  # running without the server (scripts, some tests)
        return None
    return getattr(PromptServer, "instance", None)


def send_event(event: str, data: dict) -> None:
    """A websocket event to the client that queued the prompt (nothing without the server)."""
    instance = _server()
    if instance is not None:
        instance.send_sync(event, data, getattr(instance, "client_id", None))


def server_routes():
    """The running server's aiohttp route table (None without the server)."""
    instance = _server()
    return None if instance is None else instance.routes
