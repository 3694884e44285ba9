"""Model-side evaluation that needs no scorer: implicit preference accuracy.

"Negative alignment quality" (the paper's Table 5) is the implicit accuracy of the network
that serves the NULL branch on REVERSED held-out pairs: for each pair and each (timestep,
noise) draw shared by both images and both models, the DPO logit of the null-conditioned
network against the reference, with winner and loser swapped,

    z = (beta / 2) * [(e_ref[rejected] - e[rejected]) - (e_ref[chosen] - e[chosen])]

Diffusion-DPO's implicit accuracy is the fraction of positive margins for ONE draw; snpo
averages that over draws and pairs (``accuracy``, the headline, comparable with the paper's
31.86 / 52.34 / 63.80 / 57.45). Averaging the margin over the draws BEFORE taking the sign
(``accuracy_averaged_margin``) inflates the number (a per-draw accuracy of 57% reads 63-68%
with 8 draws) and is reported only as a second, labelled column. Ties count one half; beta
only scales z, so neither depends on it. The same function with ``branch="conditional"``
and ``reverse=False`` gives the usual implicit accuracy of the conditional branch.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from torch import nn

from snpo.backbones.base import Backbone, per_sample_mse
from snpo.errors import ConfigError
from snpo.methods.draws import draw_pairs, pair_seed


def accuracy_from_margins(margins: np.ndarray) -> dict[str, Any]:
    """Accuracies from a (draws, pairs) array of margins (ties count one half).

    ``accuracy``: mean over draws and pairs of ``[m > 0]`` (Diffusion-DPO's, per draw);
    ``per_pair``: each pair's mean over draws (for intervals over pairs);
    ``accuracy_averaged_margin``: fraction of pairs whose margin averaged over draws is > 0.
    """
    margins = np.asarray(margins, dtype=np.float64)
    if margins.ndim != 2 or margins.size == 0:
        raise ValueError(f"margins: expected a non-empty (draws, pairs) array, got shape {margins.shape}")
    hits = (margins > 0) + 0.5 * (margins == 0)
    averaged = margins.mean(axis=0)
    return {
        "accuracy": float(hits.mean()),
        "per_pair": hits.mean(axis=0),
        "accuracy_averaged_margin": float(((averaged > 0) + 0.5 * (averaged == 0)).mean()),
        "mean_margin": float(margins.mean()),
        "pairs": int(margins.shape[1]),
        "draws": int(margins.shape[0]),
    }


@torch.no_grad()
def pair_margins(
    backbone: Backbone,
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[dict[str, Any]],
    *,
    branch: str = "null",
    reverse: bool = True,
    draws: int = 8,
    seed: int = 1234,
) -> np.ndarray:
    """(draws, pairs) margins ``(e_ref - e)[w] - (e_ref - e)[l]`` in error units (times beta/2
    they are logits), with ``w`` the rejected image when ``reverse``."""
    if branch not in ("null", "conditional"):
        raise ConfigError(f"branch: expected 'null' or 'conditional', got {branch!r}")
    columns = []
    index = 0
    for batch in batches:
        chosen, rejected, cond = backbone.encode_batch(batch)
        if branch == "null":
            cond = backbone.null_condition(cond)
        n = chosen.shape[0]
        rows = []
        for draw in range(draws):
            seeds = [pair_seed(seed, draw, index + i) for i in range(n)]
            drawn = draw_pairs(backbone, chosen, 0.0, seeds)  # the same draws as training's
            latents = torch.cat([chosen, rejected])
            noise2 = torch.cat([drawn.noise, drawn.noise])
            t2 = torch.cat([drawn.timesteps, drawn.timesteps])
            noisy = backbone.add_noise(latents, noise2, t2)
            target = backbone.training_target(latents, noise2, t2)
            err = per_sample_mse(backbone.predict(model, noisy, t2, cond), target)  # cond: 2B rows
            ref_err = per_sample_mse(backbone.predict(reference, noisy, t2, cond), target)
            gain = (ref_err - err).double().cpu()  # log-likelihood ratio proxy per image
            gain_chosen, gain_rejected = gain.chunk(2)
            rows.append((gain_rejected - gain_chosen) if reverse else (gain_chosen - gain_rejected))
        columns.append(torch.stack(rows).numpy())
        index += n
    return np.concatenate(columns, axis=1)


def implicit_accuracy(
    backbone: Backbone,
    model: nn.Module,
    reference: nn.Module,
    batches: Iterable[dict[str, Any]],
    **kwargs: Any,
) -> dict[str, Any]:
    """Implicit accuracy of ``model`` against ``reference`` on pairs, on one branch (see
    :func:`accuracy_from_margins` for the keys; arguments as :func:`pair_margins`)."""
    return accuracy_from_margins(pair_margins(backbone, model, reference, batches, **kwargs))
