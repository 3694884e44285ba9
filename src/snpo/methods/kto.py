"""Diffusion-KTO (``method: kto``): alignment from per-image binary feedback (the math:
:mod:`snpo.objectives.kto`; the public code ``jacklishufan/diffusion-kto``).

Data. A KTO batch is B labelled IMAGES, not pairs (``snpo.data.unpaired``): ``prompt, image,
label`` rows, or a paired dataset split into rows (chosen -> 1, rejected -> 0), or a latent
cache of pairs split the same way. ``per_device_train_batch_size`` counts images.

A step. Each image has its own seed from the trainer (its global index in the step), so its
noise, timestep and coin come from ``snpo.methods.draws`` exactly as a pair's do; the coin is
plain CFG dropout (the prompt replaced by the backbone's null condition with probability
``cfg_dropout``, 0.2 as Diffusion-KTO's ``proportion_empty_prompts``; no swap). Policy errors
with gradient, reference errors under no_grad (the frozen copy, or LoRA adapters off).

The reference point is a statistic of the whole optimizer step: ``z_ref = max(0, mean l)``
over every image of the step, on every process (the code's ``accelerator.reduce`` of the
batch mean). With ``gradient_accumulation_steps = 1`` it is computed in the loss, from this
micro-batch's rewards summed over the processes (one all-reduce, no extra forward). With
accumulation, a micro-batch cannot know the later ones, so the trainer hands the method
the whole step first (:meth:`KTOMethod.prepare_step`): one no-grad policy and reference
forward per image, rewards summed over the micro-batches and processes; the reference
errors are kept, so a micro-step then needs no second reference forward (cost: one extra
no-grad policy forward per image). Either way the step's gradient is the same as one
micro-batch holding all of the step's images.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Backbone, Condition, per_sample_mse, select_condition
from snpo.errors import ConfigError
from snpo.methods.draws import draw_pairs
from snpo.methods.registry import BuiltMethod, MethodSpec
from snpo.objectives import implicit_reward, validate_objective_args
from snpo.objectives.kto import kto_loss, kto_reference_point


def encode_items(backbone: Backbone, batch: dict[str, Any]) -> tuple[Tensor, Condition]:
    """A batch of B labelled images -> (latents, condition with B rows), or the cache's ones.

    Per-image condition inputs (SDXL's sizes and crops) come from the backbone's own
    ``condition_extras``, given the images as if each were a pair of two copies."""
    device = backbone.device
    if "latents" in batch:
        return batch["latents"].to(device).float(), {k: v.to(device) for k, v in batch["cond"].items()}
    with torch.no_grad():
        pixels = batch["pixels"].to(device)
        latents = backbone.encode_images(pixels.to(backbone.encoder_dtype)).float()
        as_pairs: dict[str, Any] = {"chosen_pixels": batch["pixels"], "rejected_pixels": batch["pixels"]}
        for key in ("original_size", "crop_top_left"):
            if key in batch:
                as_pairs[f"chosen_{key}"] = as_pairs[f"rejected_{key}"] = batch[key]
        n = pixels.shape[0]
        extras = {k: v[:n] for k, v in backbone.condition_extras(as_pairs).items()}
        cond = backbone.encode_prompts(list(batch["prompt"]), **extras)
    return latents, cond


def global_sum(values: Tensor) -> Tensor:
    """``values`` summed over the processes of a distributed run (itself otherwise)."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        values = values.clone()
        dist.all_reduce(values)
    return values


class KTOMethod:
    """``compute_loss(model, batch, item_seeds)`` for Diffusion-KTO; see the module docstring."""

    name = "kto"
    progress_name = "train kto"

    def __init__(self, backbone: Backbone, beta: float, cfg_dropout: float,
                 desirable_weight: float = 1.0, undesirable_weight: float = 1.0) -> None:
        if not 0 <= cfg_dropout < 1:
            raise ConfigError(f"cfg_dropout: expected a probability in [0, 1), got {cfg_dropout!r}")
        self.backbone, self.beta, self.cfg_dropout = backbone, beta, cfg_dropout
        self.desirable_weight, self.undesirable_weight = desirable_weight, undesirable_weight
        #: from prepare_step: the step's reference point and each micro-batch's reference errors
        self._prepared: dict[tuple[int, ...], tuple[Tensor, Tensor]] = {}

    def errors(self, model: nn.Module, batch: dict[str, Any], seeds: list[int], *,
               ref_err: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(err, ref_err, desirable, negative)`` per image (``err`` with the gradient the
        caller's grad mode gives; ``ref_err`` computed unless given)."""
        backbone = self.backbone
        latents, cond = encode_items(backbone, batch)
        draws = draw_pairs(backbone, latents, self.cfg_dropout, seeds)  # one draw per image
        cond = select_condition(draws.coin, backbone.null_condition(cond), cond)
        noisy = backbone.add_noise(latents, draws.noise, draws.timesteps)
        target = backbone.training_target(latents, draws.noise, draws.timesteps)
        err = per_sample_mse(backbone.predict(model, noisy, draws.timesteps, cond), target)
        if ref_err is None:
            with backbone.reference() as reference:
                ref_err = per_sample_mse(backbone.predict(reference, noisy, draws.timesteps, cond), target)
        desirable = batch["label"].to(err.device).to(torch.bool)
        return err, ref_err.to(err.device, err.dtype), desirable, draws.coin

    def prepare_step(self, model: nn.Module, micro_batches: list[tuple[dict[str, Any], list[int]]]) -> None:
        """The reference point of a whole optimizer step, before its first micro-batch (the
        trainer calls this when ``gradient_accumulation_steps > 1``)."""
        self._prepared = {}
        total, count, refs = None, 0, []
        with torch.no_grad():
            for batch, seeds in micro_batches:
                err, ref_err, _, _ = self.errors(model, batch, seeds)
                reward = implicit_reward(err, ref_err, self.beta)
                total = reward.sum() if total is None else total + reward.sum()
                count += reward.numel()
                refs.append((tuple(seeds), ref_err))
        if total is None:
            return
        summed = global_sum(torch.stack([total, total.new_tensor(float(count))]))
        point = kto_reference_point(summed[0], summed[1])
        self._prepared = {key: (point, ref_err) for key, ref_err in refs}

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        prepared = self._prepared.pop(tuple(pair_seeds), None)
        err, ref_err, desirable, negative = self.errors(
            model, batch, pair_seeds, ref_err=None if prepared is None else prepared[1])
        if prepared is not None:
            point = prepared[0]
        else:  # the step is this micro-batch (on every process)
            reward = implicit_reward(err.detach(), ref_err, self.beta)
            summed = global_sum(torch.stack([reward.sum(), reward.new_tensor(float(reward.numel()))]))
            point = kto_reference_point(summed[0], summed[1])
        return kto_loss(err, ref_err, desirable, point, beta=self.beta, desirable_weight=self.desirable_weight,
                        undesirable_weight=self.undesirable_weight, negative=negative)


def _build(config: Any, backbone: Backbone) -> BuiltMethod:
    return BuiltMethod(KTOMethod(backbone, config.beta, config.cfg_dropout, config.kto_desirable_weight,
                                 config.kto_undesirable_weight))


def _validate(config: Any) -> None:
    validate_objective_args("dpo", config.beta, 1.0, None)  # beta: finite and > 0
    for name in ("kto_desirable_weight", "kto_undesirable_weight"):
        value = getattr(config, name)
        if not (isinstance(value, int | float) and value > 0):
            raise ConfigError(f"{name}: expected a number > 0, got {value!r}")


KTO = MethodSpec(
    name="kto", title="Diffusion-KTO (per-image binary feedback)", build=_build, validate=_validate,
    summary="Diffusion-KTO: one network, unpaired thumbs-up/down images (pairs are split into rows)",
    extra={"data": "unpaired"},
)


def reads_unpaired_rows(method: str) -> bool:
    """Whether ``method`` trains on labelled images (``snpo.data.unpaired``) instead of pairs."""
    from snpo.methods import get_method

    return get_method(method).extra.get("data") == "unpaired"


__all__ = ["KTO", "KTOMethod", "encode_items", "global_sum", "reads_unpaired_rows"]
