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


class DenoisingMethod:
    """``loss = mean || f(x_t, t, c) - target ||^2`` with the prompt dropped with prob. p."""

    name = "denoising"
    progress_name = "pretrain (denoising)"

    def __init__(self, backbone: Backbone, cfg_dropout: float = 0.1, *, train_text_encoder: bool = False) -> None:
        if not 0 <= cfg_dropout < 1:
            raise ValueError(f"cfg_dropout: expected a probability in [0, 1), got {cfg_dropout!r}")
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
        noise, timesteps, negative = [], [], []
        for seed in pair_seeds:
            generator = torch.Generator().manual_seed(seed)
            noise.append(torch.randn(latents.shape[1:], generator=generator))
            timesteps.append(backbone.sample_timesteps(1, generator))
            negative.append(torch.rand(1, generator=generator) < self.cfg_dropout)
        noise = torch.stack(noise).to(device)
        timesteps = torch.cat(timesteps).to(device)
        negative = torch.cat(negative).to(device)
        cond = select_condition(negative, backbone.null_condition(cond), cond)
        noisy = backbone.add_noise(latents, noise, timesteps)
        target = backbone.training_target(latents, noise, timesteps)
        err = per_sample_mse(backbone.predict(model, noisy, timesteps, cond), target)
        loss = err.mean()
        return loss, {"loss": loss.detach()}
