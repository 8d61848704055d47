r"""Gradient surgery between the forget gradient :math:`g_f` and the remember gradient :math:`g_r`.

METHOD.md section 5. Gradients are flat vectors over all trainable parameters (the trainer
concatenates the LoRA tensors once per pass, so every operation here is one vector op). When
the two conflict (:math:`\langle g_f, g_r\rangle < 0`) the forget gradient loses its component
along :math:`g_r`:

.. math::  g_f \leftarrow g_f - \frac{\langle g_f, g_r\rangle}{\lVert g_r\rVert^2} g_r

so the forget step no longer undoes remembering to first order. Modes:

- ``none``: g = g_f + g_r
- ``project_forget`` (default, the paper's choice): project g_f only
- ``pcgrad_both``: PCGrad, each projected off the other's original (paper Table IV ablation)
"""

from __future__ import annotations

import torch

__all__ = ["SURGERY_MODES", "dot", "project_off", "combine_gradients"]

SURGERY_MODES = ("none", "project_forget", "pcgrad_both")


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """<a, b> of flat vectors, accumulated in float64 so small projections stay exact."""
    return float(torch.dot(a.double(), b.double()))


def project_off(g: torch.Tensor, onto: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """Remove from ``g`` its component along ``onto`` if they conflict.

    Returns the (possibly) projected gradient and whether a projection happened; a
    non-conflicting gradient comes back as the same tensor, untouched.
    """
    inner = dot(g, onto)
    norm_sq = dot(onto, onto)
    if inner >= 0 or norm_sq == 0:
        return g, False
    return g - (inner / norm_sq) * onto, True


def combine_gradients(
    forget: torch.Tensor, remember: torch.Tensor, mode: str = "project_forget"
) -> tuple[torch.Tensor, dict[str, float]]:
    """The update direction g for one step, and stats (cosine of g_f and g_r, whether projected)."""
    if mode not in SURGERY_MODES:
        raise ValueError(f"unknown surgery mode {mode!r}; choose one of {', '.join(SURGERY_MODES)}")
    norms = (dot(forget, forget) * dot(remember, remember)) ** 0.5
    cosine = dot(forget, remember) / norms if norms > 0 else 0.0
    projected = False
    if mode == "project_forget":
        forget, projected = project_off(forget, remember)
    elif mode == "pcgrad_both":
        new_forget, projected = project_off(forget, remember)
        remember, _ = project_off(remember, forget)
        forget = new_forget
    return forget + remember, {"grad_cosine": cosine, "projected": float(projected)}
