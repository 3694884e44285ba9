"""Stable Diffusion 3 / 3.5 backbones: a diffusers ``StableDiffusion3Pipeline`` folder.

Rectified flow, sigma sampling and the sampler are shared with FLUX
(``snpo.backbones.flow``). What is SD3's own, each as ``StableDiffusion3Pipeline`` does it:

- Three text encoders. ``encoder_hidden_states`` = the two CLIP encoders' PENULTIMATE hidden
  states concatenated on the feature axis, zero-padded (``F.pad``) to T5's width, then T5's
  last hidden state appended on the token axis (77 + ``max_sequence_length`` tokens).
  ``pooled_projections`` = both CLIP encoders' projected pooled outputs, concatenated.
- ``max_sequence_length`` = 256, the pipeline's default (the LoRA script trains with 77;
  training must use what the sampler uses, since padded T5 tokens take part in the joint
  attention).
- Without T5 (``use_t5=False``, or a folder saved without it: the pipeline's
  ``text_encoder_3=None``), the T5 part is zeros of width ``joint_attention_dim``.
- Null condition: the pipeline encodes ``negative_prompt = ""`` with all encoders (pooled
  included) for its unconditional branch; that is the null condition here.
- ``predict``: ``transformer(hidden_states, timestep, encoder_hidden_states,
  pooled_projections)``, the timestep in scheduler units (0..1000) as the pipeline passes it.
- Sampling: the pipeline's timesteps (``set_timesteps(n)`` with its static ``shift``, or
  ``mu`` from the image sequence length when the scheduler uses dynamic shifting).
- LoRA targets: the attention projections of the joint blocks, the modules diffusers'
  ``train_dreambooth_lora_sd3.py`` targets by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from snpo.backbones.base import Condition
from snpo.backbones.flow import FlowMatchingBackbone, calculate_shift

#: LoRA targets of ``train_dreambooth_lora_sd3.py`` (its default ``--lora_layers``)
SD3_LORA_TARGET_MODULES = (
    "attn.add_k_proj", "attn.add_q_proj", "attn.add_v_proj", "attn.to_add_out",
    "attn.to_k", "attn.to_out.0", "attn.to_q", "attn.to_v",
)


class StableDiffusion3Backbone(FlowMatchingBackbone):
    """A ``StableDiffusion3Pipeline`` (SD3, SD3.5): see the module docstring."""

    family = "sd3"
    pipeline_class_name = "StableDiffusion3Pipeline"
    transformer_class_name = "SD3Transformer2DModel"
    lora_target_modules = SD3_LORA_TARGET_MODULES
    optional_components = ("text_encoder_3", "tokenizer_3")
    max_sequence_length = 256
    loading_options = ("use_t5",)
    #: ``StableDiffusion3Pipeline.__call__``'s defaults (28 steps, CFG 7.0)
    default_inference_steps = 28
    default_guidance_scale = 7.0

    def __init__(
        self,
        transformer: nn.Module,
        noise_scheduler: Any,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        text_encoder_3: nn.Module | None = None,
        tokenizer_3: Any = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(transformer, noise_scheduler, **kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.text_encoder_3 = text_encoder_3
        self.tokenizer_3 = tokenizer_3
        #: whether prompts go through T5 (False: the pipeline's zeros in its place)
        self.t5_enabled = text_encoder_3 is not None

    @classmethod
    def component_classes(cls) -> dict[str, Any]:
        from diffusers import AutoencoderKL
        from transformers import (
            CLIPTextModelWithProjection,
            CLIPTokenizer,
            T5EncoderModel,
            T5TokenizerFast,
        )

        return {
            "vae": AutoencoderKL,
            "text_encoder": CLIPTextModelWithProjection, "tokenizer": CLIPTokenizer,
            "text_encoder_2": CLIPTextModelWithProjection, "tokenizer_2": CLIPTokenizer,
            "text_encoder_3": T5EncoderModel, "tokenizer_3": T5TokenizerFast,
        }

    @classmethod
    def skipped_components(cls, *, use_t5: bool = True, **options: Any) -> set[str]:
        """``use_t5=False``: drop T5, as ``from_pretrained(..., text_encoder_3=None, tokenizer_3=None)``."""
        super().skipped_components(**options)
        return set() if use_t5 else {"text_encoder_3", "tokenizer_3"}

    def apply_loading_options(self, index: dict[str, Any], *, use_t5: bool = True, **options: Any) -> None:
        has_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        self.t5_enabled = bool(use_t5 and has_t5)

    @property
    def uses_t5(self) -> bool:
        return self.t5_enabled

    # ---- encoding -------------------------------------------------------------------
    def _clip(self, tokenizer: Any, encoder: nn.Module, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        encoder = self._require(encoder, "text_encoder")
        out = encoder(self._clip_ids(tokenizer, prompts).to(encoder.device), output_hidden_states=True)
        hidden = out.hidden_states[-2].to(dtype=self.text_encoder.dtype)
        return hidden, out[0]

    def _t5(self, prompts: Sequence[str], like: Tensor) -> Tensor:
        if not self.t5_enabled:  # the pipeline's zeros when T5 is dropped
            width = int(self.denoiser.config.joint_attention_dim)
            return torch.zeros(len(prompts), self.max_sequence_length, width, device=like.device,
                               dtype=self.text_encoder.dtype)
        encoder = self._require(self.text_encoder_3, "text_encoder_3")
        hidden = encoder(self._t5_ids(self._require(self.tokenizer_3, "tokenizer_3"), prompts).to(encoder.device))[0]
        return hidden.to(dtype=encoder.dtype, device=like.device)

    def encode_prompts(self, prompts: Sequence[str], **extras: Tensor) -> Condition:
        """``StableDiffusion3Pipeline.encode_prompt`` (no clip skip, one image per prompt)."""
        if extras:
            raise TypeError(f"encode_prompts: unexpected extras {sorted(extras)}")
        hidden_1, pooled_1 = self._clip(self.tokenizer, self.text_encoder, prompts)
        hidden_2, pooled_2 = self._clip(self.tokenizer_2, self.text_encoder_2, prompts)
        clip = torch.cat([hidden_1, hidden_2], dim=-1)
        t5 = self._t5(prompts, clip)
        clip = F.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
        return {
            "encoder_hidden_states": torch.cat([clip, t5], dim=-2),
            "pooled_projections": torch.cat([pooled_1, pooled_2], dim=-1),
        }

    # ---- the denoiser -----------------------------------------------------------------
    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Condition) -> Tensor:
        return model(
            hidden_states=noisy, timestep=timesteps, encoder_hidden_states=cond["encoder_hidden_states"],
            pooled_projections=cond["pooled_projections"], return_dict=False,
        )[0]

    # ---- sampling -------------------------------------------------------------------
    def pipeline_timestep_kwargs(self, num_inference_steps: int, latent_shape: Sequence[int]) -> dict[str, Any]:
        config = self.noise_scheduler.config
        if not config.get("use_dynamic_shifting", False):
            return {}
        patch = int(self.denoiser.config.patch_size)
        seq_len = (int(latent_shape[-2]) // patch) * (int(latent_shape[-1]) // patch)
        mu = calculate_shift(
            seq_len, config.get("base_image_seq_len", 256), config.get("max_image_seq_len", 4096),
            config.get("base_shift", 0.5), config.get("max_shift", 1.16),  # SD3's defaults
        )
        return {"mu": mu}

    def encoding_options(self) -> dict[str, Any]:
        return {**super().encoding_options(), "uses_t5": self.uses_t5}

    @classmethod
    def encoding_options_for(cls, options: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
        has_t5 = (index.get("text_encoder_3") or [None])[0] is not None
        return {**super().encoding_options_for(options, index),
                "uses_t5": bool(options.get("use_t5") is not False and has_t5)}
