"""Image metrics for forgetting and integrity (docs/METHOD.md section 8).

All functions take image batches (N, C, H, W) with values in [0, 1] (:func:`to_unit` maps model
space [-1, 1] there) and return per-sample tensors (N,). LPIPS needs a pretrained backbone that cannot be downloaded everywhere: when it
is missing, :func:`load_lpips` returns an :class:`Unavailable` that says why, never a number
computed from random weights.

Copy similarity (did the model reproduce the target?) is pluggable: any
:class:`CopyDetector` embeds images; the score is the cosine of embeddings. An SSCD TorchScript
file (the paper's detector, score < 0.4 = forgotten) plugs in with :class:`TorchScriptCopyDetector`.

:func:`judge_forgetting` is the verdict on one target; :mod:`unlearn_core.verify.preserve` runs the
whole preserve check on these metrics.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from pytorch_msssim import ssim as _ssim

from ..errors import InputError

__all__ = [
    "to_unit",
    "ssim",
    "psnr",
    "Unavailable",
    "load_lpips",
    "CopyDetector",
    "PixelCopyDetector",
    "FeatureCopyDetector",
    "TorchScriptCopyDetector",
    "copy_similarity",
    "compare_images",
    "frechet_distance",
    "SAME_OUTPUT_SSIM",
    "ForgettingVerdict",
    "judge_forgetting",
]

log = logging.getLogger(__name__)


def at_size(image: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(3, H, W) -> a batch of one at ``like``'s height and width (bilinear, antialiased), for
    comparing a regeneration or a surrogate with its target."""
    batch = image.float().unsqueeze(0)
    if batch.shape[-2:] != like.shape[-2:]:
        batch = F.interpolate(batch, size=like.shape[-2:], mode="bilinear", antialias=True).clamp(0, 1)
    return batch


def to_unit(images: torch.Tensor) -> torch.Tensor:
    """Model space [-1, 1] -> [0, 1]."""
    return ((images.float() + 1) / 2).clamp(0, 1)


def _check_pair(a: torch.Tensor, b: torch.Tensor) -> None:
    if a.shape != b.shape or a.dim() != 4:
        raise InputError(f"images to compare must be equal-shaped batches, got {tuple(a.shape)} and {tuple(b.shape)}")


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Structural similarity per image (1 = identical)."""
    _check_pair(a, b)
    side = min(a.shape[-2:])
    window = min(11, side if side % 2 else side - 1)
    return _ssim(a.float(), b.float(), data_range=1.0, size_average=False, win_size=max(window, 3))


def psnr(a: torch.Tensor, b: torch.Tensor, cap: float = 100.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (identical images give ``cap``)."""
    _check_pair(a, b)
    mse = (a.float() - b.float()).pow(2).flatten(1).mean(1)
    return torch.where(mse > 0, -10 * torch.log10(mse.clamp_min(1e-20)), torch.full_like(mse, cap)).clamp_max(cap)


@dataclass(frozen=True)
class Unavailable:
    """A metric that could not be computed, and why."""

    reason: str

    def __bool__(self) -> bool:
        return False


_LPIPS_BACKBONES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth", "squeeze": "squeezenet1_1-b8a52dc0.pth"}


def load_lpips(net: str = "alex", allow_download: bool = False):
    """An LPIPS model, or :class:`Unavailable` when its pretrained backbone is not at hand.

    The lpips package ships its linear heads; the torchvision backbone comes from the torch hub
    cache (``$TORCH_HOME/hub/checkpoints``). With ``allow_download`` a missing backbone is fetched.
    """
    if net not in _LPIPS_BACKBONES:
        raise InputError(f"LPIPS net {net!r} unknown; choose one of {', '.join(_LPIPS_BACKBONES)}")
    checkpoint = Path(torch.hub.get_dir()) / "checkpoints" / _LPIPS_BACKBONES[net]
    if not checkpoint.is_file() and not allow_download:
        return Unavailable(f"LPIPS unavailable: backbone weights {checkpoint} are missing (no download allowed)")
    try:
        import lpips

        model = lpips.LPIPS(net=net, verbose=False).eval()
    except Exception as error:  # download or file errors: report, never fall back to random weights
        return Unavailable(f"LPIPS unavailable: {type(error).__name__}: {error}")
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


