"""Verified stopping, the base-prediction remember target and surrogates that are copies, in the
nodes against a real ComfyUI."""

from __future__ import annotations

import json

import pytest
import torch

from .helpers import SURROGATE, TRAIN, assert_same_weights, denoiser_output, run, snapshot

pytestmark = pytest.mark.comfyui

# a check every step, a threshold a trained adapter crosses at once: the mechanism, not the method's quality
# (no repair: one remember-only step brings a target back over so tight a threshold)
CHECKED = dict(TRAIN, steps=10, learning_rate=1e-2, check_every=1, check_margin=0.0, check_nearby=1, forget_threshold=0.999,
               check_confirmations=2, repair_when_forgotten=False)  # fmt: skip


def _metadata(path) -> dict:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        return handle.metadata()


def test_training_stops_once_the_regenerated_target_is_gone(comfy, loaded, node, with_surrogates):
    base = loaded["model"]
    denoiser_output(base, loaded["conditioning"])  # the base loaded: a LoRA another test loaded patches the shared weights
    before = snapshot(base)
    targets = with_surrogates[0]
    model, lora, loss, name = run(node["train"], {"UNIQUE_ID": "8"}, model=base, targets=targets, vae=loaded["vae"],
                                  lora_name="tests/verified", **CHECKED)  # fmt: skip
    verification = json.loads(_metadata(comfy["base"] / "models" / "loras" / "tests" / "verified.safetensors")["unlearn.verification"])
    # the unchanged base model regenerates its own target (the opposite verdict comes first)
    assert verification["verifiable"] == [True] and verification["baseline"]["own_similarity"][0] >= 0.999
    assert verification["stopped_early"] and verification["forgotten_at"][0] is not None
    assert len(loss["loss"]) == verification["forgotten_at"][0] + 1 < CHECKED["steps"]  # confirmed at the next check
    assert loss["forgotten_targets"][-1] == 1.0
    assert_same_weights(base, before)
    # Preserve Check shows what the training check saw beside its own verdict
    _, report_text, _ = run(node["check"], base_model=base, unlearned_model=model, vae=loaded["vae"], targets=targets,
                            preserve_seeds=2, steps=3, forget_threshold=0.999, integrity_threshold=0.0, lora_name=name)  # fmt: skip
    report = json.loads(report_text)
    assert report["training_verification"]["forgotten_at"] == verification["forgotten_at"]
    assert report["targets"][0]["forgotten_at_training_step"] == verification["forgotten_at"][0]


def test_without_the_vae_every_step_is_trained_and_the_file_says_why(comfy, loaded, node, with_surrogates):
    _, _, loss, name = run(node["train"], model=loaded["model"], targets=with_surrogates[0], lora_name="tests/unverified",
                           **CHECKED)  # fmt: skip
    assert len(loss["loss"]) == CHECKED["steps"] and "forgotten_targets" not in loss
    verification = json.loads(_metadata(comfy["base"] / "models" / "loras" / "tests" / "unverified.safetensors")["unlearn.verification"])
    assert "unavailable" in verification["status"] and not verification["stopped_early"]


def _without_seed(targets):
    """The targets as if loaded from image files: no seed recorded."""
    from dataclasses import replace

    return targets.with_targets([replace(t, provenance={k: v for k, v in t.provenance.items() if k != "seed"})
                                 for t in targets.targets])  # fmt: skip


def test_a_target_without_its_seed_gets_its_noise_back_by_inverting_the_sampler(loaded, with_surrogates):
    from instance_unlearn.nodes.host.model import HostModel
    from instance_unlearn.nodes.host.sampling import sampling_noise

    targets = with_surrogates[0]
    target = targets.targets[0]
    made_from = sampling_noise(loaded["model"], tuple(target.latent.shape), 11, 1)  # the marked output: seed 11, image 1
    with torch.inference_mode():
        (noise,), (source,) = HostModel(loaded["model"]).target_noises(_without_seed(targets), steps=3)
        (seeded,), (seed_source,) = HostModel(loaded["model"]).target_noises(targets, steps=3)
    assert source["source"].startswith("recovered by inverting the sampler") and source["why"] == "no recorded seed"
    assert seed_source == {"source": "seed", "seed": 11, "batch_index": 1} and torch.equal(seeded, made_from)
    error = float((noise - made_from).norm() / made_from.norm())
    assert error < 0.05, f"the recovered noise is {error:.3f} (relative) away from the one that made the target"


