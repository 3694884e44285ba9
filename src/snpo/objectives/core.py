"""The shared math of the preference objectives, and their registry: pure tensors, no models.

Every single-network objective is computed from four per-pair errors, each a mean over
channels and pixels of the squared difference between a prediction and the model's own
target::

    err_chosen, err_rejected          policy errors        (gradient flows)
    ref_err_chosen, ref_err_rejected  reference errors     (frozen, no gradient)

and a boolean ``negative`` per pair (True = the pair was trained on the null-condition, i.e.
unconditional, branch). Errors are given by the DATASET's labels; an objective that swaps
winner and loser on the null branch does it itself (``PairTerms.roles``).

The implicit reward of one sample, in logit units (Diffusion-DPO's convention, so published
betas transfer: 2000 for SD1.5, 5000 for SDXL)::

    l[c] = (beta / 2) * (ref_err[c] - err[c])

An objective maps these to a per-pair loss and a per-pair logit ``z`` (whose sign is the
pair's accuracy); :func:`preference_loss` averages the loss and computes the metrics every
objective logs. ``M`` (:func:`bounded_loser_term`) is the bounded (Bounded-DPO) loser term::

    M(l) = (beta / (2k)) * log(lam * exp(r) + 1 - lam),   r = (2k / beta) * l

so ``M(l) >= (beta / (2k)) * log(1 - lam)``: once the loser is pushed down far enough it
stops paying. ``lam = 1`` gives ``M(l) = l``; ``mix_scale=None`` means ``k = beta / 2``.
See docs/method.md for the table of objectives.

A new objective is one file defining an :class:`Objective` plus one
``register_objective(...)`` line in ``snpo/objectives/__init__.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from snpo.errors import ConfigError


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
        return OBJECTIVES[self.objective].swaps


@dataclass(frozen=True)
class PairTerms:
    """What an objective sees of a batch of pairs, by the DATASET's labels."""

    err_chosen: Tensor
    err_rejected: Tensor
    ref_err_chosen: Tensor
    ref_err_rejected: Tensor
    negative: Tensor  # bool, True = null branch
    reward_chosen: Tensor  # l[chosen]
    reward_rejected: Tensor  # l[rejected]

    def roles(self, swap: bool) -> tuple[Tensor, Tensor]:
        """``(l[w], l[l])``: chosen/rejected, or swapped on the null branch when ``swap``."""
        if not swap:
            return self.reward_chosen, self.reward_rejected
        negative = self.negative.to(torch.bool)
        return (torch.where(negative, self.reward_rejected, self.reward_chosen),
                torch.where(negative, self.reward_chosen, self.reward_rejected))


#: ``fn(terms, config) -> (per-pair loss with gradient, per-pair logit z)``
ObjectiveFn = Callable[[PairTerms, ObjectiveConfig], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class Objective:
    """A registered objective: its name (the ``method:`` of its single-network method), the
    loss, and whether it swaps winner and loser on the null branch."""

    name: str
    fn: ObjectiveFn
    swaps: bool = False
    #: False when z is not what the loss optimises (sft: z only scores accuracy)
    has_logit: bool = True
    summary: str = ""


OBJECTIVES: dict[str, Objective] = {}


def register_objective(objective: Objective) -> Objective:
    """Add an objective under its name (a name registered twice is a bug)."""
    if objective.name in OBJECTIVES and OBJECTIVES[objective.name] is not objective:
        raise ValueError(f"objective {objective.name!r} is registered already")
    OBJECTIVES[objective.name] = objective
    return objective


def validate_objective_args(
    objective: str, beta: float, mix_lambda: float, mix_scale: float | None
) -> None:
    """Raise a one-line ConfigError naming the field and the allowed range."""
    if objective not in OBJECTIVES:
        raise ConfigError(f"objective: expected one of {', '.join(OBJECTIVES)}, got {objective!r}")
    if not (isinstance(beta, int | float) and math.isfinite(beta) and beta > 0):
        raise ConfigError(f"beta: expected a finite number > 0, got {beta!r}")
    if not (isinstance(mix_lambda, int | float) and 0 < mix_lambda <= 1):
        raise ConfigError(f"mix_lambda: expected a number in (0, 1], got {mix_lambda!r}")
    if mix_scale is not None and not (
        isinstance(mix_scale, int | float) and math.isfinite(mix_scale) and mix_scale > 0
    ):
        raise ConfigError(f"mix_scale: expected a finite number > 0 or null (= beta/2), got {mix_scale!r}")


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


def pair_terms(
    err_chosen: Tensor, err_rejected: Tensor, ref_err_chosen: Tensor, ref_err_rejected: Tensor,
    negative: Tensor, beta: float,
) -> PairTerms:
    return PairTerms(
        err_chosen, err_rejected, ref_err_chosen, ref_err_rejected, negative.to(torch.bool),
        implicit_reward(err_chosen, ref_err_chosen, beta),
        implicit_reward(err_rejected, ref_err_rejected, beta),
    )


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
    objectives that swap (``snpo``, ``snpo-naive``) winner and loser swap there.
    """
    config = ObjectiveConfig(objective, beta, mix_lambda, mix_scale)
    spec = OBJECTIVES[objective]
    if not spec.has_logit:
        raise ConfigError(f"objective: {objective!r} has no preference logit; use preference_loss")
    terms = pair_terms(err_chosen, err_rejected, ref_err_chosen, ref_err_rejected, negative, beta)
    return spec.fn(terms, config)[1]


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
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
    """Loss (a scalar with gradient) and detached metrics named as docs/method.md lists.

    Metrics: ``loss``, ``rewards/chosen`` and ``rewards/rejected`` (mean implicit reward by
    the dataset's labels), ``rewards/margins`` (their difference), ``rewards/accuracies``
    (fraction of ``z > 0``; for ``sft``, of ``l[chosen] > l[rejected]``),
    ``branch/negative_fraction``, ``branch/{conditional,negative}/{loss,accuracy}`` (NaN when
    the batch has no pair on that branch), ``logratio/chosen`` and ``logratio/rejected``
    (mean ``ref_err - err`` on the conditional branch: a falling ``logratio/chosen`` is the
    collapse signal of the winner's likelihood).
    """
    config = ObjectiveConfig(objective, beta, mix_lambda, mix_scale)
    terms = pair_terms(err_chosen, err_rejected, ref_err_chosen, ref_err_rejected, negative, beta)
    per_pair_loss, logits = OBJECTIVES[objective].fn(terms, config)
    loss = per_pair_loss.mean()
    with torch.no_grad():
        conditional = (~terms.negative).to(logits.dtype)
        null_branch = terms.negative.to(logits.dtype)
        correct = (logits > 0).to(logits.dtype)
        per_pair_loss = per_pair_loss.detach()
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": terms.reward_chosen.detach().mean(),
            "rewards/rejected": terms.reward_rejected.detach().mean(),
            "rewards/margins": (terms.reward_chosen - terms.reward_rejected).detach().mean(),
            "rewards/accuracies": correct.mean(),
            "branch/negative_fraction": null_branch.mean(),
            "branch/conditional/loss": masked_mean(per_pair_loss, conditional),
            "branch/conditional/accuracy": masked_mean(correct, conditional),
            "branch/negative/loss": masked_mean(per_pair_loss, null_branch),
            "branch/negative/accuracy": masked_mean(correct, null_branch),
            "logratio/chosen": masked_mean(
                (ref_err_chosen - err_chosen).detach().to(logits.dtype), conditional
            ),
            "logratio/rejected": masked_mean(
                (ref_err_rejected - err_rejected).detach().to(logits.dtype), conditional
            ),
        }
    return loss, metrics
