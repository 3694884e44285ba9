"""CHATS (dual model): a ``win`` network fit to the chosen images and a ``lose`` network fit
to the rejected ones, trained jointly against the frozen reference, and sampled with a
proxy prompt for the lose network.

Training (docs/method.md; CHATS' ``train.py``). For each pair, ONE noise and ONE timestep shared by
both images (drawn from the pair's seed exactly as the single-network methods draw them, so
all methods see the same noise); ``win`` sees the chosen image with the prompt, ``lose`` the
rejected image with the prompt replaced by ZEROS with probability ``lose_prompt_dropout``
(0.5), and the reference sees each image with the same condition as its network::

    z = -(beta/2) * ((e_win[w] - e_ref[w]) + (e_lose[l] - e_ref[l]))   (snpo.objectives.chats)

Choices where docs/method.md is silent, each following CHATS' code:
- "zeros" means literal zeros (``torch.zeros_like``) for every condition entry but the SDXL
  micro-conditioning ``time_ids`` (image size and crop, not prompt information); CHATS
  zeroes ``prompt_embeds`` and the pooled ``text_embeds``.
- The reference's error on the rejected image uses the lose network's (possibly zeroed)
  condition, so ``e_lose - e_ref`` compares like with like.
- One difference: CHATS flips ONE coin per batch; here each pair draws its own (the coin of
  ``snpo.methods.draws``, from the pair's seed), which has the same marginal rate and keeps
  the trainer's batch-split invariance.

Both networks live in one :class:`DualDenoiser` so accelerate prepares ONE module and a DDP
step is one forward and one backward through the wrapper (calling submodules directly would
skip DDP's gradient synchronisation).

Sampling (CHATS' ``pipeline.py``), with ``e`` the ENCODED empty prompt (pooled included; for
SDXL too, whose CFG null is zeros: ``Backbone.empty_prompt_condition``)::

    proxy = (1 + a) e - a c             (a = 0.5; every entry but time_ids, which stays c's)
    eps   = eps_win(x, c) + s * (eps_win(x, c) - eps_lose(x, proxy))

Note ``s`` multiplies ``eps_win - eps_lose`` added ON TOP of ``eps_win``: CHATS' ``s`` acts
like plain CFG's ``s + 1``.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import (
    Backbone,
    Condition,
    cat_conditions,
    per_sample_mse,
    select_condition,
)
from snpo.errors import ConfigError
from snpo.methods.draws import draw_pairs
from snpo.methods.registry import BuiltMethod, MethodSpec, UsageContext
from snpo.objectives import chats_loss, validate_objective_args
from snpo.sampling import Guide

#: Condition entries that are image micro-conditioning, not prompt: never zeroed or mixed.
UNMIXED_KEYS = frozenset({"time_ids"})


class DualDenoiser(nn.ModuleDict):
    """``{"win": ..., "lose": ...}`` with a forward, so DDP wraps one module.

    ``model(win=fn, lose=fn)`` returns ``{"win": fn(win_net), "lose": fn(lose_net)}``: each
    ``fn`` runs its network (e.g. ``lambda net: backbone.predict(net, x, t, cond)``).
    """

    def __init__(self, win: nn.Module, lose: nn.Module) -> None:
        super().__init__({"win": win, "lose": lose})

    def forward(self, **calls: Callable[[nn.Module], Tensor]) -> dict[str, Tensor]:
        return {name: fn(self[name]) for name, fn in calls.items()}


def prepare_chats(
    backbone: Backbone, *, lora_rank: int = 0, gradient_checkpointing: bool = False
) -> tuple[DualDenoiser, list[nn.Parameter]]:
    """Both networks start from the reference: ``win`` is ``backbone.denoiser`` (prepared as
    usual, so ``backbone.reference()`` is the frozen copy, or the adapters-off network),
    ``lose`` a deep copy of it. Returns the dual module and the trainable parameters of both,
    for ``Trainer(..., model=dual, trainable_parameters=params)``."""
    win_params = backbone.prepare_for_training(
        lora_rank=lora_rank, gradient_checkpointing=gradient_checkpointing
    )
    win = backbone.denoiser
    lose = copy.deepcopy(win)  # LoRA: B = 0 at init, so both equal the reference
    lose_params = [p for p in lose.parameters() if p.requires_grad]
    return DualDenoiser(win, lose), [*win_params, *lose_params]


def zero_condition(cond: Condition) -> Condition:
    """Every entry replaced by zeros, except :data:`UNMIXED_KEYS` (kept as they are)."""
    return {k: v if k in UNMIXED_KEYS else torch.zeros_like(v) for k, v in cond.items()}


def proxy_condition(cond: Condition, null: Condition, alpha: float = 0.5) -> Condition:
    """CHATS' proxy prompt: ``(1 + alpha) null - alpha cond`` per entry; ``time_ids`` from ``cond``."""
    return {
        k: v if k in UNMIXED_KEYS else (1 + alpha) * null[k].to(v.dtype) - alpha * v
        for k, v in cond.items()
    }


