"""The shipped demo models: flags SD3 transformer, shapes DDPM and the flags classifier."""

from __future__ import annotations

import pytest
import torch

from unlearn_core import InputError
from unlearn_core.backends.diffusers_backend import DiffusersDenoiser
from unlearn_core.demo import models as dm
from unlearn_core.diffusion.noise import seeded_noise
from unlearn_core.diffusion.process import DDPMEpsilon, RectifiedFlow
from unlearn_core.diffusion.sampling import sample


@pytest.fixture(scope="module")
def flags():
    return dm.load_flags_model()


@pytest.fixture(scope="module")
def classifier():
    return dm.load_flags_classifier()


def test_shipped_models_load(flags, classifier):
    model, process = flags
    assert isinstance(process, RectifiedFlow) and process.shift == 3.0
    assert not model.training and not any(p.requires_grad for p in model.parameters())
    assert all(p.dtype == torch.float32 for p in model.parameters())
    unet, ddpm = dm.load_shapes_model()
    assert isinstance(ddpm, DDPMEpsilon) and ddpm.num_train_timesteps == 1000
    assert not unet.training and not any(p.requires_grad for p in unet.parameters())
    assert not classifier.training


def test_canonical_flags_are_distinct_and_in_range():
    flags = torch.stack([dm.draw_flag(name) for name in dm.FLAG_CLASSES])
    assert flags.shape == (6, 3, dm.FLAG_SIZE, dm.FLAG_SIZE)
    assert flags.min() >= -1 and flags.max() <= 1
    distances = torch.cdist(flags.flatten(1), flags.flatten(1))
    off_diagonal = distances[~torch.eye(6, dtype=torch.bool)]
    assert off_diagonal.min() > 5.0
    assert torch.equal(dm.draw_flag("italy"), dm.draw_flag("italy"))  # canonical = no randomness


def test_varied_flags_stay_close_to_canonical():
    generator = torch.Generator().manual_seed(0)
    for name in dm.FLAG_CLASSES:
        varied = dm.draw_flag(name, generator)
        assert not torch.equal(varied, dm.draw_flag(name))
        assert (varied - dm.draw_flag(name)).abs().mean() < 0.15


def test_flag_dataset_is_reproducible_and_balanced():
    images, labels = dm.flag_dataset(3, seed=5)
    again, _ = dm.flag_dataset(3, seed=5)
    assert images.shape == (18, 3, 32, 32) and torch.equal(images, again)
    assert torch.bincount(labels).tolist() == [3] * 6


def test_classifier_recognises_canonical_and_varied_flags(classifier):
    canonical = torch.stack([dm.draw_flag(name) for name in dm.FLAG_CLASSES])
    predicted, _ = dm.classify_flags(classifier, canonical)
    assert predicted.tolist() == list(range(6))
    images, labels = dm.flag_dataset(5, seed=123)
    predicted, _ = dm.classify_flags(classifier, images)
    assert (predicted == labels).float().mean() >= 0.95
    assert classifier.features((images + 1) / 2).shape == (30, dm.FlagClassifier.embedding_dim)


def test_sampled_flags_are_mostly_their_class(flags, classifier):
    model, process = flags
    labels = torch.arange(6).repeat_interleave(2)
    noise = seeded_noise(list(range(100, 112)), (3, dm.FLAG_SIZE, dm.FLAG_SIZE))
    images = sample(DiffusersDenoiser(model, process), process, noise, dm.flags_conditioning(labels), steps=12)
    assert torch.isfinite(images).all()
    predicted, _ = dm.classify_flags(classifier, images)
    assert (predicted == labels).float().mean() >= 0.75


def test_shapes_model_samples():
    model, process = dm.load_shapes_model()
    noise = seeded_noise([0, 1], (3, dm.SHAPES_SIZE, dm.SHAPES_SIZE))
    images = sample(DiffusersDenoiser(model, process), process, noise, {}, steps=10)
    assert images.shape == (2, 3, dm.SHAPES_SIZE, dm.SHAPES_SIZE) and torch.isfinite(images).all()
    shapes = dm.draw_shapes_dataset(4, seed=0)
    assert shapes.shape == (4, 3, dm.SHAPES_SIZE, dm.SHAPES_SIZE) and shapes.abs().max() <= 1
    assert torch.equal(shapes, dm.draw_shapes_dataset(4, seed=0))


def test_flags_conditioning_is_deterministic():
    first = dm.flags_conditioning(torch.tensor([0, 1, 1, 5]))
    second = dm.flags_conditioning([0, 1, 1, 5])
    assert first["encoder_hidden_states"].shape == (4, dm.TEXT_TOKENS, dm.TEXT_DIM)
    assert first["pooled_projections"].shape == (4, dm.POOLED_DIM)
    for key in first:
        assert torch.equal(first[key], second[key])
    assert torch.equal(first["pooled_projections"][1], first["pooled_projections"][2])
    assert not torch.equal(first["pooled_projections"][0], first["pooled_projections"][1])
    with pytest.raises(InputError):
        dm.flags_conditioning([6])


def test_missing_weights_raise_input_error(tmp_path):
    for load in (dm.load_flags_model, dm.load_shapes_model, dm.load_flags_classifier):
        with pytest.raises(InputError, match="train_demo_models.py"):
            load(tmp_path)


def test_unknown_flag_is_an_input_error():
    with pytest.raises(InputError, match="unknown flag"):
        dm.draw_flag("atlantis")