@torch.no_grad()
def lpips_distance(model, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    _check_pair(a, b)
    return model(a.float() * 2 - 1, b.float() * 2 - 1).flatten()


class CopyDetector:
    """Embeds images so that copies land close together (cosine similarity)."""

    name = "copy-detector"

    def embed(self, images: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class PixelCopyDetector(CopyDetector):
    """Mean-centred pixels at low resolution: an offline proxy with no learned features."""

    name = "pixel-cosine"

    def __init__(self, size: int = 32):
        self.size = size

    def embed(self, images):
        small = F.interpolate(images.float(), size=(self.size, self.size), mode="area")
        flat = small.flatten(1)
        return flat - flat.mean(dim=1, keepdim=True)


class FeatureCopyDetector(CopyDetector):
    """Any torch module mapping images in [0, 1] to feature vectors (a classifier's penultimate layer)."""

    def __init__(self, module: torch.nn.Module, name: str = "features"):
        self.module = module.eval()
        self.name = name

    @torch.no_grad()
    def embed(self, images):
        return self.module(images.float()).flatten(1)


class TorchScriptCopyDetector(CopyDetector):
    """An SSCD-style TorchScript descriptor model (e.g. sscd_disc_mixup.torchscript.pt)."""

    name = "sscd"
    _MEAN = torch.tensor([0.485, 0.456, 0.406]).reshape(1, 3, 1, 1)
    _STD = torch.tensor([0.229, 0.224, 0.225]).reshape(1, 3, 1, 1)

    def __init__(self, path: str | os.PathLike, size: int = 288):
        if not Path(path).is_file():
            raise InputError(f"copy-detector file {str(path)!r} does not exist")
        try:
            self.module = torch.jit.load(str(path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as error:  # not a TorchScript archive, or a damaged one
            raise InputError(
                f"copy-detector file {str(path)!r} is not a TorchScript model ({type(error).__name__}); "
                "give an SSCD TorchScript file such as sscd_disc_mixup.torchscript.pt"
            ) from None
        self.size = size

    @torch.no_grad()
    def embed(self, images):
        resized = F.interpolate(images.float(), size=(self.size, self.size), mode="bilinear", antialias=True)
        return self.module((resized - self._MEAN) / self._STD)


def copy_similarity(detector: CopyDetector, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of copy embeddings per pair (1 = the same image)."""
    _check_pair(a, b)
    return F.cosine_similarity(detector.embed(a), detector.embed(b), dim=1)


def compare_images(a: torch.Tensor, b: torch.Tensor, lpips_model=None) -> dict[str, list[float] | str]:
    """SSIM, PSNR and (when available) LPIPS for each pair, as plain lists for reports."""
    result: dict[str, list[float] | str] = {"ssim": ssim(a, b).tolist(), "psnr": psnr(a, b).tolist()}
    if isinstance(lpips_model, Unavailable) or lpips_model is None:
        result["lpips"] = lpips_model.reason if lpips_model is not None else "LPIPS not requested"
    else:
        result["lpips"] = lpips_distance(lpips_model, a, b).tolist()
    return result


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float | None:
    r"""Fréchet distance between Gaussian fits of two feature sets (FID's formula), or None with
    fewer than two samples on a side (no covariance).

    .. math:: \lVert \mu_a - \mu_b \rVert^2 + \operatorname{tr} C_a + \operatorname{tr} C_b
              - 2 \operatorname{tr} (C_a^{1/2} C_b C_a^{1/2})^{1/2}

    With centred samples :math:`A` (n x d) and :math:`B` (m x d), :math:`C_a C_b` has the same
    non-zero eigenvalues as :math:`(A B^\top)(A B^\top)^\top / ((n-1)(m-1))`, so the last trace
    is the sum of the singular values of the n x m matrix :math:`A B^\top` over
    :math:`\sqrt{(n-1)(m-1)}`: exact, stable when the covariances are singular (fewer samples
    than feature dimensions, the usual case), and cheap for wide features such as pixels.
    """
    if a.dim() != 2 or b.dim() != 2 or a.shape[1] != b.shape[1]:
        raise InputError(f"feature sets must be (n, d) and (m, d), got {tuple(a.shape)} and {tuple(b.shape)}")
    n, m = len(a), len(b)
    if n < 2 or m < 2:
        return None
    a, b = a.double(), b.double()
    centred_a, centred_b = a - a.mean(0), b - b.mean(0)
    trace_a = centred_a.pow(2).sum() / (n - 1)
    trace_b = centred_b.pow(2).sum() / (m - 1)
    trace_root = torch.linalg.svdvals(centred_a @ centred_b.T).sum() / math.sqrt((n - 1) * (m - 1))
    mean_gap = (a.mean(0) - b.mean(0)).pow(2).sum()
    return float(mean_gap + trace_a + trace_b - 2 * trace_root)


#: SSIM at which a regeneration counts as the same output: replaying the recorded settings on the
#: same model gives about 0.9999 (a saved 8-bit image of it about 0.999); a different negative or
#: cfg gives about 0.3 on SD3, but on a smooth decoder (ComfyUI 0.3.x's tiny test VAE) as much as
#: 0.91, so the bar sits well above any other output.
SAME_OUTPUT_SSIM = 0.98


@dataclass(frozen=True)
class ForgettingVerdict:
    """Whether one target is forgotten, and whether that can be told at all.

    Forgetting is only meaningful when the *base* model, replaying the target's recorded settings,
    reproduces the target: otherwise the unlearned model's output differs from the target
    whatever the LoRA did, and ``forgotten`` is None with the reason. Reproduction is measured
    by SSIM (an exact replay is a pixel match); forgetting by copy similarity (the method's
    definition: the target is no longer a copy).
    """

    reproduction_ssim: float
    unlearned_similarity: float
    reproduced: bool
    forgotten: bool | None
    reason: str

    def as_dict(self) -> dict:
        return {"reproduction_ssim": self.reproduction_ssim, "similarity_unlearned_to_target": self.unlearned_similarity,
                "reproduced": self.reproduced, "forgotten": self.forgotten, "reason": self.reason}  # fmt: skip


def judge_forgetting(
    reproduction_ssim: float,
    unlearned_similarity: float,
    forget_threshold: float,
    same_output_level: float = SAME_OUTPUT_SSIM,
    why_not_reproduced: list[str] | None = None,
) -> ForgettingVerdict:
    """The verdict on one target: the base model's regeneration must reach ``same_output_level``
    in SSIM to the target; the target is then forgotten when the unlearned model's regeneration
    has a copy similarity to it below ``forget_threshold``."""
    if reproduction_ssim < same_output_level:
        causes = "; ".join(why_not_reproduced or []) or "the model, the sampler settings or the host differ from those that made it"
        reason = (f"cannot verify forgetting: the base model does not reproduce this target (SSIM "
                  f"{reproduction_ssim:.3f} < {same_output_level:g}); {causes}")  # fmt: skip
        return ForgettingVerdict(reproduction_ssim, unlearned_similarity, False, None, reason)
    forgotten = unlearned_similarity < forget_threshold
    reason = (f"{'forgotten' if forgotten else 'not forgotten'}: the unlearned model's regeneration has copy similarity "
              f"{unlearned_similarity:.3f} {'<' if forgotten else '>='} {forget_threshold:g} to the target "
              f"(the base model reproduces it: SSIM {reproduction_ssim:.3f})")  # fmt: skip
    return ForgettingVerdict(reproduction_ssim, unlearned_similarity, True, forgotten, reason)
