"""Running the pack's V3 nodes in-process the way ComfyUI's executor does."""

from __future__ import annotations

import torch

SIZE = 64  # pixels; latents are 8x8

TRAIN = dict(steps=4, learning_rate=1e-3, rank=4, forget_batch_size=2, remember_batch_size=2, remember_count=2,
             remember_steps=2, weighting="power", gamma=1.0, surgery="project_forget", method="surrogate", seed=0,
             dtype="float32", gradient_checkpointing=False)  # fmt: skip
SURROGATE = dict(method="sdedit", strength=0.6, seed=0, steps=4, cfg=2.0, sampler_name="euler",
                 scheduler="sgm_uniform", noise_std=0.1)  # fmt: skip


def prepared(node_cls, hidden: dict | None = None):
    """The node class as the executor prepares it, with its hidden inputs (ComfyUI 0.33 takes them
    inside its V3 data, 0.3.x as they are)."""
    import inspect

    if "v3_data" in inspect.signature(node_cls.PREPARE_CLASS_CLONE).parameters:
        return node_cls.PREPARE_CLASS_CLONE({"hidden_inputs": hidden or {}})
    return node_cls.PREPARE_CLASS_CLONE(hidden or {})


def run(node_cls, hidden: dict | None = None, **inputs):
    """Execute a V3 node class (with its hidden inputs) under inference mode, like a prompt."""
    node = prepared(node_cls, hidden)
    with torch.inference_mode():
        return node.execute(**inputs).result


def generate(comfy_nodes, model, vae, conditioning, seed: int, batch: int = 2, steps: int = 3, cfg: float = 2.0, negative=None,
             channels: int = 16):  # fmt: skip
    """A batch through the stock KSampler and VAEDecode: (latent dict, images); the negative
    defaults to a zeroed prompt."""
    with torch.inference_mode():
        empty = {"samples": torch.zeros(batch, channels, SIZE // 8, SIZE // 8)}
        if negative is None:
            negative = [[torch.zeros_like(conditioning[0][0]), {k: torch.zeros_like(v) for k, v in conditioning[0][1].items()
                                                                if isinstance(v, torch.Tensor)}]]  # fmt: skip
        latent = comfy_nodes.KSampler().sample(model, seed, steps, cfg, "euler", "sgm_uniform", conditioning, negative, empty)[0]
        images = comfy_nodes.VAEDecode().decode(vae, latent)[0]
    return latent, images


def prompt_for(seed: int, steps: int = 3, cfg: float = 2.0) -> tuple[dict, str]:
    """A hidden PROMPT graph in which node '9' (Mark) is fed by VAEDecode <- KSampler <- UNETLoader,
    the KSampler's negative coming from a text encode node."""
    prompt = {
        "1": {"class_type": "UNETLoader", "inputs": {"unet_name": "tiny_sd3.safetensors", "weight_dtype": "default"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["5", 0]}},
        "3": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "seed": seed, "steps": steps, "cfg": cfg,
                                                   "sampler_name": "euler", "scheduler": "sgm_uniform", "denoise": 1.0,
                                                   "negative": ["2", 0]}},
        "4": {"class_type": "VAEDecode", "inputs": {"samples": ["3", 0]}},
        "9": {"class_type": "InstanceUnlearn_MarkUndesired", "inputs": {"images": ["4", 0], "latent": ["3", 0]}},
    }  # fmt: skip
    return prompt, "9"


def denoiser_output(model, conditioning, seed: int = 5) -> torch.Tensor:
    """One x0 prediction of a patcher at a fixed input: compares models bit for bit."""
    import comfy.model_management
    import comfy.sample

    generator = torch.Generator().manual_seed(seed)
    channels = model.model.latent_format.latent_channels
    x = comfy.sample.fix_empty_latent_channels(model, torch.randn(1, channels, SIZE // 8, SIZE // 8, generator=generator))
    with torch.inference_mode():
        comfy.model_management.load_models_gpu([model])
        extra = {k: v for k, v in conditioning[0][1].items() if isinstance(v, torch.Tensor)}  # the encoder's tensors
        tensors = model.model.extra_conds(cross_attn=conditioning[0][0], device=x.device, noise=x, **extra)
        kwargs = {k: v.cond for k, v in tensors.items()}
        return model.model.apply_model(x, torch.tensor([0.6]), **kwargs).clone()


def snapshot(model) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.model.state_dict().items()}


def state_hash(model) -> str:
    """sha256 over every tensor of the network (names, dtypes, shapes, bytes)."""
    import hashlib

    digest = hashlib.sha256()
    for key, value in sorted(model.model.state_dict().items()):
        tensor = value.detach().cpu().contiguous()
        digest.update(f"{key}{tensor.dtype}{tuple(tensor.shape)}".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def assert_same_weights(model, before):
    """Bit-identical weights, and nothing of a training run left on the shared network or patcher."""
    after = model.model.state_dict()
    assert set(after) == set(before)
    for key, value in before.items():
        assert torch.equal(after[key], value), key
    modules = list(model.model.named_modules())
    leftovers = [n for n, m in modules if getattr(m, "weight_function", None) or getattr(m, "bias_function", None)]
    assert leftovers == [], f"wrappers left on the shared model: {leftovers[:3]}"
    hooked = [n for n, m in modules if m._forward_hooks or m._forward_pre_hooks or m._backward_hooks]
    assert hooked == [], f"hooks left on the shared model: {hooked[:3]}"
    patched = [n for n, m in modules if "forward" in vars(m)]
    assert patched == [], f"a replaced forward was left on: {patched[:3]}"
    assert not model.object_patches and not model.weight_wrapper_patches, "patches left on the cached patcher"
