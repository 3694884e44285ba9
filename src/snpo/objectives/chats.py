"""The CHATS objective: pure tensor math, no models.

CHATS trains two networks from the same reference: ``win`` on the chosen image and ``lose``
on the rejected one, with ONE noise and ONE timestep per pair. From four per-pair errors
(means over channels and pixels of the squared error against the model's own target)::

    err_win_chosen      e_win[w]    win model on the chosen image      (gradient flows)
    err_lose_rejected   e_lose[l]   lose model on the rejected image   (gradient flows)
    ref_err_chosen      e_ref[w]    frozen reference, same inputs      (no gradient)
    ref_err_rejected    e_ref[l]

the per-pair logit (docs/method.md; Diffusion-DPO's beta convention, so CHATS' own
``beta_dpo = 1000`` with no 1/2 is ``beta = 2000`` here) is::

    z = -(beta / 2) * ((e_win[w] - e_ref[w]) + (e_lose[l] - e_ref[l]))
      = l_win[w] + l_lose[l],        l[c] = (beta / 2) * (e_ref[c] - e[c])

and the loss is ``-logsigmoid(z).mean()``. Note the PLUS: unlike DPO, raising ``z`` LOWERS
the lose model's error on the rejected image, i.e. the lose model is trained to FIT the
dis-preferred distribution (it plays the null branch of the CFG-like sampler).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from snpo.objectives.core import implicit_reward, validate_objective_args


def _check_beta(beta: float) -> None:
    validate_objective_args("dpo", beta, 1.0, None)


def chats_logits(
    err_win_chosen: Tensor,
    err_lose_rejected: Tensor,
    ref_err_chosen: Tensor,
    ref_err_rejected: Tensor,
    *,
    beta: float,
) -> Tensor:
    """``z = -(beta/2) * ((e_win[w] - e_ref[w]) + (e_lose[l] - e_ref[l]))``, shape ``(B,)``."""
    _check_beta(beta)
    return implicit_reward(err_win_chosen, ref_err_chosen, beta) + implicit_reward(
        err_lose_rejected, ref_err_rejected, beta
    )


def chats_loss(
    err_win_chosen: Tensor,
    err_lose_rejected: Tensor,
    ref_err_chosen: Tensor,
    ref_err_rejected: Tensor,
    *,
    beta: float,
    prompt_zeroed: Tensor | None = None,
) -> tuple[Tensor, dict[str, Tensor]]:
    """Loss (scalar with gradient) and detached metrics, named like the single-network ones.

    - ``rewards/chosen``: mean ``l_win[w]`` (win model on the chosen image);
    - ``rewards/rejected``: mean ``l_lose[l]`` (lose model on the rejected image: it RISES
      as the lose model fits the rejected image);
    - ``rewards/margins``: mean ``z = rewards/chosen + rewards/rejected`` (the logit whose
      sign is the accuracy; a sum, not a difference, because of the CHATS plus);
    - ``rewards/accuracies``: fraction of ``z > 0``;
    - ``logratio/chosen``: mean ``e_ref[w] - e_win[w]`` (falling = the winner collapses);
    - ``logratio/rejected``: mean ``e_ref[l] - e_lose[l]``;
    - ``chats/lose_prompt_zeroed_fraction`` when ``prompt_zeroed`` is given.
    """
    logits = chats_logits(
        err_win_chosen, err_lose_rejected, ref_err_chosen, ref_err_rejected, beta=beta
    )
    loss = -F.logsigmoid(logits).mean()
    with torch.no_grad():
        reward_chosen = implicit_reward(err_win_chosen, ref_err_chosen, beta)
        reward_rejected = implicit_reward(err_lose_rejected, ref_err_rejected, beta)
        dtype = logits.dtype
        metrics = {
            "loss": loss.detach(),
            "rewards/chosen": reward_chosen.detach().mean(),
            "rewards/rejected": reward_rejected.detach().mean(),
            "rewards/margins": logits.detach().mean(),
            "rewards/accuracies": (logits > 0).to(dtype).mean(),
            "logratio/chosen": (ref_err_chosen - err_win_chosen).detach().to(dtype).mean(),
            "logratio/rejected": (ref_err_rejected - err_lose_rejected).detach().to(dtype).mean(),
        }
        if prompt_zeroed is not None:
            metrics["chats/lose_prompt_zeroed_fraction"] = prompt_zeroed.to(dtype).mean()
    return loss, metrics
