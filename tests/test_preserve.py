"""The one preserve check (unlearn_core.verify.preserve): reproduction, forgetting by copy similarity, integrity."""

import pytest
import torch

from unlearn_core.errors import InputError
from unlearn_core.verify.metrics import (
    FeatureCopyDetector,
    PixelCopyDetector,
    copy_similarity,
    ssim,
)
from unlearn_core.verify.preserve import (
    PreservePair,
    Replay,
    TargetImages,
    Thresholds,
    check_preservation,
    evaluate,
    paired,
    regenerate,
)

THRESHOLDS = Thresholds(forget_below=0.7, integrity_at_least=0.85)


def picture(seed: int, size: int = 32) -> torch.Tensor:
    """A smooth random image (3, size, size) in [0, 1]: structure SSIM and pixel cosine can see."""
    coarse = torch.rand(1, 3, 4, 4, generator=torch.Generator().manual_seed(seed))
    return torch.nn.functional.interpolate(coarse, size=(size, size), mode="bilinear", align_corners=False)[0]


def pairs(count: int, change: float = 0.0) -> list[PreservePair]:
    out = []
    for index in range(count):
        base = picture(100 + index)
        noise = change * torch.randn(base.shape, generator=torch.Generator().manual_seed(index))
        out.append(PreservePair(base, (base + noise).clamp(0, 1), {"seed": 1000 + index}))
    return out


def test_the_base_model_reproducing_its_own_output_is_not_forgotten():
    target = picture(1)
    report = check_preservation([TargetImages("t", target, target.clone(), target.clone(), seed=5)], pairs(3),
                                PixelCopyDetector(), THRESHOLDS)  # fmt: skip
    row = report.targets[0]
    assert row["reproduced"] is True and row["forgotten"] is False and row["note"].startswith("not forgotten")
    assert row["copy_similarity_unlearned_to_target"] == pytest.approx(1.0, abs=1e-5)
    assert report.summary["forgetting_passed"] is False and report.passed is False
    assert report.summary["integrity_passed"] is True and report.summary["mean_preserve_ssim"] == pytest.approx(1.0, abs=1e-5)


def test_an_unlearned_output_that_is_no_longer_a_copy_is_forgotten_and_the_measure_is_named():
    target, other = picture(1), picture(2)
    detector = PixelCopyDetector()
    similarity = float(copy_similarity(detector, other[None], target[None]))
    assert similarity < THRESHOLDS.forget_below, "the two test pictures must not be copies of each other"
    report = check_preservation([TargetImages("t", target, target.clone(), other, seed=5)], pairs(3), detector, THRESHOLDS)
    row = report.targets[0]
    assert row["forgotten"] is True and row["copy_similarity_unlearned_to_target"] == pytest.approx(similarity)
    assert row["measure"] == "pixel-cosine" and "pixel-cosine" in report.measure["forgetting"]
    assert report.passed is True and report.summary["verdict"].startswith("forgotten: 1/1 (copy similarity, pixel-cosine)")
    assert report.summary["thresholds"] == {"forget_copy_similarity_below": 0.7, "reproduction_ssim_at_least": 0.98,
                                            "integrity_ssim_at_least": 0.85}  # fmt: skip


def test_forgetting_is_judged_by_copy_similarity_not_by_ssim():
    """A change SSIM sees but a copy detector does not (fine noise) is not forgetting."""
    target = picture(1, size=128)
    speckled = (target + 0.25 * torch.randn(target.shape, generator=torch.Generator().manual_seed(3))).clamp(0, 1)
    assert float(ssim(speckled[None], target[None])) < 0.7  # the old SSIM rule would call this forgotten
    report = check_preservation([TargetImages("t", target, target.clone(), speckled)], pairs(2), PixelCopyDetector(), THRESHOLDS)
    assert report.targets[0]["copy_similarity_unlearned_to_target"] > 0.7 and report.targets[0]["forgotten"] is False


def test_a_target_the_base_model_does_not_reproduce_is_never_forgotten():
    target, other = picture(1), picture(2)
    report = check_preservation([TargetImages("t", target, base=other, unlearned=other, replay_problems=("no negative",))],
                                pairs(2), PixelCopyDetector(), THRESHOLDS)  # fmt: skip
    row = report.targets[0]
    assert row["reproduced"] is False and row["forgotten"] is None
    assert row["note"].startswith("cannot verify forgetting: the base model does not reproduce") and "no negative" in row["note"]
    assert report.summary["cannot_verify"] == 1 and report.summary["forgetting_passed"] is False and report.passed is False
    assert report.summary["verdict"].startswith("1 of 1 target(s): cannot verify forgetting")
    missing = check_preservation([TargetImages("t", target, not_regenerated="no recorded seed")], pairs(2),
                                 PixelCopyDetector(), THRESHOLDS)  # fmt: skip
    assert missing.targets[0]["note"] == "cannot verify forgetting: no recorded seed" and missing.targets[0]["forgotten"] is None
    assert missing.summary["forgotten"] == "0/1" and not missing.passed


def test_integrity_fails_when_held_out_outputs_change_and_rows_keep_their_order():
    target, other = picture(1), picture(2)
    changed = pairs(4, change=0.3)
    report = check_preservation([TargetImages("t", target, target.clone(), other)], changed, PixelCopyDetector(), THRESHOLDS)
    assert [row["seed"] for row in report.preserve] == [1000, 1001, 1002, 1003]
    expected = ssim(torch.stack([p.base for p in changed]), torch.stack([p.unlearned for p in changed]))
    assert [row["ssim"] for row in report.preserve] == pytest.approx(expected.tolist())
    assert report.summary["integrity_passed"] is False and report.passed is False
    assert report.summary["feature_distance"] > 0 and report.summary["mean_preserve_lpips"] == "LPIPS not requested"


