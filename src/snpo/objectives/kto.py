"""Diffusion-KTO's loss (Li et al., NeurIPS 2024, arXiv 2404.04465; the public code
``jacklishufan/diffusion-kto``, ``train_kto_sd_v1.5.py``, its defaults ``--loss kto --halo
sigmoid --bce_offset none``): pure tensor math on per-image errors.

Feedback is per image: ``y = +1`` (desirable, thumbs up) or ``y = -1`` (undesirable). With
snpo's implicit reward of one image, ``l = (beta / 2) (e_ref - e_pol)`` (docs/method.md)::

    z_ref = max(0, mean_j l_j)          the reference point: detached, over the GLOBAL batch
    u_i   = y_i (l_i - z_ref)
    loss  = mean_i w_i (1 - sigmoid(u_i))     w = lambda_D (desirable) or lambda_U (undesirable)

The code writes ``g = e_ref - e_pol``, ``kl = clamp(reduce_mean(g.mean()), min=0)`` and
``sigmoid(sign * beta_dpo * (g - kl))``: its ``beta_dpo`` is snpo's ``beta / 2`` (its default
1000 is ``beta = 2000`` here), and since ``beta > 0`` the clamp commutes with the scale. Its
reference point is the batch mean of ``g`` over every image of the step on every process (an
``accelerator.reduce``), both labels together; KTO's original estimate on mismatched
(image, prompt) pairs is the code's non-default ``--bce_offset original`` and is not
implemented here. snpo computes ``z_ref`` over the whole OPTIMIZER step (every micro-batch of
every process), so gradient accumulation gives the same step as a larger batch
(:mod:`snpo.methods.kto`).
"""

from __future__ import annotations

import torch
from torch import Tensor

from snpo.objectives.core import implicit_reward, masked_mean


def kto_reference_point(reward_sum: Tensor, count: Tensor | int) -> Tensor:
    """``max(0, sum_j l_j / n)``, detached: the reference point from a (global) sum of rewards."""
    return (reward_sum.detach() / count).clamp(min=0.0)


def kto_loss(
    err: Tensor, ref_err: Tensor, desirable: Tensor, reference_point: Tensor, *, beta: float,
    desirable_weight: float = 1.0, undesirable_weight: float = 1.0, negative: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (scalar, with gradient) and detached metrics of one batch of labelled images.

    ``err``/``ref_err``: per-image policy and reference errors; ``desirable``: bool per image;
    ``reference_point``: ``z_ref`` in logit units (a scalar, from :func:`kto_reference_point`
    over the global batch); ``negative``: bool per image, True where the prompt was dropped
    (for the per-branch metrics only; KTO never swaps).

    Metrics: ``loss``; ``rewards/chosen`` and ``rewards/rejected`` (mean ``l`` of the desirable
    and of the undesirable images; NaN when the batch has none); ``rewards/margins`` (their
    difference); ``rewards/accuracies`` (fraction with ``u > 0``); ``kto/reference_point``;
    ``kto/desirable_fraction``; ``branch/...`` as the pair objectives; ``logratio/chosen`` and
    ``logratio/rejected`` (mean ``e_ref - e_pol`` of the desirable / undesirable images on the
    conditional branch).
    """
    reward = implicit_reward(err, ref_err, beta)
    desirable = desirable.to(torch.bool).to(reward.device)
    sign = desirable.to(reward.dtype) * 2 - 1
    u = sign * (reward - reference_point.detach().to(reward.dtype))
    weight = torch.where(desirable, torch.full_like(reward, desirable_weight),
                         torch.full_like(reward, undesirable_weight))
    per_image = weight * (1 - torch.sigmoid(u))
    loss = per_image.mean()
    negative = torch.zeros_like(desirable) if negative is None else negative.to(torch.bool).to(reward.device)
    with torch.no_grad():
        good, bad = desirable.to(reward.dtype), (~desirable).to(reward.dtype)
        conditional, null_branch = (~negative).to(reward.dtype), negative.to(reward.dtype)
        correct = (u > 0).to(reward.dtype)
        per_image = per_image.detach()
        logratio = (ref_err.detach() - err.detach()).to(reward.dtype)
        chosen, rejected = masked_mean(reward.detach(), good), masked_mean(reward.detach(), bad)
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": chosen,
            "rewards/rejected": rejected,
            "rewards/margins": chosen - rejected,
            "rewards/accuracies": correct.mean(),
            "kto/reference_point": reference_point.detach().to(reward.dtype).reshape(()),
            "kto/desirable_fraction": good.mean(),
            "branch/negative_fraction": null_branch.mean(),
            "branch/conditional/loss": masked_mean(per_image, conditional),
            "branch/conditional/accuracy": masked_mean(correct, conditional),
            "branch/negative/loss": masked_mean(per_image, null_branch),
            "branch/negative/accuracy": masked_mean(correct, null_branch),
            "logratio/chosen": masked_mean(logratio, good * conditional),
            "logratio/rejected": masked_mean(logratio, bad * conditional),
        }
    return loss, metrics


def kto_loss_reference(err, ref_err, desirable, *, beta, desirable_weight=1.0, undesirable_weight=1.0):
    """The whole-batch formula in one call (``z_ref`` from this batch): for tests and notebooks."""
    reward = implicit_reward(err, ref_err, beta)
    z = kto_reference_point(reward.sum(), reward.numel())
    return kto_loss(err, ref_err, desirable, z, beta=beta, desirable_weight=desirable_weight,
                    undesirable_weight=undesirable_weight)


__all__ = ["kto_loss", "kto_loss_reference", "kto_reference_point"]
