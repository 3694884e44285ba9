"""One network, any objective: how a batch of preference pairs becomes a loss.

For each pair: ONE timestep and ONE noise shared by both images (as Diffusion-DPO does),
a branch label ``negative ~ Bernoulli(p)`` (p = the CFG dropout probability), the prompt
replaced by the backbone's null condition on the null branch (for BOTH images of the pair),
and per-sample errors of the policy and, under no_grad, of the reference under the same
condition. ``snpo.objectives`` turns the errors into the loss; the winner/loser swap of the
SNPO objectives happens there. (All draws: ``snpo.methods.draws``.)

Chosen and rejected images go through the denoiser as one batch of 2B, the reference the
same, so a step costs one policy forward/backward and one reference forward, whatever the
objective. With Diffusion-SDPO's safeguard (``safeguard``) the loser's gradient is scaled by
a factor from the policy's residuals (``snpo.objectives.sdpo``): no extra forward or backward.

:func:`single_network_method` describes the method of one registered objective for the
method registry (``method: dpo``, ``method: snpo``, ...).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Backbone, Condition, per_sample_mse, select_condition
from snpo.errors import ConfigError
from snpo.methods.draws import draw_pairs
from snpo.methods.registry import BuiltMethod, MethodSpec
from snpo.objectives import OBJECTIVES, ObjectiveConfig, preference_loss, validate_objective_args
from snpo.objectives.sdpo import safeguard_errors, validate_safeguard_args


@dataclass
class PairErrors:
    """Per-sample errors for a batch of pairs (by the dataset's labels), and branch labels."""

    err_chosen: Tensor
    err_rejected: Tensor
    ref_err_chosen: Tensor
    ref_err_rejected: Tensor
    negative: Tensor
    #: ``prediction - target`` of the policy (2B rows, chosen first, detached, float32), only
    #: when asked for (Diffusion-SDPO's safeguard, ``snpo.objectives.sdpo``)
    residual: Tensor | None = None


def pair_errors(
    backbone: Backbone,
    model: nn.Module,
    chosen: Tensor,
    rejected: Tensor,
    cond: Condition,
    noise: Tensor,
    timesteps: Tensor,
    negative: Tensor,
    *,
    with_reference: bool = True,
    reference_errors: tuple[Tensor, Tensor] | None = None,
    with_residuals: bool = False,
) -> PairErrors:
    """Policy (and reference) errors of both images of each pair, on the branch ``negative``.

    ``cond`` has 2B rows (chosen images first), as ``Backbone.encode_batch`` returns it.
    ``reference_errors`` (chosen, rejected), stored by an earlier run with the same noise
    (``snpo.training.reference_errors``), replace the reference forward. ``with_residuals``
    also returns the policy's ``prediction - target`` (no gradient; the errors are the same).
    """
    negative2 = torch.cat([negative, negative])
    cond2 = select_condition(negative2, backbone.null_condition(cond), cond)
    latents = torch.cat([chosen, rejected])
    noise2, timesteps2 = torch.cat([noise, noise]), torch.cat([timesteps, timesteps])
    noisy = backbone.add_noise(latents, noise2, timesteps2)
    target = backbone.training_target(latents, noise2, timesteps2)

    prediction = backbone.predict(model, noisy, timesteps2, cond2)
    err = per_sample_mse(prediction, target)
    residual = (prediction.detach().float() - target.float()) if with_residuals else None
    if reference_errors is not None:
        ref_err = torch.cat(reference_errors).to(err.device, err.dtype)
    elif with_reference:
        with backbone.reference() as reference:
            ref_err = per_sample_mse(backbone.predict(reference, noisy, timesteps2, cond2), target)
    else:
        ref_err = err.detach()
    err_chosen, err_rejected = err.chunk(2)
    ref_chosen, ref_rejected = ref_err.chunk(2)
    return PairErrors(err_chosen, err_rejected, ref_chosen, ref_rejected, negative, residual)


class SingleNetworkMethod:
    """Diff-DPO, Diff-BDPO, naive SNPO, Diff-SNPO, SFT (any registered objective) on one network."""

    def __init__(
        self, backbone: Backbone, objective: ObjectiveConfig, cfg_dropout: float,
        *, reference_store: Any = None, safeguard: tuple[float, str] | None = None,
    ) -> None:
        if not 0 <= cfg_dropout < 1:
            raise ConfigError(f"cfg_dropout: expected a probability in [0, 1), got {cfg_dropout!r}")
        self.backbone = backbone
        self.objective = objective
        self.cfg_dropout = cfg_dropout
        self.name = objective.objective
        self.progress_name = f"train {objective.objective}"
        #: a ``ReferenceErrorStore`` (``precompute_reference``): stored reference errors are
        #: used instead of a reference forward, and missing ones are computed and recorded
        self.reference_store = reference_store
        #: Diffusion-SDPO's safeguard ``(mu, scope)`` on the loser's gradient, or None
        #: (``snpo.objectives.sdpo``; the loss value and metrics are unchanged)
        self.safeguard = safeguard

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """Loss and metrics for one batch of pairs; ``model`` is the (wrapped) policy."""
        chosen, rejected, cond = self.backbone.encode_batch(batch)
        draws = draw_pairs(self.backbone, chosen, self.cfg_dropout, pair_seeds)
        store = self.reference_store
        stored = store.lookup(pair_seeds, batch) if store is not None else None
        errors = pair_errors(self.backbone, model, chosen, rejected, cond, draws.noise,
                             draws.timesteps, draws.coin, reference_errors=stored,
                             with_residuals=self.safeguard is not None)
        if store is not None and stored is None:
            store.record(pair_seeds, batch, errors.ref_err_chosen, errors.ref_err_rejected)
        obj = self.objective
        err_chosen, err_rejected, factor = errors.err_chosen, errors.err_rejected, None
        if self.safeguard is not None:
            res_chosen, res_rejected = errors.residual.chunk(2)
            err_chosen, err_rejected, factor = safeguard_errors(
                err_chosen, err_rejected, res_chosen, res_rejected, errors.negative,
                swap=obj.swaps, mu=self.safeguard[0], scope=self.safeguard[1])
        loss, metrics = preference_loss(
            err_chosen, err_rejected, errors.ref_err_chosen, errors.ref_err_rejected,
            errors.negative, objective=obj.objective, beta=obj.beta,
            mix_lambda=obj.mix_lambda, mix_scale=obj.mix_scale,
        )
        if factor is not None:
            metrics["safeguard/factor"] = factor.mean()
            metrics["safeguard/active"] = (factor < 1).float().mean()
        return loss, metrics


def objective_config(config: Any, objective: str | None = None) -> ObjectiveConfig:
    """The objective settings of a TrainConfig (``objective`` defaults to its method)."""
    return ObjectiveConfig(objective or config.method, config.beta, config.mix_lambda, config.mix_scale)


def safeguard_of(config: Any) -> tuple[float, str] | None:
    """``(safeguard_mu, safeguard_scope)`` when the config turns Diffusion-SDPO's safeguard on."""
    if not getattr(config, "safeguard", False):
        return None
    validate_safeguard_args(config.safeguard_mu, config.safeguard_scope)
    return (config.safeguard_mu, config.safeguard_scope)


def single_network_method(objective: str, title: str | None = None) -> MethodSpec:
    """The method registry's record of one network trained with the registered ``objective``."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective {objective!r} is not registered (snpo.objectives)")

    def build(config: Any, backbone: Backbone) -> BuiltMethod:
        return BuiltMethod(SingleNetworkMethod(backbone, objective_config(config, objective),
                                               config.cfg_dropout, safeguard=safeguard_of(config)))

    def validate(config: Any) -> None:
        validate_objective_args(objective, config.beta, config.mix_lambda, config.mix_scale)
        if getattr(config, "safeguard", False) and not OBJECTIVES[objective].has_logit:
            raise ConfigError(f"safeguard: Diffusion-SDPO's safeguard scales a loser's gradient; method "
                              f"{objective} has no loser (use dpo, bdpo, snpo-naive or snpo)")

    return MethodSpec(
        name=objective, title=title or OBJECTIVES[objective].summary or objective, build=build,
        validate=validate, reuses_reference_errors=True, objective=objective,
        trains_null_branch=OBJECTIVES[objective].swaps,
        summary=f"one network, objective {objective}",
    )