@dataclass
class ChatsErrors:
    """Per-pair errors of one CHATS step, and which pairs had the lose prompt zeroed."""

    err_win_chosen: Tensor
    err_lose_rejected: Tensor
    ref_err_chosen: Tensor
    ref_err_rejected: Tensor
    prompt_zeroed: Tensor


def chats_pair_errors(
    backbone: Backbone,
    model: nn.Module,
    chosen: Tensor,
    rejected: Tensor,
    cond: Condition,
    noise: Tensor,
    timesteps: Tensor,
    prompt_zeroed: Tensor,
) -> ChatsErrors:
    """Win on chosen, lose on rejected (blank prompt where ``prompt_zeroed``), reference on both.

    ``model`` is a :class:`DualDenoiser` or a DDP/accelerate wrapper of one; ``cond`` has 2B
    rows (chosen images first), as ``Backbone.encode_batch`` returns it.
    """
    n = chosen.shape[0]
    cond_chosen = {k: v[:n] for k, v in cond.items()}
    cond_rejected = {k: v[n:] for k, v in cond.items()}
    cond_lose = select_condition(prompt_zeroed, zero_condition(cond_rejected), cond_rejected)

    noisy_chosen = backbone.add_noise(chosen, noise, timesteps)
    noisy_rejected = backbone.add_noise(rejected, noise, timesteps)
    target_chosen = backbone.training_target(chosen, noise, timesteps)
    target_rejected = backbone.training_target(rejected, noise, timesteps)

    predictions = model(
        win=lambda net: backbone.predict(net, noisy_chosen, timesteps, cond_chosen),
        lose=lambda net: backbone.predict(net, noisy_rejected, timesteps, cond_lose),
    )
    err_win = per_sample_mse(predictions["win"], target_chosen)
    err_lose = per_sample_mse(predictions["lose"], target_rejected)
    with backbone.reference() as reference:
        ref_pred = backbone.predict(
            reference,
            torch.cat([noisy_chosen, noisy_rejected]),
            torch.cat([timesteps, timesteps]),
            cat_conditions(cond_chosen, cond_lose),
        )
        ref_err = per_sample_mse(ref_pred, torch.cat([target_chosen, target_rejected]))
    ref_chosen, ref_rejected = ref_err.chunk(2)
    return ChatsErrors(err_win, err_lose, ref_chosen, ref_rejected, prompt_zeroed)


