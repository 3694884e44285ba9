"""Diff-NPO (dual model): a negative model trained on reversed preferences, merged, and
used for the null branch of CFG.

1. Training the negative model is ``dpo`` on REVERSED labels, no swap (METHOD.md): wrap any
   method in :class:`ReversedLabels` (or call :func:`npo_negative_method`) and train with the
   normal :class:`~snpo.training.trainer.Trainer`. Its logged ``rewards/chosen`` etc. are by
   the REVERSED labels (``chosen`` = the image people rejected).

   ``cfg_dropout`` defaults to 0: METHOD.md trains the negative model on the conditional
   branch, and the public Diff-NPO script (``DPO-DPO-NPO/train_sd15.py``, which reverses the
   labels when building each pair) never drops the prompt. With ``cfg_dropout = p > 0`` a
   fraction p of the pairs trains the null branch on the same reversed labels (no swap: the
   labels are already reversed).

2. Merging: ``theta_neg = theta_ref + a (theta_pos - theta_ref) + b (theta_npo - theta_ref)``,
   see :mod:`snpo.merging` (full weights and LoRA deltas; ``snpo merge`` on the command
   line).

3. Sampling with two networks::

       eps = eps_neg(x, null) + s * (eps_pos(x, c) - eps_neg(x, null))

   where ``null`` is the backbone's null condition (what the sampler passes as ``null``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Backbone, Condition
from snpo.merging import merge_denoisers, merge_weights
from snpo.methods.single import SingleNetworkMethod
from snpo.objectives import ObjectiveConfig
from snpo.sampling import Guide

__all__ = [
    "ReversedLabels",
    "merge_denoisers",
    "merge_weights",
    "npo_guide",
    "npo_negative_method",
    "reverse_batch",
]


def reverse_batch(batch: dict[str, Any]) -> dict[str, Any]:
    """The same pairs with chosen and rejected swapped.

    Every ``chosen_<x>`` key trades places with its ``rejected_<x>`` twin (pixels, cached
    latents, SDXL sizes and crops); a cached ``cond`` (2B rows, chosen images first) has its
    two halves swapped. Everything else (prompts, skip records) is shared by both images.
    """
    out = dict(batch)
    for key in batch:
        if key.startswith("chosen_"):
            twin = "rejected_" + key.removeprefix("chosen_")
            if twin not in batch:
                raise ValueError(f"reverse_batch: {key!r} has no {twin!r} to swap with")
            out[key], out[twin] = batch[twin], batch[key]
    if "cond" in batch:
        out["cond"] = {k: torch.cat(v.chunk(2)[::-1]) for k, v in batch["cond"].items()}
    return out


class ReversedLabels:
    """Any method, trained on the reversed preference: ``compute_loss`` on :func:`reverse_batch`."""

    def __init__(self, method: Any) -> None:
        self.method = method
        self.name = f"reversed-{getattr(method, 'name', 'method')}"
        self.progress_name = f"train {self.name}"

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return self.method.compute_loss(model, reverse_batch(batch), pair_seeds)


def npo_negative_method(
    backbone: Backbone, beta: float, cfg_dropout: float = 0.0
) -> ReversedLabels:
    """The Diff-NPO negative model's training method: ``dpo`` on reversed labels, no swap."""
    objective = ObjectiveConfig(objective="dpo", beta=beta)
    method = ReversedLabels(SingleNetworkMethod(backbone, objective, cfg_dropout))
    method.progress_name = "train npo-negative (dpo, reversed labels)"
    return method


def npo_guide(
    backbone: Backbone, positive_model: nn.Module, negative_model: nn.Module, guidance_scale: float
) -> Guide:
    """``eps = eps_neg(x, null) + s (eps_pos(x, c) - eps_neg(x, null))``: two networks, two
    forwards of B rows each (the single-network guide batches one forward of 2B)."""

    def guide(latents: Tensor, t: Tensor, cond: Condition, null: Condition) -> Tensor:
        conditional = backbone.predict(positive_model, latents, t, cond)
        if guidance_scale == 1:
            return conditional
        uncond = backbone.predict(negative_model, latents, t, null)
        return uncond + guidance_scale * (conditional - uncond)

    return guide
