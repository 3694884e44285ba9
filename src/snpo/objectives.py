"""Preference objectives for diffusion models: pure tensor math, no models.

Every objective is computed from four per-pair errors, each a mean over channels and pixels
of the squared difference between a prediction and the model's own target:

    err_chosen, err_rejected          policy errors        (gradient flows)
    ref_err_chosen, ref_err_rejected  reference errors     (frozen, no gradient)

and a boolean ``negative`` per pair (True = the pair was trained on the null-condition,
i.e. unconditional, branch). Errors are given by the DATASET's labels; the role swap of the
SNPO objectives happens here.

The implicit reward of one sample, in logit units (Diffusion-DPO's convention, so published
betas transfer: 2000 for SD1.5, 5000 for SDXL)::

    l[c] = (beta / 2) * (ref_err[c] - err[c])

The per-pair logit ``z`` and the loss ``-logsigmoid(z).mean()``:

    objective    z                    swap roles on the null branch
    dpo          l[w] - l[l]          no
    bdpo         l[w] - M(l[l])       no
    snpo-naive   l[w] - l[l]          yes
    snpo         l[w] - M(l[l])       yes
    sft          (loss = mean err[chosen], no logit)

``M`` is the bounded (Bounded-DPO) loser term: the loser's policy likelihood is replaced by
``lam * pi_pol + (1 - lam) * pi_ref``. With likelihood scale ``k`` (``mix_scale``)::

    M(l) = (beta / (2k)) * log(lam * exp(r) + 1 - lam),   r = (2k / beta) * l

so ``M(l) >= (beta / (2k)) * log(1 - lam)``: once the loser is pushed down far enough it
stops paying, and the only way left to raise ``z`` is to raise the winner. ``lam = 1`` gives
``M(l) = l``. ``mix_scale=None`` means ``k = beta / 2`` (the mixture acts in logit units and
the cap is ``-log(1 - lam)`` logits).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

OBJECTIVES: tuple[str, ...] = ("sft", "dpo", "bdpo", "snpo-naive", "snpo")
SWAPPING_OBJECTIVES = frozenset({"snpo-naive", "snpo"})
BOUNDED_OBJECTIVES = frozenset({"bdpo", "snpo"})


@dataclass(frozen=True)
class ObjectiveConfig:
    """The knobs of the preference objectives, validated on construction."""

    objective: str = "snpo"
    beta: float = 2000.0
    mix_lambda: float = 0.9
    mix_scale: float | None = None

    def __post_init__(self) -> None:
        validate_objective_args(self.objective, self.beta, self.mix_lambda, self.mix_scale)

    @property
    def swaps(self) -> bool:
        return self.objective in SWAPPING_OBJECTIVES


def validate_objective_args(
    objective: str, beta: float, mix_lambda: float, mix_scale: float | None
) -> None:
    """Raise a one-line ValueError naming the field and the allowed range."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ValueError(f"beta: expected a finite number > 0, got {beta!r}")
    if not (isinstance(mix_lambda, int | float) and 0 < mix_lambda <= 1):
        raise ValueError(f"mix_lambda: expected a number in (0, 1], got {mix_lambda!r}")
    if mix_scale is not None and not (
        isinstance(mix_scale, int | float) and math.isfinite(mix_scale) and mix_scale > 0
    ):
        raise ValueError(f"mix_scale: expected a finite number > 0 or null (= beta/2), got {mix_scale!r}")


def implicit_reward(err: Tensor, ref_err: Tensor, beta: float) -> Tensor:
    """``l = (beta / 2) * (ref_err - err)`` in float32 (or wider), one value per sample."""
    dtype = torch.promote_types(err.dtype, torch.float32)
    return (beta / 2) * (ref_err.to(dtype) - err.to(dtype))


def bounded_loser_term(
    loser_reward: Tensor, *, beta: float, mix_lambda: float, mix_scale: float | None = None
) -> Tensor:
    """``M(l) = (beta/(2k)) * log(lam * exp((2k/beta) l) + 1 - lam)``, computed with logaddexp.

    Bounded below by ``(beta/(2k)) * log(1 - lam)``; equals ``l`` exactly when ``lam = 1``.
    """
    if mix_lambda == 1:
        return loser_reward
    k = beta / 2 if mix_scale is None else mix_scale
    r = loser_reward * (2 * k / beta)
    # log(lam e^r + 1 - lam) = log1p(lam * expm1(r)): exact at r = 0 (M(0) = 0, so z = 0 at
    # initialisation) and stable for r -> -inf. For large r, expm1 would overflow: use
    # logaddexp there. Both branches see clamped inputs so neither produces inf/NaN gradients.
    small = torch.log1p(mix_lambda * torch.expm1(r.clamp(max=20.0)))
    large = torch.logaddexp(
        r.clamp(min=20.0) + math.log(mix_lambda), torch.full_like(r, math.log1p(-mix_lambda))
    )
    log_mix = torch.where(r <= 20.0, small, large)
    return log_mix * (beta / (2 * k))


