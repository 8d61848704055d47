"""LoRA training on a ComfyUI model: the adapters on a clone, the clone as the core's denoiser, the
trained LoRA read back and applied the way the stock loaders apply it.

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
from collections.abc import Iterator
from dataclasses import dataclass

import comfy.model_management
import comfy.sd
import torch
import torch.utils.checkpoint
from comfy.weight_adapter.lora import LoRAAdapter

from ...unlearn_core.errors import InputError
from ...unlearn_core.formats.lora import LoraLayer, LoraWeights
from ...unlearn_core.method.config import UnlearnConfig
from .conditioning import with_constants
from .family import HostProcess, lora_target_names, model_family
from .latents import image_latent, model_latent

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoraTraining:
    """A LoRA in training on a loaded clone (what :func:`lora_training` yields): the clone, its
    adapters by module name, and the clone as the core's denoiser."""

    clone: object
    adapters: dict[str, torch.nn.Module]
    denoiser: PatcherDenoiser

    def weights(self) -> LoraWeights:
        """The adapters as trained so far; read them inside the block, which releases the clone."""
        return lora_weights(self.clone, self.adapters)


@contextlib.contextmanager
def lora_training(patcher, config: UnlearnConfig, process: HostProcess) -> Iterator[LoraTraining]:
    """:func:`lora_training_clone` with the config's rank, alpha, target layers and seed, and its
    gradient checkpointing; the denoiser reads noise levels through ``process``."""
    with (
        lora_training_clone(patcher, config.lora_rank, config.effective_alpha, config.target_modules,
                            config.seed) as (clone, adapters),
        gradient_checkpointing(clone, config.gradient_checkpointing),
    ):  # fmt: skip
        yield LoraTraining(clone, adapters, PatcherDenoiser(clone, process, adapter_parameters(adapters), adapters))


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


def _alias(tensor: torch.Tensor) -> torch.nn.Parameter:
    """A non-inference tensor over the same storage (no copy), frozen.

    Only plain tensors get one. A quantized weight (ComfyUI's QuantizedTensor, e.g. from a
    scaled-fp8 file) is a wrapper without storage of its own, and the layer dequantizes it into a
    fresh tensor at every forward, layer by layer, before the LoRA adds to it: that tensor, not the
    inference weight, is what autograd keeps."""
    alias = torch.empty(0, dtype=tensor.dtype, device=tensor.device)
    alias.set_(tensor.untyped_storage(), tensor.storage_offset(), tensor.size(), tensor.stride())
    return torch.nn.Parameter(alias, requires_grad=False)


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
    # SD3's network is ComfyUI's MMDiT under a wrapper subclass (OpenAISignatureMMDITWrapper)
    is_mmdit = any(cls.__name__ == "MMDiT" for cls in type(patcher.model.diffusion_model).__mro__)
    return LoraWeights(dict(sorted(layers.items())), "mmdit" if is_mmdit else "comfy")


def with_lora(patcher, lora: dict[str, torch.Tensor], strength: float = 1.0):
    """A clone of ``patcher`` with ``lora`` applied the way the stock LoRA loaders apply it."""
    model, _ = comfy.sd.load_lora_for_models(patcher, None, lora, strength, 0)
    return model


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
