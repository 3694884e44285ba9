"""The paper's single-network objectives (docs/method.md)::

    objective    z                    swap roles on the null branch
    dpo          l[w] - l[l]          no
    bdpo         l[w] - M(l[l])       no
    snpo-naive   l[w] - l[l]          yes
    snpo         l[w] - M(l[l])       yes
    sft          (loss = err[chosen]; z = l[chosen] - l[rejected] scores accuracy only)

Preference losses are ``-logsigmoid(z)`` per pair.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor

from snpo.objectives.core import Objective, ObjectiveConfig, PairTerms, bounded_loser_term


def _preference(swap: bool, bounded: bool):
    def fn(terms: PairTerms, config: ObjectiveConfig) -> tuple[Tensor, Tensor]:
        winner, loser = terms.roles(swap)
        if bounded:
            loser = bounded_loser_term(loser, beta=config.beta, mix_lambda=config.mix_lambda,
                                       mix_scale=config.mix_scale)
        logits = winner - loser
        return -F.logsigmoid(logits), logits

    return fn


def _sft(terms: PairTerms, config: ObjectiveConfig) -> tuple[Tensor, Tensor]:
    logits = terms.reward_chosen - terms.reward_rejected
    return terms.err_chosen.to(logits.dtype), logits


SFT = Objective("sft", _sft, has_logit=False, summary="supervised fine-tuning on the chosen images")
DPO = Objective("dpo", _preference(swap=False, bounded=False), summary="Diffusion-DPO")
BDPO = Objective("bdpo", _preference(swap=False, bounded=True), summary="Diff-BDPO (bounded loser term)")
SNPO_NAIVE = Objective("snpo-naive", _preference(swap=True, bounded=False), swaps=True,
                       summary="naive Diff-SNPO (null branch on reversed pairs, unbounded)")
SNPO = Objective("snpo", _preference(swap=True, bounded=True), swaps=True,
                 summary="Diff-SNPO (null branch on reversed pairs, bounded loser term)")