def preference_logits(
    err_chosen: Tensor,
    err_rejected: Tensor,
    ref_err_chosen: Tensor,
    ref_err_rejected: Tensor,
    negative: Tensor,
    *,
    objective: str,
    beta: float,
    mix_lambda: float = 0.9,
    mix_scale: float | None = None,
) -> Tensor:
    """The per-pair logit ``z`` (shape ``(B,)``); the loss is ``-logsigmoid(z).mean()``.

    ``negative`` is a bool tensor, True where the pair was trained on the null branch; for
    ``snpo`` and ``snpo-naive`` winner and loser swap there. See the module docstring.
    """
    validate_objective_args(objective, beta, mix_lambda, mix_scale)
    if objective == "sft":
        raise ValueError("objective: 'sft' has no preference logit; use preference_loss")
    reward_chosen = implicit_reward(err_chosen, ref_err_chosen, beta)
    reward_rejected = implicit_reward(err_rejected, ref_err_rejected, beta)
    if objective in SWAPPING_OBJECTIVES:
        negative = negative.to(torch.bool)
        reward_winner = torch.where(negative, reward_rejected, reward_chosen)
        reward_loser = torch.where(negative, reward_chosen, reward_rejected)
    else:
        reward_winner, reward_loser = reward_chosen, reward_rejected
    if objective in BOUNDED_OBJECTIVES:
        reward_loser = bounded_loser_term(
            reward_loser, beta=beta, mix_lambda=mix_lambda, mix_scale=mix_scale
        )
    return reward_winner - reward_loser


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean over ``mask``; NaN when the mask is empty (loggers skip NaN)."""
    count = mask.sum()
    if count == 0:
        return values.new_tensor(float("nan"))
    return (values * mask).sum() / count


def preference_loss(
    err_chosen: Tensor,
    err_rejected: Tensor,
    ref_err_chosen: Tensor,
    ref_err_rejected: Tensor,
    negative: Tensor,
    *,
    objective: str,
    beta: float,
    mix_lambda: float = 0.9,
    mix_scale: float | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (a scalar with gradient) and detached metrics named as METHOD.md lists.

    Metrics: ``loss``, ``rewards/chosen`` and ``rewards/rejected`` (mean implicit reward by
    the dataset's labels), ``rewards/margins`` (their difference), ``rewards/accuracies``
    (fraction of ``z > 0``; for ``sft``, of ``l[chosen] > l[rejected]``),
    ``branch/negative_fraction``, ``branch/{conditional,negative}/{loss,accuracy}`` (NaN when
    the batch has no pair on that branch), ``logratio/chosen`` and ``logratio/rejected``
    (mean ``ref_err - err`` on the conditional branch: a falling ``logratio/chosen`` is the
    collapse signal of the winner's likelihood).
    """
    negative = negative.to(torch.bool)
    reward_chosen = implicit_reward(err_chosen, ref_err_chosen, beta)
    reward_rejected = implicit_reward(err_rejected, ref_err_rejected, beta)
    if objective == "sft":
        validate_objective_args(objective, beta, mix_lambda, mix_scale)
        per_pair_loss = err_chosen.to(reward_chosen.dtype)
        logits = reward_chosen - reward_rejected
    else:
        logits = preference_logits(
            err_chosen, err_rejected, ref_err_chosen, ref_err_rejected, negative,
            objective=objective, beta=beta, mix_lambda=mix_lambda, mix_scale=mix_scale,
        )
        per_pair_loss = -F.logsigmoid(logits)
    loss = per_pair_loss.mean()

    with torch.no_grad():
        conditional = (~negative).to(logits.dtype)
        null_branch = negative.to(logits.dtype)
        correct = (logits > 0).to(logits.dtype)
        per_pair_loss = per_pair_loss.detach()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": reward_chosen.detach().mean(),
            "rewards/rejected": reward_rejected.detach().mean(),
            "rewards/margins": (reward_chosen - reward_rejected).detach().mean(),
            "rewards/accuracies": correct.mean(),
            "branch/negative_fraction": null_branch.mean(),
            "branch/conditional/loss": _masked_mean(per_pair_loss, conditional),
            "branch/conditional/accuracy": _masked_mean(correct, conditional),
            "branch/negative/loss": _masked_mean(per_pair_loss, null_branch),
            "branch/negative/accuracy": _masked_mean(correct, null_branch),
            "logratio/chosen": _masked_mean(
                (ref_err_chosen - err_chosen).detach().to(logits.dtype), conditional
            ),
            "logratio/rejected": _masked_mean(
                (ref_err_rejected - err_rejected).detach().to(logits.dtype), conditional
            ),
        }
    return loss, metrics
