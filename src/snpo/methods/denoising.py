"""Plain denoising (the diffusion pretraining loss) with CFG dropout.

Used to pretrain the toy reference model through the same trainer as every preference
method. Batches hold ``pixels`` and ``prompt``; the text encoder may be trained jointly
(its parameters are then among the trainer's trainable parameters).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Backbone, per_sample_mse, select_condition
from snpo.errors import ConfigError
from snpo.methods.draws import draw_pairs


class DenoisingMethod:
    """``loss = mean || f(x_t, t, c) - target ||^2`` with the prompt dropped with prob. p."""

    name = "denoising"
    progress_name = "pretrain (denoising)"

    def __init__(self, backbone: Backbone, cfg_dropout: float = 0.1, *, train_text_encoder: bool = False) -> None:
        if not 0 <= cfg_dropout < 1:
            raise ConfigError(f"cfg_dropout: expected a probability in [0, 1), got {cfg_dropout!r}")
        self.backbone = backbone
        self.cfg_dropout = cfg_dropout
        self.train_text_encoder = train_text_encoder

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]:
        backbone = self.backbone
        device = backbone.device
        with torch.no_grad():
            latents = backbone.encode_images(batch["pixels"].to(device)).float()
        with torch.set_grad_enabled(self.train_text_encoder):
            cond = backbone.encode_prompts(batch["prompt"])
        draws = draw_pairs(backbone, latents, self.cfg_dropout, pair_seeds)  # coin = prompt dropped
        cond = select_condition(draws.coin, backbone.null_condition(cond), cond)
        noisy = backbone.add_noise(latents, draws.noise, draws.timesteps)
        target = backbone.training_target(latents, draws.noise, draws.timesteps)
        err = per_sample_mse(backbone.predict(model, noisy, draws.timesteps, cond), target)
        loss = err.mean()
        return loss, {"loss": loss.detach()}
