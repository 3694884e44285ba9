"""MaPO, margin-aware preference optimization without a reference (Hong et al., arXiv
2406.06424; the public code ``mapo-t2i/mapo``, ``utils.py: compute_loss``): pure tensor math.

Per pair, with the POLICY's per-element mean errors only (no reference model at all)::

    phi(e) = s e / (exp(s e) - 1)                the code's likelihood proxy (s = snr_value)
    z      = T (phi(e_w) - phi(e_l))             the margin (log-odds) logit, T = num_train_timesteps
    loss   = mean(e_w) - beta_mapo * mean(logsigmoid(z))

``phi`` falls from 1 (``e = 0``) as the error grows, so a positive ``z`` means the winner is
the likelier image; the first term is plain likelihood training on the winner (SFT). The
code's defaults: ``beta_mapo = 0.1``, ``snr_value = 0.5``; ``T = 1000`` (the scheduler's
``num_train_timesteps``; snpo reads it from the backbone, 1000 for SD, SDXL, SD3 and FLUX).
Nothing in MaPO uses snpo's ``beta``. ``expm1`` keeps ``phi`` exact near ``e = 0``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from snpo.objectives.core import masked_mean


def likelihood_proxy(err: Tensor, snr: float) -> Tensor:
    """``phi(e) = s e / (exp(s e) - 1)``, with ``phi(0) = 1`` (float32 or wider)."""
    x = snr * err.to(torch.promote_types(err.dtype, torch.float32))
    small = x.abs() < 1e-6
    safe = torch.where(small, torch.ones_like(x), x)
    return torch.where(small, 1 - x / 2, safe / torch.expm1(safe))


def mapo_logits(err_winner: Tensor, err_loser: Tensor, *, snr: float, timesteps: int) -> Tensor:
    """``z = T (phi(e_w) - phi(e_l))`` per pair."""
    return timesteps * (likelihood_proxy(err_winner, snr) - likelihood_proxy(err_loser, snr))


def mapo_loss(
    err_chosen: Tensor, err_rejected: Tensor, *, beta: float, snr: float, timesteps: int,
    negative: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (scalar, with gradient) and detached metrics; errors by the dataset's labels.

    Metrics: ``loss``; ``mapo/sft_loss`` (mean ``e_chosen``); ``mapo/margin_loss`` (``-mean
    logsigmoid(z)``, before ``beta``); ``rewards/chosen`` and ``rewards/rejected`` (mean
    ``T phi(e)``: MaPO's scaled likelihood proxy, not a log-ratio: there is no reference);
    ``rewards/margins`` (mean ``z``); ``rewards/accuracies`` (fraction ``z > 0``); the branch
    metrics of the pair objectives; ``logratio/*`` are NaN (no reference to compare with).
    """
    logits = mapo_logits(err_chosen, err_rejected, snr=snr, timesteps=timesteps)
    margin = -F.logsigmoid(logits)
    sft = err_chosen.to(logits.dtype)
    loss = sft.mean() + beta * margin.mean()
    negative = torch.zeros_like(logits, dtype=torch.bool) if negative is None else negative.to(torch.bool)
    with torch.no_grad():
        per_pair = (sft + beta * margin).detach()
        conditional, null_branch = (~negative).to(logits.dtype), negative.to(logits.dtype)
        correct = (logits > 0).to(logits.dtype)
        nan = logits.new_tensor(float("nan"))
        metrics = {
            "loss": loss.detach(),
            "mapo/sft_loss": sft.detach().mean(),
            "mapo/margin_loss": margin.detach().mean(),
            "rewards/chosen": (timesteps * likelihood_proxy(err_chosen, snr)).detach().mean(),
            "rewards/rejected": (timesteps * likelihood_proxy(err_rejected, snr)).detach().mean(),
            "rewards/margins": logits.detach().mean(),
            "rewards/accuracies": correct.mean(),
            "branch/negative_fraction": null_branch.mean(),
            "branch/conditional/loss": masked_mean(per_pair, conditional),
            "branch/conditional/accuracy": masked_mean(correct, conditional),
            "branch/negative/loss": masked_mean(per_pair, null_branch),
            "branch/negative/accuracy": masked_mean(correct, null_branch),
            "logratio/chosen": nan,
            "logratio/rejected": nan,
        }
    return loss, metrics


__all__ = ["likelihood_proxy", "mapo_logits", "mapo_loss"]
