"""Training a model that ComfyUI loads with dynamic VRAM (ModelPatcherDynamic, ComfyUI 0.33 on a GPU).

Dynamic VRAM streams each weight onto the GPU for one op, which a backward pass cannot use; the
node trains on ComfyUI's non-dynamic delegate (the file loaded again by the loader's
cached_patcher_init) and releases it after. ModelPatcherDynamic refuses a CPU load device, so the
test gives the loaded patcher its dynamic identity and its real get_non_dynamic_delegate.
"""

from __future__ import annotations

import pytest
import torch

from .helpers import TRAIN, assert_same_weights, run, snapshot

pytestmark = pytest.mark.comfyui


@pytest.fixture
def dynamic(comfy, loaded):
    import comfy.model_patcher as model_patcher

    if not hasattr(model_patcher, "ModelPatcherDynamic"):
        pytest.skip("this ComfyUI has no dynamic VRAM (no ModelPatcherDynamic)")
    delegates = []

    class DynamicOnCpu(model_patcher.ModelPatcher):
        """ModelPatcherDynamic as a node sees it: dynamic, with ComfyUI's own delegate method."""

        non_dynamic_delegate_model = None

        def is_dynamic(self):
            return True

        def get_non_dynamic_delegate(self):
            delegate = model_patcher.ModelPatcherDynamic.get_non_dynamic_delegate(self)
            delegates.append(delegate)
            return delegate

    patcher = loaded["model"].clone()  # carries the loader's cached_patcher_init
    patcher.__class__ = DynamicOnCpu
    return patcher, delegates


def train(node, model, built, remember, conditioning, **overrides):
    inputs = {**TRAIN, "lora_name": "", "remember_latents": remember, "remember_conditioning": conditioning, **overrides}
    return run(node["train"], model=model, targets=built, **inputs)


def test_a_dynamic_vram_model_trains_on_its_non_dynamic_delegate_and_stays_intact(comfy, loaded, node, with_surrogates,
                                                                                   dynamic):  # fmt: skip
    patcher, delegates = dynamic
    built = with_surrogates[0]
    remember = {"samples": torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))}
    before = snapshot(patcher)
    _, lora, loss, _ = train(node, patcher, built, remember, loaded["conditioning"])
    assert len(delegates) == 1, "training did not ask ComfyUI for the non-dynamic delegate"
    delegate = delegates[0]
    assert not delegate.is_dynamic() and delegate.model is not patcher.model  # its own copy of the network
    assert patcher.non_dynamic_delegate_model is None, "the delegate's copy of the weights is still held"
    assert_same_weights(patcher, before)
    assert all(not getattr(m, "weight_function", None) for m in patcher.model.modules())
    # the delegate holds the same weights, so the LoRA is the one the plain patcher trains
    _, plain, plain_loss, _ = train(node, loaded["model"], built, remember, loaded["conditioning"])
    assert set(lora) == set(plain) and loss["loss"] == pytest.approx(plain_loss["loss"], rel=1e-5)
    for key in plain:
        assert torch.allclose(lora[key], plain[key], atol=1e-6), key


def test_a_dynamic_model_from_a_loader_that_cannot_reload_it_is_refused_with_what_to_do(loaded, node, with_surrogates,
                                                                                         dynamic):  # fmt: skip
    from instance_unlearn.unlearn_core.errors import InputError

    patcher, _ = dynamic
    patcher.cached_patcher_init = None  # a custom loader that registered no factory
    remember = {"samples": torch.zeros(2, 16, 8, 8)}
    with pytest.raises(InputError, match="--disable-dynamic-vram"):
        train(node, patcher, with_surrogates[0], remember, loaded["conditioning"])
    assert patcher.non_dynamic_delegate_model is None

