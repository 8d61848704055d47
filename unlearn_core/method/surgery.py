r"""Gradient surgery between the forget gradient :math:`g_f` and the remember gradient :math:`g_r`.

docs/METHOD.md section 5. Gradients are flat vectors over all trainable parameters (the trainer
concatenates the LoRA tensors once per pass, so every operation here is one vector op). When
the two conflict (:math:`\langle g_f, g_r\rangle < 0`) the forget gradient loses its component
along :math:`g_r`:

.. math::  g_f \leftarrow g_f - \frac{\langle g_f, g_r\rangle}{\lVert g_r\rVert^2} g_r

so the forget step no longer undoes remembering to first order. Modes:

- ``none``: g = g_f + g_r
- ``project_forget`` (default, the paper's choice): project g_f only
- ``pcgrad_both``: PCGrad, each projected off the other's original (paper Table IV ablation)

**Balance (beyond the paper).** With the base model and a fresh LoRA the remember gradient is
one to two orders of magnitude smaller than the forget gradient (the model already fits its
own samples), so AdamW, which normalises the sum, would step almost only along g_f. Before
surgery, ``balance`` bounds the forget gradient relative to the remember gradient, as SISS
does with its normalised forget gradient (Alberti et al., ICLR 2025):

- ``scale``: :math:`g_f \leftarrow \rho\, \lVert g_r\rVert\, g_f / \lVert g_f\rVert` every step;
- ``cap``: the same only when :math:`\lVert g_f\rVert > \rho \lVert g_r\rVert`;
- ``none``: g_f as computed (the paper).
"""

from __future__ import annotations

import math

import torch

__all__ = ["SURGERY_MODES", "BALANCE_MODES", "dot", "project_off", "balance_forget", "combine_gradients"]

SURGERY_MODES = ("none", "project_forget", "pcgrad_both")
BALANCE_MODES = ("none", "scale", "cap")


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


def balance_forget(forget: torch.Tensor, remember: torch.Tensor, mode: str, ratio: float) -> tuple[torch.Tensor, float]:
    """g_f bounded to ``ratio`` times ||g_r|| (see the module docstring); returns it and the factor applied."""
    if mode not in BALANCE_MODES:
        raise ValueError(f"unknown balance mode {mode!r}; choose one of {', '.join(BALANCE_MODES)}")
    forget_norm = dot(forget, forget) ** 0.5
    if mode == "none" or forget_norm == 0:
        return forget, 1.0
    factor = ratio * dot(remember, remember) ** 0.5 / forget_norm
    if mode == "cap" and factor >= 1.0:
        return forget, 1.0
    return forget * factor, factor


def combine_gradients(
    forget: torch.Tensor,
    remember: torch.Tensor,
    mode: str = "project_forget",
    balance: str = "none",
    ratio: float = 0.5,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The update direction g for one step, and what surgery did.

    Stats: ``grad_cosine`` of g_f and g_r, ``grad_norm_ratio`` ||g_f|| / ||g_r|| as computed,
    ``forget_scale`` (the balance factor), ``projected`` (1 when a projection happened) and
    ``projected_fraction``, the norm of what the projection removed over the norm of g_f.
    """
    if mode not in SURGERY_MODES:
        raise ValueError(f"unknown surgery mode {mode!r}; choose one of {', '.join(SURGERY_MODES)}")
    forget_norm, remember_norm = dot(forget, forget) ** 0.5, dot(remember, remember) ** 0.5
    cosine = dot(forget, remember) / (forget_norm * remember_norm) if forget_norm * remember_norm > 0 else 0.0
    ratio_now = forget_norm / remember_norm if remember_norm > 0 else math.inf
    forget, factor = balance_forget(forget, remember, balance, ratio)
    balanced = forget
    projected = False
    if mode == "project_forget":
        forget, projected = project_off(forget, remember)
    elif mode == "pcgrad_both":
        new_forget, projected = project_off(forget, remember)
        remember, _ = project_off(remember, forget)
        forget = new_forget
    balanced_norm = dot(balanced, balanced) ** 0.5
    removed = float(torch.linalg.vector_norm((balanced - forget).double())) / balanced_norm if projected and balanced_norm > 0 else 0.0
    stats = {"grad_cosine": cosine, "grad_norm_ratio": min(ratio_now, 1e12), "forget_scale": factor,
             "projected": float(projected), "projected_fraction": removed}  # fmt: skip
    return forget + remember, stats
