"""Diff-NPO (dual model): a negative model trained on reversed preferences, merged, and
used for the null branch of CFG.

Names: "negative" in snpo is the null-branch label; Diff-NPO's own "negative model" is
called the *NPO model* in the code (``npo_model``), and the user-facing method keeps the
paper's name, ``method: npo-negative``.

1. Training the NPO model is ``dpo`` on REVERSED labels, no swap (docs/method.md): any method
   wrapped in :class:`ReversedLabels` (:func:`npo_negative_method`), trained by the normal
   trainer. Its logged ``rewards/chosen`` etc. are by the REVERSED labels (``chosen`` = the
   image people rejected).

   docs/method.md trains the NPO model on the conditional branch, and the public Diff-NPO script
   (``DPO-DPO-NPO/train_sd15.py``, which reverses the labels when building each pair) never
   drops the prompt: the presets set ``cfg_dropout: 0``. With ``cfg_dropout = p > 0`` a
   fraction p of the pairs trains the null branch on the same reversed labels (no swap: the
   labels are already reversed).

2. Merging: ``theta_neg = theta_ref + a (theta_pos - theta_ref) + b (theta_npo - theta_ref)``,
   see :mod:`snpo.merging` (full weights and LoRA deltas; ``snpo merge`` on the command
   line).

3. Sampling with two networks::

       eps = eps_npo(x, null) + s * (eps_pos(x, c) - eps_npo(x, null))

   where ``null`` is the backbone's null condition (what the sampler passes as ``null``).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Backbone, Condition
from snpo.errors import ConfigError
from snpo.methods.registry import BuiltMethod, MethodSpec, UsageContext
from snpo.methods.single import SingleNetworkMethod
from snpo.objectives import ObjectiveConfig, validate_objective_args
from snpo.sampling import Guide


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
                raise ConfigError(f"reverse_batch: {key!r} has no {twin!r} to swap with")
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
    """The NPO model's training method: ``dpo`` on reversed labels, no swap."""
    objective = ObjectiveConfig(objective="dpo", beta=beta)
    method = ReversedLabels(SingleNetworkMethod(backbone, objective, cfg_dropout))
    method.progress_name = "train npo-negative (dpo, reversed labels)"
    return method


def npo_guide(
    backbone: Backbone, positive_model: nn.Module, npo_model: nn.Module, guidance_scale: float
) -> Guide:
    """``eps = eps_npo(x, null) + s (eps_pos(x, c) - eps_npo(x, null))``: two networks, two
    forwards of B rows each (the single-network guide batches one forward of 2B)."""

    def guide(latents: Tensor, t: Tensor, cond: Condition, null: Condition) -> Tensor:
        conditional = backbone.predict(positive_model, latents, t, cond)
        if guidance_scale == 1:
            return conditional
        uncond = backbone.predict(npo_model, latents, t, null)
        return uncond + guidance_scale * (conditional - uncond)

    return guide


# ---- the registry's record -----------------------------------------------------------------
def _build(config: Any, backbone: Backbone) -> BuiltMethod:
    return BuiltMethod(npo_negative_method(backbone, config.beta, cfg_dropout=config.cfg_dropout))


def _validate(config: Any) -> None:
    validate_objective_args("dpo", config.beta, 1.0, None)
    if not 0 <= config.cfg_dropout < 1:
        raise ConfigError(f"cfg_dropout: expected a probability in [0, 1), got {config.cfg_dropout!r}")


def _guide(backbone: Backbone, networks: dict[str, nn.Module], settings: Any) -> Guide:
    return npo_guide(backbone, networks["policy"], networks["npo"], settings.guidance_scale)


def _usage(ctx: UsageContext) -> str:
    return (f"# Diff-NPO: the positive run on the prompt, this network (merged with it, as\n"
            f"# Diff-NPO does) on the null branch\n"
            f"snpo sample --model_name_or_path {ctx.base} --lora POSITIVE_RUN "
            f"--npo_negative {ctx.output_dir} --prompts PROMPTS.txt\n"
            f"# the merged weights themselves:\n"
            f"snpo merge --reference {ctx.base} --positive POSITIVE_RUN --npo {ctx.output_dir}")


NPO_NEGATIVE = MethodSpec(
    name="npo-negative", title="Diff-NPO's negative model (dpo on reversed labels)", build=_build,
    validate=_validate, sampling_roles=("policy", "npo"), training_runs=2, make_guide=_guide,
    guide_name="npo", usage=_usage, usage_language="bash", trains_null_branch=True,
    summary="Diff-NPO's second network: dpo on reversed labels (merge with `snpo merge`)",
)
