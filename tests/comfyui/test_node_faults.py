"""Instance Unlearn LoRA under faults, and twice in a row, in one ComfyUI process.

Faults strike inside a training step (at steps drawn from a fixed seed, shown in the test ids)
or while the LoRA file is written. After each: no LoRA or partial file, the cached model is
bit-identical with no wrapper, hook or patch left on it, and the next run works. Two normal
runs in a row leave the cached model's weights hashing the same before, between and after,
and give byte-identical, loadable LoRA files that record how to reproduce them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import random
from pathlib import Path

import pytest
import torch
from conftest import NanGradient, tree

from .helpers import TRAIN, assert_same_weights, denoiser_output, run, snapshot, state_hash

pytestmark = pytest.mark.comfyui

STEPS = 5
FAULT_SEED = 2027
_draw = random.Random(FAULT_SEED)
EXCEPTION_STEP, CANCEL_STEP, NAN_LOSS_STEP, NAN_GRADIENT_STEP = (_draw.randint(2, STEPS) for _ in range(4))
FAULTY = dict(TRAIN, steps=STEPS)


@contextlib.contextmanager
def inside_step(monkeypatch, step: int, fault):
    """Run ``fault(x0_prediction)`` in every forward of training step ``step`` of the node."""
    from instance_unlearn.nodes import progress
    from instance_unlearn.nodes.host.adapters import PatcherDenoiser

    done = {"steps": 0}
    original_call, original_predict = progress.TrainingProgress.__call__, PatcherDenoiser.predict_x0

    def record(self, current, total, metrics):
        done["steps"] = current
        return original_call(self, current, total, metrics)

    def predict(self, x_t, t, cond):
        output = original_predict(self, x_t, t, cond)
        return fault(output) if done["steps"] == step - 1 else output

    monkeypatch.setattr(progress.TrainingProgress, "__call__", record)
    monkeypatch.setattr(PatcherDenoiser, "predict_x0", predict)
    try:
        yield done
    finally:
        monkeypatch.undo()


def raise_(error):
    def fault(output):
        raise error

    return fault


@pytest.fixture
def guarded(comfy, loaded, with_surrogates):
    """Before: files and weights. After the test body: nothing written, model pristine, next run works."""
    base = loaded["model"]
    files, weights = tree(comfy["base"]), snapshot(base)
    output = denoiser_output(base, loaded["conditioning"])
    yield base, with_surrogates[0]
    assert tree(comfy["base"]) == files, "a failed run left a file"
    assert_same_weights(base, weights)
    assert torch.equal(denoiser_output(base, loaded["conditioning"]), output)


def next_run_works(node, base, targets):
    from instance_unlearn.nodes.unlearn_lora import InstanceUnlearnLoRA

    assert node["train"] is InstanceUnlearnLoRA
    model, lora, loss, name = run(node["train"], model=base, targets=targets, lora_name="", **dict(TRAIN, steps=1))
    assert name == "" and len(loss["loss"]) == 1 and all(torch.isfinite(v).all() for v in lora.values())


@pytest.mark.parametrize("step", [EXCEPTION_STEP], ids=lambda s: f"step{s}")
def test_an_exception_inside_a_training_step(node, guarded, monkeypatch, step):
    base, targets = guarded
    with inside_step(monkeypatch, step, raise_(RuntimeError("injected failure inside the step"))) as done:
        with pytest.raises(RuntimeError, match="injected failure"):
            run(node["train"], model=base, targets=targets, lora_name="tests/faulty", **FAULTY)
    assert done["steps"] == step - 1
    next_run_works(node, base, targets)


@pytest.mark.parametrize("step", [CANCEL_STEP], ids=lambda s: f"step{s}")
def test_cancel_during_a_random_step(node, guarded, monkeypatch, step):
    import comfy.model_management as management

    base, targets = guarded

    def press_cancel(output):
        management.interrupt_current_processing(True)
        return output

    try:
        with inside_step(monkeypatch, step, press_cancel) as done:
            with pytest.raises(management.InterruptProcessingException):
                run(node["train"], model=base, targets=targets, lora_name="tests/cancelled", **FAULTY)
    finally:
        management.interrupt_current_processing(False)
    # ComfyUI also checks the flag inside the model's forward, so the cancel may act within the step
    assert done["steps"] in (step - 1, step), "the cancel did not act in the step it was pressed in"
    next_run_works(node, base, targets)


@pytest.mark.parametrize("step", [NAN_LOSS_STEP], ids=lambda s: f"step{s}")
def test_a_non_finite_loss_stops_the_node_and_saves_nothing(node, guarded, monkeypatch, step):
    from instance_unlearn.unlearn_core.errors import TrainingDiverged

    base, targets = guarded
    with inside_step(monkeypatch, step, lambda x0: x0 * float("inf")):
        with pytest.raises(TrainingDiverged, match=f"diverged at step {step}: the .*loss is not finite. Nothing was saved"):
            run(node["train"], model=base, targets=targets, lora_name="tests/diverged", **FAULTY)
    next_run_works(node, base, targets)


@pytest.mark.parametrize("step", [NAN_GRADIENT_STEP], ids=lambda s: f"step{s}")
def test_a_non_finite_gradient_stops_the_node_and_saves_nothing(node, guarded, monkeypatch, step):
    from instance_unlearn.unlearn_core.errors import TrainingDiverged

    base, targets = guarded
    with inside_step(monkeypatch, step, NanGradient.apply):
        with pytest.raises(TrainingDiverged, match=f"diverged at step {step}: the gradient is not finite") as caught:
            run(node["train"], model=base, targets=targets, lora_name="tests/diverged", **FAULTY)
    assert caught.value.step == step and "Lower the learning rate" in str(caught.value)
    next_run_works(node, base, targets)


def test_a_crash_while_saving_keeps_the_previous_lora_and_leaves_no_part(comfy, node, loaded, with_surrogates, monkeypatch):
    base, targets = loaded["model"], with_surrogates[0]
    run(node["train"], model=base, targets=targets, lora_name="tests/overwritten", **dict(TRAIN, steps=1))
    files, weights = tree(comfy["base"]), snapshot(base)

    def disk_full(self, data):
        with open(self, "wb") as stream:
            stream.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    monkeypatch.setattr(Path, "write_bytes", disk_full)
    with pytest.raises(OSError, match="No space left"):
        run(node["train"], model=base, targets=targets, lora_name="tests/overwritten", **dict(TRAIN, steps=2, seed=1))
    monkeypatch.undo()
    assert tree(comfy["base"]) == files, "the previous LoRA changed or a partial file was left"
    assert_same_weights(base, weights)


def test_two_runs_in_one_process_leave_the_cached_model_bit_identical_and_repeat_byte_for_byte(comfy, node, loaded,
                                                                                                with_surrogates):  # fmt: skip
    from instance_unlearn.nodes.host.latents import process_latent_in
    from instance_unlearn.unlearn_core import __version__
    from instance_unlearn.unlearn_core.formats.files import tensor_hash
    from instance_unlearn.unlearn_core.formats.lora import REPRODUCTION_KEYS, load_lora

    base, targets = loaded["model"], with_surrogates[0]
    loras = comfy["base"] / "models" / "loras" / "repeat"
    weights = snapshot(base)
    base_outputs = [denoiser_output(base, loaded["conditioning"])]  # also makes the base the loaded model
    hashes = [state_hash(base)]
    outputs = []
    for name in ("first", "second"):
        model, lora, loss, saved = run(node["train"], model=base, targets=targets, lora_name=f"repeat/{name}", **TRAIN)
        assert saved == f"repeat/{name}.safetensors"
        outputs.append(denoiser_output(model, loaded["conditioning"]))  # ComfyUI patches the shared network while loaded
        base_outputs.append(denoiser_output(base, loaded["conditioning"]))  # ... and restores it when the base is used
        hashes.append(state_hash(base))
    assert hashes[0] == hashes[1] == hashes[2], "the cached model changed between runs"
    assert torch.equal(base_outputs[0], base_outputs[1]) and torch.equal(base_outputs[0], base_outputs[2])
    assert not torch.allclose(outputs[0], base_outputs[0], atol=1e-6), "the LoRA changed nothing"
    assert_same_weights(base, weights)
    first, second = (loras / f"{name}.safetensors" for name in ("first", "second"))
    assert first.read_bytes() == second.read_bytes(), "same inputs and seed gave different LoRA bytes"
    assert torch.equal(outputs[0], outputs[1])
    # the second file is a valid LoRA: readable, finite, and the stock loader applies it
    weights_read = load_lora(second)
    assert weights_read.layers and all(torch.isfinite(layer.up).all() for layer in weights_read.layers.values())
    with torch.inference_mode():
        stock = comfy["nodes"].LoraLoaderModelOnly().load_lora_model_only(base, "repeat/second.safetensors", 1.0)[0]
    assert torch.allclose(denoiser_output(stock, loaded["conditioning"]), outputs[1], atol=1e-5, rtol=1e-5)
    # ... and records what reproduces it
    metadata = weights_read.metadata
    assert set(REPRODUCTION_KEYS) <= set(metadata)
    config = json.loads(metadata["unlearn.config"])
    assert config["steps"] == TRAIN["steps"] and config["seed"] == TRAIN["seed"] and config["lora_rank"] == TRAIN["rank"]
    assert json.loads(metadata["unlearn.target_ids"]) == [t.id for t in targets.targets]
    # content hashes of what the trainer saw (the network-space latents), as every caller records them
    network = process_latent_in
    assert json.loads(metadata["unlearn.target_hashes"]) == [tensor_hash(network(base, t.latent[None])[0]) for t in targets.targets]
    assert json.loads(metadata["unlearn.surrogate_hashes"]) == [tensor_hash(network(base, t.surrogate_latent[None])[0])
                                                                for t in targets.targets]  # fmt: skip
    assert json.loads(metadata["unlearn.remember"]) == {"generate": TRAIN["remember_count"], "steps": TRAIN["remember_steps"],
                                                        "seeds": "target seed + 1, + 2, ..."}  # fmt: skip
    assert metadata["unlearn.pack_version"] == __version__ and metadata["unlearn.base_model"].startswith("SD3/FLOW/")
    assert json.loads(metadata["unlearn.base_model_files"]) == ["tiny_sd3.safetensors"]
