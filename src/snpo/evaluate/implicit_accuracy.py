"""Model-side evaluation that needs no scorer: implicit preference accuracy.

"Negative alignment quality" (the paper's Table 5) is the implicit accuracy of the network
that serves the NULL branch on REVERSED held-out pairs: for each pair, the DPO logit of the
null-conditioned network against the reference, with winner and loser swapped,

    z = (beta / 2) * [(e_ref[rejected] - e[rejected]) - (e_ref[chosen] - e[chosen])]

averaged over several (timestep, noise) draws shared by both images and both models;
accuracy = fraction of pairs with mean z > 0 (ties count one half). beta only scales z, so
the accuracy does not depend on it. The same function with ``branch="conditional"`` and
``reverse=False`` gives the usual implicit accuracy of the conditional branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from snpo.backbones.base import Backbone, per_sample_mse
from snpo.errors import ConfigError
from snpo.methods.draws import draw_pairs, pair_seed


@torch.no_grad()
def implicit_accuracy(
    backbone: Backbone,
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    branch: str = "null",
    reverse: bool = True,
    draws: int = 8,
    seed: int = 1234,
) -> dict[str, float]:
    """Implicit accuracy of ``model`` against ``reference`` on pairs, on one branch.

    Returns ``{"accuracy", "mean_margin", "pairs"}``; ``mean_margin`` is the mean of
    ``(e_ref - e)[w] - (e_ref - e)[l]`` in error units (multiply by beta/2 for logits).
    """
    if branch not in ("null", "conditional"):
        raise ConfigError(f"branch: expected 'null' or 'conditional', got {branch!r}")
    margins = []
    index = 0
    for batch in batches:
        chosen, rejected, cond = backbone.encode_batch(batch)
        if branch == "null":
            cond = backbone.null_condition(cond)
        n = chosen.shape[0]
        total = torch.zeros(n, dtype=torch.float64)
        for draw in range(draws):
            seeds = [pair_seed(seed, draw, index + i) for i in range(n)]
            drawn = draw_pairs(backbone, chosen, 0.0, seeds)  # the same draws as training's
            noise, timesteps = drawn.noise, drawn.timesteps
            latents = torch.cat([chosen, rejected])
            noise2, t2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
            cond2 = cond  # 2B rows already: chosen images first
            noisy = backbone.add_noise(latents, noise2, t2)
            target = backbone.training_target(latents, noise2, t2)
            err = per_sample_mse(backbone.predict(model, noisy, t2, cond2), target)
            ref_err = per_sample_mse(backbone.predict(reference, noisy, t2, cond2), target)
            gain = (ref_err - err).double().cpu()  # log-likelihood ratio proxy per image
            gain_chosen, gain_rejected = gain.chunk(2)
            total += (gain_rejected - gain_chosen) if reverse else (gain_chosen - gain_rejected)
        margins.append(total / draws)
        index += n
    margin = torch.cat(margins)
    accuracy = ((margin > 0).double() + 0.5 * (margin == 0).double()).mean()
    return {"accuracy": float(accuracy), "mean_margin": float(margin.mean()), "pairs": int(len(margin))}
