"""FLUX.1 backbones: a diffusers ``FluxPipeline`` folder (FLUX.1-dev, -schnell and fine-tunes).

Rectified flow, sigma sampling and the sampler are shared with SD3
(``snpo.backbones.flow``). What is FLUX's own, each as ``FluxPipeline`` does it:

- Condition: ``pooled_projections`` = the CLIP text encoder's pooled output;
  ``encoder_hidden_states`` = T5's last hidden state, ``max_sequence_length`` = 512 tokens
  (the pipeline's and the LoRA script's default). Text ids are zeros, one row per T5 token,
  and are built in ``predict``, so they are not part of the condition.
- Latents are kept UNPACKED ``(C, h, w)`` everywhere in snpo (cache, noise, targets, the
  sampler); ``predict`` packs them into 2x2 patches (``FluxPipeline._pack_latents``), builds
  the latent image ids of the ``h/2 x w/2`` grid and unpacks the output. Noising, the
  target, the per-element mean error and the Euler step are element-wise, so this is the
  packed computation of the pipeline and the scripts, in another memory layout; the
  initial noise the pipeline draws is unpacked too (it packs after drawing).
- Guidance: a guidance-distilled transformer (``guidance_embeds``, FLUX.1-dev) takes the
  guidance value as an input: ``embedded_guidance_scale`` (3.5, the default of both
  ``FluxPipeline`` and ``train_dreambooth_lora_flux.py``) in training and sampling.
  ``predict`` passes ``timestep / 1000``, as the pipeline and the script do.
- Null branch: ``FluxPipeline`` runs an unconditional branch only with ``true_cfg_scale > 1``
  and a negative prompt. ``null_condition`` is the encoded empty prompt (what it uses for
  ``negative_prompt=""``), but ``has_null_branch`` is ``true_cfg`` (default False): snpo,
  snpo-naive, CHATS and Diff-NPO train a branch a distilled FLUX sampler never runs unless
  true CFG is opted in for training AND sampling.
- LoRA targets: attention and feed-forward projections of the double-stream blocks (and
  the attention projections of the single-stream ones), the default of diffusers'
  ``train_dreambooth_lora_flux.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from snpo.backbones.base import Condition
from snpo.backbones.flow import FlowMatchingBackbone, calculate_shift

#: LoRA targets of ``train_dreambooth_lora_flux.py`` (its default without ``--lora_layers``)
FLUX_LORA_TARGET_MODULES = (
    "attn.to_k", "attn.to_q", "attn.to_v", "attn.to_out.0",
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "ff.net.0.proj", "ff.net.2", "ff_context.net.0.proj", "ff_context.net.2",
)
#: ``FluxPipeline.default_sample_size`` (the pipeline's default side is this x the VAE factor)
FLUX_DEFAULT_SAMPLE_SIZE = 128


def pack_latents(latents: Tensor) -> Tensor:
    """``(B, C, h, w)`` -> ``(B, h/2 * w/2, 4C)``: ``FluxPipeline._pack_latents``."""
    b, c, h, w = latents.shape
    latents = latents.view(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return latents.reshape(b, (h // 2) * (w // 2), c * 4)


def unpack_latents(packed: Tensor, h: int, w: int) -> Tensor:
    """``(B, h/2 * w/2, 4C)`` -> ``(B, C, h, w)``: ``FluxPipeline._unpack_latents``."""
    b, _, channels = packed.shape
    latents = packed.view(b, h // 2, w // 2, channels // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return latents.reshape(b, channels // 4, h, w)


def latent_image_ids(h: int, w: int, device: torch.device | str, dtype: torch.dtype) -> Tensor:
    """``FluxPipeline._prepare_latent_image_ids`` for an ``h x w`` latent: ``(h/2 * w/2, 3)``
    rows ``(0, row, column)`` of the packed grid."""
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = ids[..., 1] + torch.arange(h // 2)[:, None]
    ids[..., 2] = ids[..., 2] + torch.arange(w // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxBackbone(FlowMatchingBackbone):
    """A ``FluxPipeline``: see the module docstring."""

    family = "flux"
    pipeline_class_name = "FluxPipeline"
    transformer_class_name = "FluxTransformer2DModel"
    lora_target_modules = FLUX_LORA_TARGET_MODULES
    max_sequence_length = 512
    #: the guidance value a guidance-distilled transformer gets as an input (training and
    #: sampling alike); ignored by a transformer without ``guidance_embeds``
    embedded_guidance_scale: float = 3.5
    #: opt in to true CFG: the sampler runs a null branch on the encoded empty prompt
    #: (``FluxPipeline(..., negative_prompt="", true_cfg_scale=s)``), so objectives that
    #: train the null branch apply
    true_cfg: bool = False
    setting_names = (*FlowMatchingBackbone.setting_names, "embedded_guidance_scale", "true_cfg")
    #: ``FluxPipeline.__call__``'s defaults: 28 steps, no null branch (the distilled guidance
    #: is ``embedded_guidance_scale``); with true CFG, snpo's choice of scale (the pipeline's
    #: ``true_cfg_scale`` defaults to 1, i.e. off)
    default_inference_steps = 28
    default_guidance_scale = 1.0
    default_true_cfg_scale = 4.0

    def __init__(
        self,
        transformer: nn.Module,
        noise_scheduler: Any,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(transformer, noise_scheduler, **kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2

    @classmethod
    def component_classes(cls) -> dict[str, Any]:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer, T5EncoderModel, T5TokenizerFast

        return {
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer,
            "text_encoder_2": T5EncoderModel, "tokenizer_2": T5TokenizerFast,
        }

    # ---- guidance and the null branch ---------------------------------------------------
    @property
    def guidance_distilled(self) -> bool:
        """The transformer takes a guidance input (FLUX.1-dev); schnell does not."""
        return bool(getattr(self.denoiser.config, "guidance_embeds", False))

    @property
    def has_null_branch(self) -> bool:  # type: ignore[override]
        return bool(self.true_cfg)

    @classmethod
    def has_null_branch_for(cls, *, true_cfg: bool = False) -> bool:
        return bool(true_cfg)

    @classmethod
    def sampling_defaults(cls, *, true_cfg: bool = False) -> dict[str, Any]:
        defaults = super().sampling_defaults(true_cfg=true_cfg)
        if true_cfg:
            defaults["guidance_scale"] = cls.default_true_cfg_scale
        return defaults

    # ---- geometry -------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels) // 4

    @property
    def spatial_multiple(self) -> int:
        return self.vae_scale_factor * 2  # 2x2 packing

    @property
    def default_size(self) -> int:
        return FLUX_DEFAULT_SAMPLE_SIZE * self.vae_scale_factor

    # ---- encoding -------------------------------------------------------------------
    def encode_prompts(self, prompts: Sequence[str], **extras: Tensor) -> Condition:
        """``FluxPipeline.encode_prompt`` (one image per prompt)."""
        if extras:
            raise TypeError(f"encode_prompts: unexpected extras {sorted(extras)}")
        clip = self._require(self.text_encoder, "text_encoder")
        pooled = clip(self._clip_ids(self.tokenizer, prompts).to(clip.device), output_hidden_states=False).pooler_output
        pooled = pooled.to(dtype=clip.dtype)
        t5 = self._require(self.text_encoder_2, "text_encoder_2")
        ids = self._t5_ids(self._require(self.tokenizer_2, "tokenizer_2"), prompts)
        hidden = t5(ids.to(t5.device), output_hidden_states=False)[0].to(dtype=t5.dtype, device=pooled.device)
        return {"encoder_hidden_states": hidden, "pooled_projections": pooled}

    # ---- the denoiser -----------------------------------------------------------------
    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Condition) -> Tensor:
        """Pack, run the transformer as ``FluxPipeline`` does, unpack the velocity."""
        b, _, h, w = noisy.shape
        hidden = cond["encoder_hidden_states"]
        guidance = None
        if self.guidance_distilled:
            guidance = torch.full((b,), float(self.embedded_guidance_scale), device=noisy.device, dtype=torch.float32)
        out = model(
            hidden_states=pack_latents(noisy),
            timestep=timesteps.to(noisy.dtype) / 1000,
            guidance=guidance,
            pooled_projections=cond["pooled_projections"],
            encoder_hidden_states=hidden,
            txt_ids=torch.zeros(hidden.shape[1], 3, device=noisy.device, dtype=hidden.dtype),
            img_ids=latent_image_ids(h, w, noisy.device, noisy.dtype),
            return_dict=False,
        )[0]
        return unpack_latents(out, h, w)

    # ---- sampling -------------------------------------------------------------------
    def pipeline_timestep_kwargs(self, num_inference_steps: int, latent_shape: Sequence[int]) -> dict[str, Any]:
        """``FluxPipeline``: sigmas ``linspace(1, 1/n, n)`` (unless ``use_flow_sigmas``) and
        ``mu`` from the packed sequence length."""
        config = self.noise_scheduler.config
        sigmas = np.linspace(1.0, 1 / num_inference_steps, num_inference_steps)
        if config.get("use_flow_sigmas", False):
            sigmas = None
        seq_len = (int(latent_shape[-2]) // 2) * (int(latent_shape[-1]) // 2)
        mu = calculate_shift(
            seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.15),
        )
        return {"sigmas": sigmas, "mu": mu}

    def sampling_scheduler(
        self, name: str, num_inference_steps: int, device: torch.device | str, latent_shape: Sequence[int]
    ) -> Any:
        scheduler = super().sampling_scheduler(name, num_inference_steps, device, latent_shape)
        if hasattr(scheduler, "set_begin_index"):
            scheduler.set_begin_index(0)  # as FluxPipeline
        return scheduler

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "embedded_guidance_scale": self.embedded_guidance_scale,
            "guidance_distilled": self.guidance_distilled,
            "true_cfg": self.true_cfg,
        }
