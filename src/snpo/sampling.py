"""Sampling with classifier-free guidance, for one network or two.

A *guide* maps ``(latents, t, cond, null)`` to the guided model output:

- :func:`single_network_guide`: plain CFG, ``u + s (c - u)`` with ``c = f(x, cond)`` and
  ``u = f(x, null)`` computed in ONE batched forward (Diff-DPO, BDPO, SNPO, SFT).

Dual-model guides (Diff-NPO, CHATS) live in ``snpo.methods`` and have the same signature.
Initial noise is drawn per image from its own seed, so the same (prompt, seed) gives the
same image whatever the batch it is drawn in.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import diffusers
import torch
from torch import Tensor, nn
from tqdm.auto import tqdm

from snpo.backbones.base import Backbone, Condition, cat_conditions
from snpo.errors import ConfigError

Guide = Callable[[Tensor, Tensor, Condition, Condition], Tensor]

SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "pndm": "PNDMScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "dpm++": "DPMSolverMultistepScheduler",
    "unipc": "UniPCMultistepScheduler",
}


@dataclass
class SamplerSettings:
    """Settings of the sampling loop (not the `snpo sample` command, whose config is
    ``SampleConfig``): the paper's protocol by default, DDIM, 50 steps, CFG 7.5."""

    num_inference_steps: int = 50
    guidance_scale: float = 7.5
    scheduler: str = "ddim"
    batch_size: int = 64

    def validate(self) -> None:
        if self.num_inference_steps < 1:
            raise ConfigError(f"num_inference_steps: expected an integer >= 1, got {self.num_inference_steps!r}")
        if self.guidance_scale < 0:
            raise ConfigError(f"guidance_scale: expected a number >= 0, got {self.guidance_scale!r}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size!r}")
        make_scheduler(self.scheduler, None)


def make_scheduler(name: str, train_config) -> object:
    """A diffusers scheduler by short name or class name, from the training scheduler config."""
    class_name = SCHEDULERS.get(name.lower(), name)
    cls = getattr(diffusers, class_name, None)
    if cls is None or not hasattr(cls, "from_config"):
        raise ConfigError(f"scheduler: expected one of {', '.join(SCHEDULERS)} or a diffusers scheduler class, got {name!r}")
    return None if train_config is None else cls.from_config(train_config)


def single_network_guide(backbone: Backbone, model: nn.Module, guidance_scale: float) -> Guide:
    """Plain CFG with both branches in one batched forward."""

    def guide(latents: Tensor, t: Tensor, cond: Condition, null: Condition) -> Tensor:
        if guidance_scale == 1:
            return backbone.predict(model, latents, t, cond)
        both = backbone.predict(model, torch.cat([latents, latents]), torch.cat([t, t]), cat_conditions(null, cond))
        uncond, conditional = both.chunk(2)
        return uncond + guidance_scale * (conditional - uncond)

    return guide


def initial_noise(shape: Sequence[int], seeds: Sequence[int]) -> Tensor:
    """One standard-normal latent per seed, each from its own CPU generator."""
    return torch.stack([torch.randn(tuple(shape), generator=torch.Generator().manual_seed(int(s))) for s in seeds])


@torch.no_grad()
def sample_latents(
    backbone: Backbone,
    guide: Guide,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    config: SamplerSettings,
    *,
    condition_extras: dict[str, Tensor] | None = None,
    show_progress: bool = False,
    desc: str = "sample",
) -> Tensor:
    """Latents for each (prompt, seed); batched by ``config.batch_size``."""
    config.validate()
    if len(prompts) != len(seeds):
        raise ConfigError(f"seeds: expected one per prompt ({len(prompts)}), got {len(seeds)}")
    device = backbone.device
    out = []
    batches = range(0, len(prompts), config.batch_size)
    for start in tqdm(batches, desc=desc, disable=not show_progress, leave=False):
        stop = start + config.batch_size
        batch_prompts = list(prompts[start:stop])
        extras = {k: v[start:stop].to(device) for k, v in (condition_extras or {}).items()}
        cond = backbone.encode_prompts(batch_prompts, **extras)
        null = backbone.null_condition(cond)
        # the family decides the scheduler's timesteps (flow models: the pipeline's sigmas and
        # resolution shift), the starting latents and the model input (Backbone hooks)
        scheduler = backbone.sampling_scheduler(config.scheduler, config.num_inference_steps, device, latent_shape)
        latents = backbone.initial_latents(latent_shape, seeds[start:stop], scheduler, device)
        dtype = cond["encoder_hidden_states"].dtype
        for t in scheduler.timesteps:
            model_input = backbone.sampling_model_input(scheduler, latents, t).to(dtype)
            timestep = t.expand(latents.shape[0]).to(device)
            prediction = guide(model_input, timestep, cond, null).float()
            latents = scheduler.step(prediction, t, latents).prev_sample
        out.append(latents.cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_images(
    backbone: Backbone,
    guide: Guide,
    prompts: Sequence[str],
    seeds: Sequence[int],
    latent_shape: Sequence[int],
    config: SamplerSettings,
    **kwargs,
) -> Tensor:
    """Images in [0, 1], shape (N, 3, H, W), for each (prompt, seed)."""
    latents = sample_latents(backbone, guide, prompts, seeds, latent_shape, config, **kwargs)
    pixels = []
    for start in range(0, len(latents), config.batch_size):
        chunk = latents[start : start + config.batch_size].to(backbone.device)
        pixels.append(backbone.decode_latents(chunk).float().cpu())
    return ((torch.cat(pixels) + 1) / 2).clamp(0, 1)
