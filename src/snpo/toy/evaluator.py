"""Scoring one toy model the way every row of the study is scored.

Samples of the held-out prompts (DDIM, CFG, several seeds; the initial noise depends only on
the seed and the prompt's index, so every method is compared on the same noise), scored by
both judges, with edge sharpness (blur) and high-frequency energy, and the implicit accuracy
of the network serving the null branch on reversed held-out pairs (per draw, as
Diffusion-DPO defines it).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from snpo.backbones.toy import ToyBackbone
from snpo.evaluate.implicit_accuracy import implicit_accuracy
from snpo.sampling import Guide, SamplerSettings, sample_images, single_network_guide
from snpo.toy import scenes as S
from snpo.toy.data import stack_batch
from snpo.toy.judges import (
    edge_sharpness,
    high_frequency_energy,
    make_heldout_judge,
    make_label_judge,
)


@dataclass
class ModelEval:
    """Scores of one model on the evaluation prompts x seeds."""

    label: np.ndarray  # (seeds, prompts)
    heldout: np.ndarray  # (seeds, prompts)
    sharpness: np.ndarray  # (seeds, prompts) edge sharpness / renders: lower = blurrier
    hf_ratio: float  # high-frequency energy / renders: detail AND noise
    null_accuracy: dict[str, Any] | None = None  # implicit_accuracy(...) of the null branch, reversed pairs
    sampling_seconds: float = 0.0  # per image
    images: torch.Tensor | None = field(default=None, repr=False)  # (seeds * prompts, 3, H, W)

    def arrays(self) -> dict[str, np.ndarray]:
        out = {"label": self.label, "heldout": self.heldout, "sharpness": self.sharpness}
        if self.null_accuracy is not None:
            out["null_per_pair"] = np.asarray(self.null_accuracy["per_pair"])
        return out


class Evaluator:
    """Samples and scores any toy denoiser on the same prompts, seeds and held-out pairs."""

    def __init__(self, backbone: ToyBackbone, reference: torch.nn.Module, prompts: list[str],
                 seeds: list[int], heldout_pairs: Any, *, steps: int, guidance_scale: float,
                 implicit_draws: int, seed: int) -> None:
        self.backbone, self.reference = backbone, reference
        self.prompts, self.seeds, self.heldout_pairs = prompts, seeds, heldout_pairs
        self.guidance_scale, self.implicit_draws, self.seed = guidance_scale, implicit_draws, seed
        self.label_judge, self.heldout_judge = make_label_judge(), make_heldout_judge()
        self.all_prompts = [p for _ in seeds for p in prompts]
        self.all_seeds = [s * 10_007 + i for s in seeds for i in range(len(prompts))]
        renders = S.render([S.Scene.from_caption(p) for p in prompts], backbone.config.resolution)
        self.render_hf = float(high_frequency_energy(renders).mean())
        self.sampling = SamplerSettings(steps, guidance_scale, backbone.sampling_scheduler_name,  # DDIM or Euler
                                        batch_size=128)

    def images(self, guide: Guide) -> tuple[torch.Tensor, float]:
        c = self.backbone.config
        start = time.perf_counter()
        images = sample_images(self.backbone, guide, self.all_prompts, self.all_seeds,
                               (c.latent_channels, c.latent_size, c.latent_size), self.sampling)
        return images, time.perf_counter() - start

    def evaluate(self, model: torch.nn.Module, *, guide: Guide | None = None,
                 null_model: torch.nn.Module | None = None, with_null_accuracy: bool = True,
                 keep_images: bool = False) -> ModelEval:
        """Scores of ``model`` sampled with ``guide`` (default: plain CFG with ``model``); the
        null-branch accuracy is measured on ``null_model`` (default ``model``)."""
        guide = guide or single_network_guide(self.backbone, model, self.guidance_scale)
        images, seconds = self.images(guide)
        shape = (len(self.seeds), len(self.prompts))
        label = np.asarray(self.label_judge(images, self.all_prompts)).reshape(shape)
        heldout = np.asarray(self.heldout_judge(images, self.all_prompts)).reshape(shape)
        sharpness = np.asarray(edge_sharpness(images)).reshape(shape)
        hf = float(high_frequency_energy(images).mean()) / self.render_hf
        null = self.null_accuracy(null_model if null_model is not None else model) if with_null_accuracy else None
        return ModelEval(label, heldout, sharpness, hf, null, seconds / len(self.all_prompts),
                         images if keep_images else None)

    def null_accuracy(self, model: torch.nn.Module) -> dict[str, Any]:
        pairs = self.heldout_pairs.dataset()
        batches = [stack_batch([pairs[i] for i in range(s, min(s + 64, len(pairs)))])
                   for s in range(0, len(pairs), 64)]
        return implicit_accuracy(self.backbone, model, self.reference, batches, branch="null",
                                 reverse=True, draws=self.implicit_draws, seed=self.seed + 99)

    def sharpness_of(self, model: torch.nn.Module, prompts: int = 8) -> float:
        """Mean edge sharpness of a few samples (cheap: for trajectories during training)."""
        k = min(prompts, len(self.prompts))
        c = self.backbone.config
        images = sample_images(self.backbone, single_network_guide(self.backbone, model, self.guidance_scale),
                               self.prompts[:k], self.all_seeds[:k],
                               (c.latent_channels, c.latent_size, c.latent_size), self.sampling)
        return float(np.mean(edge_sharpness(images)))