def test_the_check_verifies_a_target_whose_noise_was_recovered(comfy, loaded, node, with_surrogates):
    """A target that comes without its seed is still verified: the check regenerates it from the
    recovered noise (the base model copies it there, so it counts) and the file says which noise."""
    run(node["train"], model=loaded["model"], targets=_without_seed(with_surrogates[0]), vae=loaded["vae"],
        lora_name="tests/recovered", **CHECKED)  # fmt: skip
    verification = json.loads(_metadata(comfy["base"] / "models" / "loras" / "tests" / "recovered.safetensors")["unlearn.verification"])
    assert verification["noise"][0]["source"].startswith("recovered by inverting the sampler")
    assert verification["verifiable"] == [True] and verification["baseline"]["own_similarity"][0] >= 0.999
    assert verification["stopped_early"] and verification["forgotten_at"][0] is not None


def test_the_host_base_prediction_is_the_model_without_the_adapters(loaded):
    from instance_unlearn.nodes.host.adapters import (
        PatcherDenoiser,
        adapter_parameters,
        lora_training_clone,
    )
    from instance_unlearn.nodes.host.family import training_process

    base = loaded["model"]
    process = training_process(base)
    x, t = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(5)), torch.tensor([0.5])
    conditioning = loaded["conditioning"][0]

    def cond_of(patcher):
        tensors = patcher.model.extra_conds(cross_attn=conditioning[0], pooled_output=conditioning[1]["pooled_output"],
                                            device=x.device, noise=x)  # fmt: skip
        return {k: v.cond for k, v in tensors.items()}

    import comfy.model_management

    with torch.inference_mode():  # the base model's output before any adapter exists
        comfy.model_management.load_models_gpu([base])
        untouched = base.model.apply_model(x, process.sigma(t), **cond_of(base)).clone()
    with torch.inference_mode(False), lora_training_clone(base, 4, 4.0, None, 0) as (clone, adapters):
        with torch.no_grad():
            for adapter in adapters.values():  # a trained-looking adapter (lora_down starts at zero)
                adapter.lora_down.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
            denoiser = PatcherDenoiser(clone, process, adapter_parameters(adapters), adapters)
            cond = cond_of(clone)
            adapted = denoiser.predict_x0(x, t, cond)
            without = denoiser.base_predict_x0(x, t, cond)
            again = denoiser.predict_x0(x, t, cond)
        alphas = {float(adapter.alpha) for adapter in adapters.values()}
    assert adapters, "no layer got an adapter"
    assert torch.allclose(without, untouched, atol=1e-5) and not torch.allclose(adapted, without, atol=1e-4)
    assert torch.equal(adapted, again) and alphas == {4.0}  # switched back on, alpha restored


def test_the_node_trains_with_the_base_remember_target(loaded, node, with_surrogates):
    base = loaded["model"]
    denoiser_output(base, loaded["conditioning"])
    before = snapshot(base)
    _, _, loss, _ = run(node["train"], model=base, targets=with_surrogates[0], lora_name="",
                        **dict(TRAIN, remember_target="base", learning_rate=1e-2))  # fmt: skip
    assert loss["remember_loss"][0] == pytest.approx(0.0, abs=1e-8)  # the adapter starts at zero: no drift yet
    assert max(loss["remember_loss"][1:]) > 0  # and the drift shows once it moves
    assert_same_weights(base, before)


def test_a_surrogate_that_is_a_copy_is_rebuilt(loaded, node, marked):
    targets, _, text = run(node["surrogate"], model=loaded["model"], vae=loaded["vae"], targets=marked,
                           **dict(SURROGATE, strength=0.05), forget_threshold=0.7)  # fmt: skip
    assert "rebuilt" in text, text
    assert not torch.equal(targets.targets[0].surrogate_latent, targets.targets[0].latent)


def test_a_surrogate_the_check_could_never_call_forgotten_is_rebuilt(loaded, node, marked):
    """Within the check's margin (0.05) under the threshold: training towards it ends where the
    check cannot confirm the target gone, so it is rebuilt; a margin further up it is kept."""
    import re

    def build(threshold):
        _, _, text = run(node["surrogate"], model=loaded["model"], vae=loaded["vae"], targets=marked, **SURROGATE,
                         forget_threshold=threshold)  # fmt: skip
        return text

    first = build(0.999)
    score = float(re.search(r"copy similarity (-?[0-9.]+)", first).group(1))
    assert "rebuilt" not in first and score < 0.9, first
    assert "rebuilt" in build(score + 0.02), "a surrogate 0.02 under the threshold is kept"
    assert "rebuilt" not in build(score + 0.06)


def test_a_surrogate_that_cannot_be_rebuilt_and_is_a_copy_is_refused(loaded, node, marked):
    from instance_unlearn.unlearn_core.errors import InputError

    with pytest.raises(InputError, match="copy of its target"):  # noise of std 0: the target itself
        run(node["surrogate"], model=loaded["model"], vae=loaded["vae"], targets=marked,
            **dict(SURROGATE, method="noise", noise_std=0.0))  # fmt: skip
