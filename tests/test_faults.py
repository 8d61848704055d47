"""Faults injected during training and while writing files, on the diffusers path.

After every fault: the error says what happened (and at which step), no LoRA or partial file
exists, the base model is bit-identical with no adapter or hook left on it, and the next run
works. Steps at which faults strike are drawn from a fixed seed and appear in the test ids
(ComfyUI's node path has the same faults in tests/comfyui/test_node_faults.py). An exception
inside a step runs on both model families; the other faults on the SD3 transformer.
"""

from __future__ import annotations

import contextlib
import errno
import random
from pathlib import Path

import pytest
import torch
from conftest import NanGradient, assert_bit_identical, make_data, sd3_cond, snapshot, tree
from diffusers import DDPMScheduler

from unlearn_core import DDPMEpsilon, RectifiedFlow, TrainingStopped, UnlearnConfig
from unlearn_core.backends.diffusers_backend import unlearn_diffusers
from unlearn_core.data.forget_set import ForgetSetStore
from unlearn_core.errors import TrainingDiverged
from unlearn_core.formats.lora import load_lora, save_lora

FLOW = RectifiedFlow()
DDPM = DDPMEpsilon.from_scheduler(DDPMScheduler(num_train_timesteps=1000))
STEPS = 6
FAULT_SEED = 2026
_draw = random.Random(FAULT_SEED)
EXCEPTION_STEP, CANCEL_STEP, INTERRUPT_STEP, NAN_LOSS_STEP, NAN_GRADIENT_STEP = (_draw.randint(2, STEPS) for _ in range(5))


def quick(**overrides):
    values = dict(steps=STEPS, learning_rate=1e-3, lora_rank=2, forget_batch_size=1, remember_batch_size=1)
    return UnlearnConfig(**{**values, **overrides})


@pytest.fixture(params=["sd3", "unet"])
def case(request, tiny_sd3, tiny_unet, sd3_data, unet_data):
    if request.param == "sd3":
        return tiny_sd3, FLOW, sd3_data
    return tiny_unet, DDPM, unet_data


@contextlib.contextmanager
def fault_at(model, step: int, fault):
    """Apply ``fault(output)`` to every forward of training step ``step`` (counted by the callback,
    so it does not depend on how many passes a step makes). Yields the callback to pass on."""
    done = {"steps": 0}

    def hook(module, args, output):
        if done["steps"] == step - 1:
            return fault(output)
        return None

    handle = model.register_forward_hook(hook)
    try:
        yield lambda current, total, metrics: done.update(steps=current)
    finally:
        handle.remove()


def first_output(transform):
    """Apply ``transform`` to the first element of a diffusers (tuple) output."""
    return lambda output: (transform(output[0]), *output[1:])


def raise_(error):
    def fault(output):
        raise error

    return fault


def train_and_save(model, process, data, folder: Path, config=None, **hooks) -> Path:
    outcome = unlearn_diffusers(model, process, data, config or quick(), **hooks)
    return save_lora(folder / "forget.safetensors", outcome.lora)


def assert_clean_after(model, before, folder: Path, files_before: dict, process, data):
    assert tree(folder) == files_before, "a failed run left a file"
    assert_bit_identical(model, before)
    saved = train_and_save(model, process, data, folder, quick(steps=1))  # the next run works
    assert load_lora(saved).layers
    assert_bit_identical(model, before)


@pytest.mark.parametrize("step", [EXCEPTION_STEP], ids=lambda s: f"step{s}")
def test_an_exception_inside_a_step_leaves_no_file_and_the_base_untouched(case, tmp_path, step):
    model, process, data = case
    before, files = snapshot(model), tree(tmp_path)
    with fault_at(model, step, raise_(RuntimeError("injected failure inside the step"))) as callback:
        with pytest.raises(RuntimeError, match="injected failure"):
            train_and_save(model, process, data, tmp_path, callback=callback)
    assert_clean_after(model, before, tmp_path, files, process, data)


@pytest.mark.parametrize("step", [INTERRUPT_STEP], ids=lambda s: f"step{s}")
def test_ctrl_c_inside_a_step_leaves_the_base_untouched(tiny_sd3, sd3_data, tmp_path, step):
    before, files = snapshot(tiny_sd3), tree(tmp_path)
    with fault_at(tiny_sd3, step, raise_(KeyboardInterrupt())) as callback:
        with pytest.raises(KeyboardInterrupt):
            train_and_save(tiny_sd3, FLOW, sd3_data, tmp_path, callback=callback)
    assert_clean_after(tiny_sd3, before, tmp_path, files, FLOW, sd3_data)


