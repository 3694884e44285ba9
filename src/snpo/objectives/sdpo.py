"""Diffusion-SDPO's winner-preserving safeguard (Fu et al., arXiv 2511.03317; the public code
``AIDC-AI/Diffusion-SDPO``, ``train.py: get_adaptive_lose_l_scale``): pure tensor math.

It is a rule on top of an objective, not an objective. A preference step descends
``a_w grad e_w - a_l grad e_l`` (``a_w, a_l > 0``: the objective's weights on the winner's and
the loser's error). When the two error gradients point the same way, the loser's ascent can
raise the winner's error even as the margin grows: the collapse both SDPO and SNPO's bound
answer. SDPO scales the loser's gradient by ``lam`` in ``[0, 1]`` chosen so that, to first
order, the winner's error still falls by at least ``mu`` of its own descent::

    (-g_w + lam g_l) . g_w <= -mu ||g_w||^2
    lam = min(1, (1 - mu) ||g_w||^2 / <g_w, g_l>)   where <g_w, g_l> > 0
    lam = 1                                         where <g_w, g_l> <= 0 (no conflict)

with the gradients taken in OUTPUT space (the paper's approximation: the same prompt and noise
give the two images nearly the same Jacobian), so that nothing needs a second backward. With
``e = mean((f - target)^2)`` the output-space gradient is ``2 (f - target) / D``; the constant
cancels in ``lam``, so the factor is computed from the residuals ``r = f - target``::

    lam = clamp((1 - mu) ||r_w||^2 / <r_w, r_l>, 0, 1)   where <r_w, r_l> > 0, else 1

``lam`` is detached and multiplies only the GRADIENT of the loser's error
(``e_l.detach() + lam * (e_l - e_l.detach())``): the loss value, the logit and every metric
are those of the objective without the safeguard. The condition ignores the objective's
weights ``a_w, a_l`` (as the paper and its code do): for ``dpo`` they are equal; the bounded
objectives (``bdpo``, ``snpo``) weight the loser by ``M' <= 1`` on top, so the winner is
protected a fortiori.

Scope. The public code computes ONE ``lam`` per micro-batch, from ``||r_w||^2`` and
``<r_w, r_l>`` summed over the micro-batch's pairs (``scope="batch"``). snpo's default is one
``lam`` per pair (``scope="pair"``): it protects every pair's winner rather than the
micro-batch's mean, and it does not depend on how a step's pairs are split into micro-batches
and processes (snpo's reproducibility promise). The winner and loser are the ROLES of the
objective: on the null branch of ``snpo`` / ``snpo-naive`` the rejected image is the winner,
and the safeguard protects it.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from snpo.errors import ConfigError

SCOPES = ("pair", "batch")


def validate_safeguard_args(mu: float, scope: str) -> None:
    """One-line ConfigErrors naming the field."""
    if not (isinstance(mu, int | float) and not isinstance(mu, bool) and math.isfinite(mu) and 0 <= mu <= 1):
        raise ConfigError(f"safeguard_mu: expected a number in [0, 1], got {mu!r}")
    if scope not in SCOPES:
        raise ConfigError(f"safeguard_scope: expected one of {', '.join(SCOPES)}, got {scope!r}")


def safeguard_factor(res_winner: Tensor, res_loser: Tensor, mu: float, scope: str = "pair") -> Tensor:
    """``lam`` per pair (shape ``(B,)``; with ``scope="batch"`` the same value for every pair).

    ``res_winner``, ``res_loser``: the residuals ``prediction - target`` of the winner and the
    loser of each pair (any shape with the pair first), under no gradient. Computed in float64
    for the dot products of large latents, returned as float32, detached.
    """
    validate_safeguard_args(mu, scope)
    w = res_winner.detach().flatten(1).double()
    lo = res_loser.detach().flatten(1).double()
    norm = w.pow(2).sum(dim=1)
    dot = (w * lo).sum(dim=1)
    if scope == "batch":
        norm, dot = norm.sum().expand_as(norm), dot.sum().expand_as(dot)
    conflict = dot > 0
    cap = (1 - mu) * norm / torch.where(conflict, dot, torch.ones_like(dot))
    lam = torch.where(conflict, cap.clamp(0.0, 1.0), torch.ones_like(cap))
    return lam.float()


def scale_gradient(value: Tensor, factor: Tensor) -> Tensor:
    """``value`` unchanged, its gradient multiplied by ``factor`` (detached)."""
    factor = factor.detach().to(value.dtype)
    return value.detach() + factor * (value - value.detach())


def safeguard_errors(
    err_chosen: Tensor, err_rejected: Tensor, res_chosen: Tensor, res_rejected: Tensor,
    negative: Tensor, *, swap: bool, mu: float, scope: str = "pair",
) -> tuple[Tensor, Tensor, Tensor]:
    """The policy errors with the LOSER's gradient scaled by SDPO's ``lam``, and ``lam``.

    Errors and residuals are by the DATASET's labels; the roles are the objective's: the
    loser is the rejected image, or the chosen one on the null branch when ``swap``
    (``snpo``, ``snpo-naive``). Values are unchanged, so the objective's loss, logits and
    metrics are too; only the backward changes.
    """
    loser_is_chosen = negative.to(torch.bool) if swap else torch.zeros_like(negative, dtype=torch.bool)
    mask = loser_is_chosen.view(-1, *([1] * (res_chosen.dim() - 1)))
    res_winner = torch.where(mask, res_rejected, res_chosen)
    res_loser = torch.where(mask, res_chosen, res_rejected)
    lam = safeguard_factor(res_winner, res_loser, mu, scope).to(err_chosen.device)
    chosen = torch.where(loser_is_chosen, scale_gradient(err_chosen, lam), err_chosen)
    rejected = torch.where(loser_is_chosen, err_rejected, scale_gradient(err_rejected, lam))
    return chosen, rejected, lam


__all__ = ["SCOPES", "safeguard_errors", "safeguard_factor", "scale_gradient", "validate_safeguard_args"]
