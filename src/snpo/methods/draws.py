"""The per-pair randomness of a training step: one home, used by every method and evaluation.

Each pair of each step has its own seed, ``pair_seed(seed, step, index)``, where ``index``
counts pairs across micro-batches and processes (the trainer computes it). From that seed, on
a CPU generator and in this order, come the pair's noise, its timestep (or sigma, for
flow-matching backbones: ``backbone.sample_timesteps``) and one coin with probability ``p``:

- the single-network methods read the coin as the branch label ``negative`` (null branch);
- CHATS reads it as "blank the lose network's prompt";
- pretraining reads it as CFG dropout; evaluation draws with p = 0 and ignores it.

Because nothing comes from the global RNG, the draws do not depend on the batch size, the
accumulation, the number of processes or the device, and replay exactly after a resume.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from snpo.errors import ConfigError


def pair_seed(seed: int, step: int, index: int) -> int:
    """A well-mixed 63-bit seed for pair ``index`` of optimizer step ``step``."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


@dataclass
class PairDraws:
    """One batch's draws, one row per pair."""

    noise: Tensor  # like one pair's latents, shared by both images
    timesteps: Tensor  # (B,) shared by both images
    coin: Tensor  # (B,) bool, True with probability p


def draw_pairs(backbone, latents: Tensor, p: float, pair_seeds: Sequence[int]) -> PairDraws:
    """Noise, timestep and coin of each pair, each pair from its own seed (see the module doc).

    ``latents`` gives the per-pair shape, the device and the dtype of the noise.
    """
    if len(pair_seeds) != latents.shape[0]:
        raise ConfigError(f"pair_seeds: expected {latents.shape[0]} seeds, got {len(pair_seeds)}")
    noises, timesteps, coins = [], [], []
    for seed in pair_seeds:
        generator = torch.Generator().manual_seed(int(seed))
        noises.append(torch.randn(latents.shape[1:], generator=generator))
        timesteps.append(backbone.sample_timesteps(1, generator))
        coins.append(torch.rand(1, generator=generator) < p)
    device = latents.device
    return PairDraws(
        torch.stack(noises).to(device, latents.dtype),
        torch.cat(timesteps).to(device),
        torch.cat(coins).to(device),
    )