class ChatsMethod:
    """CHATS training: ``compute_loss(model, batch, pair_seeds)`` with ``model`` a (wrapped)
    :class:`DualDenoiser` from :func:`prepare_chats`."""

    name = "chats"
    progress_name = "train chats"

    def __init__(
        self,
        backbone: Backbone,
        beta: float = 2000.0,
        lose_prompt_dropout: float = 0.5,
    ) -> None:
        if not 0 <= lose_prompt_dropout <= 1:
            raise ConfigError(
                f"chats_lose_prompt_dropout: expected a probability in [0, 1], got {lose_prompt_dropout!r}"
            )
        self.backbone = backbone
        self.beta = beta
        self.lose_prompt_dropout = lose_prompt_dropout

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected, cond = self.backbone.encode_batch(batch)
        # the pair's coin decides whether the lose network's prompt is blanked
        draws = draw_pairs(self.backbone, chosen, self.lose_prompt_dropout, pair_seeds)
        errors = chats_pair_errors(
            self.backbone, model, chosen, rejected, cond, draws.noise, draws.timesteps, draws.coin
        )
        return chats_loss(
            errors.err_win_chosen,
            errors.err_lose_rejected,
            errors.ref_err_chosen,
            errors.ref_err_rejected,
            beta=self.beta,
            prompt_zeroed=errors.prompt_zeroed,
        )

    def save_trained(self, output_dir: str | Path, dual: nn.Module) -> list[str]:
        """Called by the trainer at the end: both networks, the backbone's way."""
        saved = save_chats(self.backbone, dual, str(output_dir))
        return [f"{name}/{f}" for name, files in saved.items() for f in files]


def chats_guide(
    backbone: Backbone,
    win_model: nn.Module,
    lose_model: nn.Module,
    guidance_scale: float,
    proxy_alpha: float = 0.5,
) -> Guide:
    """``eps = eps_win(x, c) + s (eps_win(x, c) - eps_lose(x, (1 + a) e - a c))`` with ``e`` the
    ENCODED empty prompt, as CHATS' own SD1.5 and SDXL pipelines build it (pooled embedding
    included), even for SDXL, whose CFG null (the sampler's ``null``) is zeros."""

    def guide(latents: Tensor, t: Tensor, cond: Condition, null: Condition) -> Tensor:
        win = backbone.predict(win_model, latents, t, cond)
        if guidance_scale == 0:
            return win
        empty = backbone.empty_prompt_condition(cond)
        lose = backbone.predict(lose_model, latents, t, proxy_condition(cond, empty, proxy_alpha))
        return win + guidance_scale * (win - lose)

    return guide


def save_chats(backbone: Backbone, dual: nn.Module, output_dir: str) -> dict[str, list[str]]:
    """Save both networks the backbone's way, under ``output_dir/win`` and ``output_dir/lose``
    (what :meth:`ChatsMethod.save_trained` does at the end of training); ``dual`` is the
    :class:`DualDenoiser` (unwrapped)."""
    return {
        name: backbone.save_trained(f"{output_dir}/{name}", dual[name]) for name in ("win", "lose")
    }


# ---- the registry's record -----------------------------------------------------------------
def _build(config: Any, backbone: Backbone) -> BuiltMethod:
    from accelerate.utils import set_seed

    set_seed(config.seed)  # LoRA factors drawn here, not in the trainer: same seed, same start
    dual, params = prepare_chats(backbone, lora_rank=config.lora_rank,
                                 gradient_checkpointing=config.gradient_checkpointing)
    method = ChatsMethod(backbone, config.beta, config.chats_lose_prompt_dropout)
    return BuiltMethod(method, model=dual, trainable_parameters=params)


def _validate(config: Any) -> None:
    validate_objective_args("dpo", config.beta, 1.0, None)
    if not 0 <= config.chats_lose_prompt_dropout <= 1:
        raise ConfigError(f"chats_lose_prompt_dropout: expected a probability in [0, 1], "
                          f"got {config.chats_lose_prompt_dropout!r}")


def _guide(backbone: Backbone, networks: dict[str, nn.Module], settings: Any) -> Guide:
    return chats_guide(backbone, networks["win"], networks["lose"],
                       settings.chats_guidance_scale, settings.chats_proxy_alpha)


def _usage(ctx: UsageContext) -> str:
    return (f"# both networks, CHATS' proxy-prompt guidance (snpo.methods.chats.chats_guide)\n"
            f"snpo sample --model_name_or_path {ctx.base} --chats {ctx.output_dir} --prompts PROMPTS.txt")


CHATS = MethodSpec(
    name="chats", title="CHATS (win and lose networks)", build=_build, validate=_validate,
    trained_networks=("win", "lose"), sampling_roles=("win", "lose"), make_guide=_guide,
    guide_name="chats", usage=_usage, usage_language="bash", trains_null_branch=True,
    summary="CHATS: win and lose networks trained together; proxy-prompt guidance",
)