def test_regenerations_of_another_size_and_mixed_size_pairs_are_compared_at_their_own_sizes():
    target = picture(1, size=32)
    large = torch.nn.functional.interpolate(target[None], size=(64, 64), mode="bilinear", antialias=True)[0]
    mixed = [*pairs(2), PreservePair(picture(7, 48), picture(7, 48), {"seed": 9})]
    report = check_preservation([TargetImages("t", target, large, large)], mixed, PixelCopyDetector(), THRESHOLDS)
    assert report.targets[0]["ssim_base_to_target"] > 0.99 and report.targets[0]["reproduced"] is True
    assert [row["seed"] for row in report.preserve] == [1000, 1001, 9]
    with pytest.raises(InputError, match="differ in size"):
        check_preservation([TargetImages("t", target, target, target)], [PreservePair(picture(1, 32), picture(1, 48))],
                           PixelCopyDetector(), THRESHOLDS)  # fmt: skip


def test_a_semantic_embedder_adds_a_column_no_verdict_uses():
    semantic = FeatureCopyDetector(torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(2), torch.nn.Flatten()), name="clip")
    target, other = picture(1), picture(2)
    plain = check_preservation([TargetImages("t", target, target.clone(), other)], pairs(2), PixelCopyDetector(), THRESHOLDS)
    with_column = check_preservation([TargetImages("t", target, target.clone(), other)], pairs(2), PixelCopyDetector(),
                                     THRESHOLDS, semantic=semantic)  # fmt: skip
    assert "clip_unlearned_to_target" in with_column.targets[0] and "clip" in with_column.preserve[0]
    assert with_column.summary == plain.summary


def test_evaluate_is_the_same_check_on_model_space_batches():
    targets = torch.stack([picture(1), picture(3)])
    unlearned = torch.stack([picture(2), picture(3)])
    base_others = torch.stack([p.base for p in pairs(5)])
    unlearned_others = torch.stack([p.unlearned for p in pairs(5, change=0.05)])
    detector = PixelCopyDetector()
    figures = evaluate(targets * 2 - 1, unlearned * 2 - 1, base_others * 2 - 1, unlearned_others * 2 - 1, detector, 0.7)
    report = check_preservation(
        [TargetImages(str(i), t, t, u) for i, (t, u) in enumerate(zip(targets, unlearned, strict=True))],
        [PreservePair(b, u) for b, u in zip(base_others, unlearned_others, strict=True)], detector, THRESHOLDS)  # fmt: skip
    assert figures.forgotten == [True, False] == [row["forgotten"] for row in report.targets]
    assert figures.target_copy_similarity == pytest.approx([row["copy_similarity_unlearned_to_target"] for row in report.targets], abs=1e-6)
    assert figures.integrity_ssim == pytest.approx(report.summary["mean_preserve_ssim"], abs=1e-6)
    assert figures.feature_distance == pytest.approx(report.summary["feature_distance"], rel=1e-5)


def test_the_check_needs_targets_and_held_out_outputs():
    target = picture(1)
    with pytest.raises(InputError, match="no targets"):
        check_preservation([], pairs(1), PixelCopyDetector(), THRESHOLDS)
    with pytest.raises(InputError, match="at least one preserve seed"):
        check_preservation([TargetImages("t", target, target, target)], [], PixelCopyDetector(), THRESHOLDS)


class NoiseSampler:
    """Each output is its noise (or its seed, as a constant): what the core asked of it shows."""

    def generate(self, prompt, seeds, shape):
        return torch.stack([torch.full(shape, float(seed)) for seed in seeds])

    def generate_from_noise(self, prompt, noise):
        return noise.clone()


def test_a_target_without_a_seed_is_regenerated_from_its_recovered_noise_and_the_row_names_it():
    noise = torch.rand(3, 8, 8)
    replays = [Replay("seeded", picture(0), (3, 8, 8), "p", 2), Replay("recovered", picture(1), (3, 8, 8), "p", None, noise=noise,
                                                                  noise_source="recovered by inverting the sampler"),
               Replay("lost", picture(2), (3, 8, 8), "p", None)]  # fmt: skip
    made = regenerate(NoiseSampler(), lambda x: x, replays, [])
    assert torch.equal(made.targets[0], torch.full((3, 8, 8), 2.0)) and torch.equal(made.targets[1], noise)
    assert made.targets[2] is None
    targets, _ = paired(replays, [], made, made)
    rows = check_preservation(targets, pairs(2), PixelCopyDetector(), Thresholds(0.5, 0.5)).targets
    assert rows[1]["noise"] == "recovered by inverting the sampler" and rows[1]["seed"] is None
    assert "noise" not in rows[0] and rows[2]["forgotten"] is None


def test_the_report_leads_with_the_verdict_in_words_then_the_figures():
    target = picture(1)
    report = check_preservation([TargetImages("t", target, target.clone(), target.clone(), seed=5)], pairs(3),
                                PixelCopyDetector(), THRESHOLDS).as_dict()  # fmt: skip
    assert list(report)[0] == "summary" and list(report)[-1] == "measure"
    assert list(report["summary"])[:2] == ["verdict", "passed"]
    assert report["summary"]["verdict"].startswith("forgotten: 0/1") and "integrity passed" in report["summary"]["verdict"]
