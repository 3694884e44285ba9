"""MaPO (``method: mapo``): margin-aware preference optimization WITHOUT a reference model
(the math: :mod:`snpo.objectives.mapo`; the public code ``mapo-t2i/mapo``).

One network, the same per-pair draws as every pair method (one noise and one timestep shared
by both images, the pair's coin as plain CFG dropout: the prompt is dropped with probability
``cfg_dropout`` for both images and the roles never swap; MaPO's own code never drops the
prompt: ``cfg_dropout: 0`` reproduces it). A step is ONE policy forward and backward on the
2B images and nothing else: no reference forward at all, and a full fine-tune keeps no frozen
copy of the network (``Backbone.prepare_for_training(reference=False)``), so it saves the
reference's time and, for full fine-tunes, its memory (``snpo bench`` shows both next to DPO).
Sampled with plain CFG, like the single-network methods.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from snpo.backbones.base import Backbone
from snpo.errors import ConfigError
from snpo.methods.draws import draw_pairs
from snpo.methods.registry import BuiltMethod, MethodSpec
from snpo.methods.single import pair_errors
from snpo.objectives.mapo import mapo_loss


class MaPOMethod:
    """``compute_loss(model, batch, pair_seeds)`` for MaPO; see the module docstring."""

    name = "mapo"
    progress_name = "train mapo"

    def __init__(self, backbone: Backbone, cfg_dropout: float, beta: float = 0.1, snr: float = 0.5) -> None:
        if not 0 <= cfg_dropout < 1:
            raise ConfigError(f"cfg_dropout: expected a probability in [0, 1), got {cfg_dropout!r}")
        self.backbone, self.cfg_dropout, self.beta, self.snr = backbone, cfg_dropout, beta, snr

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        chosen, rejected, cond = self.backbone.encode_batch(batch)
        draws = draw_pairs(self.backbone, chosen, self.cfg_dropout, pair_seeds)
        errors = pair_errors(self.backbone, model, chosen, rejected, cond, draws.noise, draws.timesteps,
                             draws.coin, with_reference=False)  # no reference forward
        return mapo_loss(errors.err_chosen, errors.err_rejected, beta=self.beta, snr=self.snr,
                         timesteps=self.backbone.num_train_timesteps, negative=errors.negative)


def _build(config: Any, backbone: Backbone) -> BuiltMethod:
    from accelerate.utils import set_seed

    set_seed(config.seed)  # LoRA factors drawn here as the trainer would draw them: same seed, same start
    params = backbone.prepare_for_training(lora_rank=config.lora_rank,
                                           gradient_checkpointing=config.gradient_checkpointing, reference=False)
    return BuiltMethod(MaPOMethod(backbone, config.cfg_dropout, config.mapo_beta, config.mapo_snr),
                       trainable_parameters=params)


def _validate(config: Any) -> None:
    for name in ("mapo_beta", "mapo_snr"):
        value = getattr(config, name)
        if not (isinstance(value, int | float) and value > 0):
            raise ConfigError(f"{name}: expected a number > 0, got {value!r}")


MAPO = MethodSpec(
    name="mapo", title="MaPO (reference-free, margin-aware)", build=_build, validate=_validate,
    summary="MaPO: reference-free; chosen-image likelihood + a margin on the log-odds (no reference forward)",
    extra={"reference": False},
)


__all__ = ["MAPO", "MaPOMethod"]
