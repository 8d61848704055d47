import pytest
import torch

from unlearn_core.verify.metrics import (
    FeatureCopyDetector,
    PixelCopyDetector,
    Unavailable,
    compare_images,
    copy_similarity,
    load_lpips,
    psnr,
    ssim,
)


def images(seed=0, n=3, size=32):
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_ssim_and_psnr_rank_similarity():
    a = images()
    slightly = (a + 0.02 * torch.randn(a.shape, generator=torch.Generator().manual_seed(1))).clamp(0, 1)
    other = images(5)
    assert torch.allclose(ssim(a, a), torch.ones(3), atol=1e-5)
    assert (ssim(a, slightly) > ssim(a, other)).all()
    assert (psnr(a, slightly) > psnr(a, other)).all()
    assert (psnr(a, a) == 100).all()


def test_lpips_without_its_backbone_is_unavailable_not_a_number(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    result = load_lpips()
    assert isinstance(result, Unavailable) and not result
    assert "missing" in result.reason
    report = compare_images(images(), images(1), result)
    assert isinstance(report["lpips"], str) and report["ssim"] and report["psnr"]


def test_copy_similarity_finds_copies():
    a, b = images(), images(7)
    for detector in (PixelCopyDetector(16), FeatureCopyDetector(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 32 * 32, 8)))):
        same = copy_similarity(detector, a, a)
        assert torch.allclose(same, torch.ones(3), atol=1e-5)
        assert (copy_similarity(detector, a, b) < 0.99).all()


def test_frechet_distance_is_zero_for_the_same_set_and_grows_with_a_shift():
    from unlearn_core.verify.metrics import frechet_distance

    features = torch.randn(64, 16, generator=torch.Generator().manual_seed(0))
    assert abs(frechet_distance(features, features)) < 1e-6
    assert frechet_distance(features, features + 0.5) > frechet_distance(features, features + 0.1) > 0
    assert frechet_distance(features[:1], features) is None, "one sample has no covariance"


def test_frechet_distance_is_fids_formula_also_with_fewer_samples_than_dimensions():
    from unlearn_core.verify.metrics import frechet_distance

    def matrix_root(matrix):
        values, vectors = torch.linalg.eigh(matrix)
        return vectors @ torch.diag(values.clamp_min(0).sqrt()) @ vectors.T

    generator = torch.Generator().manual_seed(1)
    for n, m, d in [(40, 30, 6), (8, 12, 50)]:
        a = torch.randn(n, d, generator=generator, dtype=torch.float64)
        b = 1.5 * torch.randn(m, d, generator=generator, dtype=torch.float64) + 0.3
        cov_a, cov_b = torch.cov(a.T), torch.cov(b.T)
        root = matrix_root(cov_a)
        reference = ((a.mean(0) - b.mean(0)) ** 2).sum() + torch.trace(cov_a + cov_b) - 2 * torch.trace(matrix_root(root @ cov_b @ root))
        assert frechet_distance(a, b) == pytest.approx(float(reference), rel=1e-6)


def test_forgetting_is_judged_only_when_the_base_model_reproduces_the_target():
    from unlearn_core.verify.metrics import judge_forgetting

    kept = judge_forgetting(0.9999, 0.98, forget_threshold=0.7, same_output_level=0.9)
    assert kept.reproduced and kept.forgotten is False and kept.reason.startswith("not forgotten")
    gone = judge_forgetting(0.9999, 0.4, forget_threshold=0.7, same_output_level=0.9)
    assert gone.reproduced and gone.forgotten is True
    at_threshold = judge_forgetting(0.9999, 0.7, forget_threshold=0.7)
    assert at_threshold.forgotten is False, "forgotten means a copy similarity below the threshold"
    # a base model that does not reproduce the target looks "forgotten" whatever the LoRA did
    vacuous = judge_forgetting(0.33, 0.33, forget_threshold=0.7, same_output_level=0.9,
                               why_not_reproduced=["the negative was not recorded"])  # fmt: skip
    assert vacuous.reproduced is False and vacuous.forgotten is None
    assert vacuous.reason.startswith("cannot verify forgetting") and "the negative was not recorded" in vacuous.reason
    assert vacuous.as_dict()["forgotten"] is None
