r"""Gradient surgery between the forget gradient :math:`g_f` and the remember gradient :math:`g_r`.

METHOD.md section 5. Gradients are lists of tensors (one per trainable parameter) treated as
one flattened vector. When the two conflict (:math:`\langle g_f, g_r\rangle < 0`) the forget
gradient loses its component along :math:`g_r`:

.. math::  g_f \leftarrow g_f - \frac{\langle g_f, g_r\rangle}{\lVert g_r\rVert^2} g_r

so the forget step no longer undoes remembering to first order. Modes:

- ``none``: g = g_f + g_r
- ``project_forget`` (default, the paper's choice): project g_f only
- ``pcgrad_both``: PCGrad, each projected off the other's original (paper Table IV ablation)
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

__all__ = ["SURGERY_MODES", "dot", "project_off", "combine_gradients"]

SURGERY_MODES = ("none", "project_forget", "pcgrad_both")

Gradients = Sequence[torch.Tensor]


def dot(a: Gradients, b: Gradients) -> torch.Tensor:
    """<a, b> over all tensors, accumulated in float64 so tiny projections stay exact."""
    return sum((x.double() * y.double()).sum() for x, y in zip(a, b, strict=True))


def project_off(g: Gradients, onto: Gradients) -> tuple[list[torch.Tensor], bool]:
    """Remove from ``g`` its component along ``onto`` if they conflict.

    Returns the (possibly) projected gradient and whether a projection happened. Non-conflicting
    gradients come back as the same tensors, untouched.
    """
    inner = dot(g, onto)
    norm_sq = dot(onto, onto)
    if inner >= 0 or norm_sq == 0:
        return list(g), False
    coefficient = (inner / norm_sq).to(g[0].dtype)
    return [x - coefficient * y for x, y in zip(g, onto, strict=True)], True


def combine_gradients(
    forget: Gradients, remember: Gradients, mode: str = "project_forget"
) -> tuple[list[torch.Tensor], dict[str, float]]:
    """The update direction g for one step, and stats (cosine, whether projected)."""
    if mode not in SURGERY_MODES:
        raise ValueError(f"unknown surgery mode {mode!r}; choose one of {', '.join(SURGERY_MODES)}")
    inner = dot(forget, remember)
    norms = (dot(forget, forget) * dot(remember, remember)).sqrt()
    cosine = float(inner / norms) if norms > 0 else 0.0
    projected = False
    if mode == "project_forget":
        forget, projected = project_off(forget, remember)
    elif mode == "pcgrad_both":
        new_forget, projected = project_off(forget, remember)
        remember, _ = project_off(remember, forget)
        forget = new_forget
    combined = [f + r for f, r in zip(forget, remember, strict=True)]
    return combined, {"grad_cosine": cosine, "projected": float(projected)}
