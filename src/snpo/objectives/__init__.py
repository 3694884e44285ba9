"""Preference objectives: pure tensor math, no models (see ``core`` for the conventions).

    from snpo.objectives import preference_loss
    loss, metrics = preference_loss(e_c, e_r, ref_c, ref_r, negative, objective="snpo", beta=2000)

A new objective is one file defining an ``Objective`` plus one registration line below.
"""

from snpo.objectives.chats import chats_logits, chats_loss
from snpo.objectives.core import (
    OBJECTIVES,
    Objective,
    ObjectiveConfig,
    PairTerms,
    bounded_loser_term,
    implicit_reward,
    masked_mean,
    preference_logits,
    preference_loss,
    register_objective,
    validate_objective_args,
)
from snpo.objectives.single import BDPO, DPO, SFT, SNPO, SNPO_NAIVE

register_objective(SFT)
register_objective(DPO)
register_objective(BDPO)
register_objective(SNPO_NAIVE)
register_objective(SNPO)

__all__ = [
    "OBJECTIVES",
    "Objective",
    "ObjectiveConfig",
    "PairTerms",
    "bounded_loser_term",
    "chats_logits",
    "chats_loss",
    "implicit_reward",
    "masked_mean",
    "preference_logits",
    "preference_loss",
    "register_objective",
    "validate_objective_args",
]