@pytest.mark.parametrize("step", [CANCEL_STEP], ids=lambda s: f"step{s}")
def test_cancel_at_a_random_step_leaves_no_file_and_the_base_untouched(tiny_sd3, sd3_data, tmp_path, step):
    model, process, data = tiny_sd3, FLOW, sd3_data
    before, files = snapshot(model), tree(tmp_path)
    done = {"steps": 0}
    with pytest.raises(TrainingStopped, match=f"before step {step} of {STEPS}; nothing was saved"):
        train_and_save(model, process, data, tmp_path, callback=lambda current, total, m: done.update(steps=current),
                       should_stop=lambda: done["steps"] == step - 1)  # fmt: skip
    assert done["steps"] == step - 1
    assert_clean_after(model, before, tmp_path, files, process, data)


@pytest.mark.parametrize("step", [NAN_LOSS_STEP], ids=lambda s: f"step{s}")
def test_a_non_finite_loss_stops_training_and_reports_the_step(tiny_sd3, sd3_data, tmp_path, step):
    model, process, data = tiny_sd3, FLOW, sd3_data
    before, files = snapshot(model), tree(tmp_path)
    with fault_at(model, step, first_output(lambda x: x * float("inf"))) as callback:
        with pytest.raises(TrainingDiverged, match=f"diverged at step {step}: the .*loss is not finite") as caught:
            train_and_save(model, process, data, tmp_path, callback=callback)
    assert caught.value.step == step and "Lower the learning rate" in str(caught.value)
    assert_clean_after(model, before, tmp_path, files, process, data)


@pytest.mark.parametrize("step", [NAN_GRADIENT_STEP], ids=lambda s: f"step{s}")
def test_a_non_finite_gradient_stops_training_and_reports_the_step(tiny_sd3, sd3_data, tmp_path, step):
    model, process, data = tiny_sd3, FLOW, sd3_data
    before, files = snapshot(model), tree(tmp_path)
    with fault_at(model, step, first_output(NanGradient.apply)) as callback:
        with pytest.raises(TrainingDiverged, match=f"diverged at step {step}: the gradient is not finite") as caught:
            train_and_save(model, process, data, tmp_path, callback=callback)
    assert caught.value.step == step
    assert_clean_after(model, before, tmp_path, files, process, data)


def test_an_overflowing_loss_from_the_data_stops_at_step_1(tiny_sd3, tmp_path):
    """Finite but absurd surrogates (1e30): the loss overflows on the first step."""
    data = make_data(4, 8, sd3_cond)
    data.forget.surrogates[:] = 1e30
    before, files = snapshot(tiny_sd3), tree(tmp_path)
    with pytest.raises(TrainingDiverged, match="step 1"):
        train_and_save(tiny_sd3, FLOW, data, tmp_path)
    assert_clean_after(tiny_sd3, before, tmp_path, files, FLOW, make_data(4, 8, sd3_cond))


def disk_full_after_half(original):
    def write_bytes(self, data):
        with open(self, "wb") as stream:
            stream.write(bytes(data)[: len(data) // 2])
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    return write_bytes


def test_a_crash_while_writing_the_lora_keeps_the_old_file_and_leaves_no_part(tiny_sd3, sd3_data, tmp_path, monkeypatch):
    old = train_and_save(tiny_sd3, FLOW, sd3_data, tmp_path, quick(steps=1))
    files = tree(tmp_path)
    outcome = unlearn_diffusers(tiny_sd3, FLOW, sd3_data, quick(steps=2, seed=1))
    monkeypatch.setattr(Path, "write_bytes", disk_full_after_half(Path.write_bytes))
    with pytest.raises(OSError, match="No space left"):
        save_lora(old, outcome.lora)
    monkeypatch.undo()
    assert tree(tmp_path) == files, "the old LoRA changed or a partial file was left"
    assert load_lora(old).layers


@pytest.mark.parametrize("existing", [False, True], ids=["new set", "existing set"])
def test_a_crash_while_marking_leaves_the_forget_set_as_it_was(tmp_path, monkeypatch, existing):
    import unlearn_core.data.forget_set as forget_set

    store = ForgetSetStore(tmp_path)
    if existing:
        store.add("faces", torch.rand(8, 8, 3, generator=torch.Generator().manual_seed(1)))
    files = tree(tmp_path)

    def failing_save(tensors, path):
        Path(path).write_bytes(b"partial")
        raise OSError(errno.EIO, "I/O error (injected)")

    monkeypatch.setattr(forget_set, "save_file", failing_save)
    with pytest.raises(OSError, match="injected"):
        store.add("faces", torch.rand(8, 8, 3), latent=torch.zeros(4, 1, 1))
    monkeypatch.undo()
    assert tree(tmp_path) == files, "a failed mark left files behind"
    record, added = store.add("faces", torch.rand(8, 8, 3), latent=torch.zeros(4, 1, 1))  # the next mark works
    assert added and store.load_latent("faces", record) is not None
