"""SDXL backbones: a diffusers ``StableDiffusionXLPipeline`` folder.

What differs from SD1.5 (``snpo.backbones.sd``), each as ``StableDiffusionXLPipeline`` does it:

- Two text encoders. ``encoder_hidden_states`` is the concatenation of both encoders'
  PENULTIMATE hidden states; ``text_embeds`` is the pooled (projected) output of encoder 2.
- Micro-conditioning: ``time_ids = original_size + crop_top_left + target_size`` per IMAGE,
  ``(h, w, top, left, H, W)``. The data layer gives each image's real size before resizing
  and its crop offset, so the chosen and rejected image of a pair get their own time_ids:
  the condition has 2B rows, chosen first.
- Null condition: with ``force_zeros_for_empty_prompt`` (the SDXL default) the pipeline's
  unconditional branch is ZEROS for both ``encoder_hidden_states`` and ``text_embeds``;
  otherwise the empty prompt through both encoders (pooled from encoder 2). ``time_ids`` are
  unchanged on the null branch, as the pipeline's ``negative_add_time_ids = add_time_ids``.
  This is what ``pipe(prompt)`` uses (``negative_prompt=None``); note that passing
  ``negative_prompt=""`` to an SDXL pipeline encodes ``""`` instead of using zeros.
- The VAE stays in float32 under mixed precision when its config says ``force_upcast`` (the
  SDXL VAE overflows in fp16), unless ``upcast_vae=False`` is asked for (e.g. with an
  fp16-safe VAE given as ``pretrained_vae_model_name_or_path``).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Condition
from snpo.backbones.sd import StableDiffusionBackbone

TIME_ID_KEYS = ("original_size", "crop_top_left", "target_size")


class StableDiffusionXLBackbone(StableDiffusionBackbone):
    """A ``StableDiffusionXLPipeline``: see the module docstring."""

    family = "sdxl"
    pipeline_class_name = "StableDiffusionXLPipeline"
    text_condition_keys = ("encoder_hidden_states", "text_embeds")
    image_condition_keys = ("time_ids",)

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler: Any,
        *,
        text_encoder_2: nn.Module | None = None,
        tokenizer_2: Any = None,
        force_zeros_for_empty_prompt: bool = True,
        **kwargs: Any,
    ) -> None:
        super().__init__(unet, noise_scheduler, **kwargs)
        self.text_encoder_2 = text_encoder_2
        self.tokenizer_2 = tokenizer_2
        self.force_zeros_for_empty_prompt = force_zeros_for_empty_prompt

    @classmethod
    def component_classes(cls) -> dict[str, Any]:
        from transformers import CLIPTextModelWithProjection, CLIPTokenizer

        return {
            **super().component_classes(),
            "text_encoder_2": CLIPTextModelWithProjection,
            "tokenizer_2": CLIPTokenizer,
        }

    @classmethod
    def _build(cls, unet, scheduler, components, index, name, upcast_vae) -> StableDiffusionXLBackbone:
        vae = components.get("vae")
        if upcast_vae is None:
            upcast_vae = cls.default_upcast_vae(vae)
        # a pipeline config value; the class default (True) when model_index.json omits it
        zeros = bool(index.get("force_zeros_for_empty_prompt", True))
        return cls(unet, scheduler, model_name_or_path=name, upcast_vae=upcast_vae,
                   force_zeros_for_empty_prompt=zeros, **components)

    @staticmethod
    def default_upcast_vae(vae: nn.Module | None) -> bool:
        return bool(getattr(getattr(vae, "config", None), "force_upcast", True))

    # ---- encoding -------------------------------------------------------------------
    @property
    def default_size(self) -> int:
        """Image side the UNet was built for (the pipeline's default height and width)."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    def encode_text(self, prompts: Sequence[str]) -> Condition:
        """Both encoders, as ``StableDiffusionXLPipeline.encode_prompt`` (no clip skip)."""
        hidden, pooled = [], None
        pairs = ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2))
        for tokenizer, encoder in pairs:
            encoder = self._require(encoder, "text_encoder")
            ids, _ = self.tokenize(tokenizer, prompts)
            out = encoder(ids.to(encoder.device), output_hidden_states=True)
            if pooled is None and out[0].ndim == 2:  # the projected pooled output of encoder 2
                pooled = out[0]
            hidden.append(out.hidden_states[-2])
        return {"encoder_hidden_states": torch.cat(hidden, dim=-1), "text_embeds": pooled}

    def time_ids(
        self, n: int, original_size: Tensor | None = None, crop_top_left: Tensor | None = None,
        target_size: Tensor | None = None,
    ) -> Tensor:
        """``(n, 6)`` rows ``original_size + crop_top_left + target_size``; the defaults are
        the pipeline's (the default size, no crop)."""
        if target_size is None:
            target_size = torch.tensor([[self.default_size] * 2] * n)
        if original_size is None:
            original_size = target_size
        if crop_top_left is None:
            crop_top_left = torch.zeros(n, 2, dtype=torch.long)
        parts = [torch.as_tensor(t).reshape(n, 2).float() for t in (original_size, crop_top_left, target_size)]
        return torch.cat(parts, dim=1)

    def encode_prompts(self, prompts: Sequence[str], **extras: Tensor) -> Condition:
        unknown = set(extras) - set(TIME_ID_KEYS)
        if unknown:
            raise TypeError(f"encode_prompts: unexpected extras {sorted(unknown)}")
        cond = self.encode_text(prompts)
        device = cond["encoder_hidden_states"].device
        cond["time_ids"] = self.time_ids(len(prompts), **extras).to(device)
        return cond

    def condition_extras(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Each image's original size and crop (2B rows, chosen first) and the target size."""
        pixels = batch["chosen_pixels"]
        n = 2 * pixels.shape[0]
        extras = {"target_size": torch.tensor([list(pixels.shape[-2:])] * n)}
        for key in ("original_size", "crop_top_left"):
            if f"chosen_{key}" in batch:
                extras[key] = torch.cat([batch[f"chosen_{key}"], batch[f"rejected_{key}"]])
        return extras

    # ---- the null condition -------------------------------------------------------------
    def null_text(self) -> Condition:
        if self._null_text is None:
            with torch.no_grad():
                cond = self.encode_text([""])
            self._null_text = {k: cond[k].detach() for k in self.text_condition_keys}
        return self._null_text

    def empty_prompt_condition(self, cond: Condition) -> Condition:
        return super().null_condition(cond)  # "" through both encoders, pooled included

    def null_condition(self, cond: Condition) -> Condition:
        if not self.force_zeros_for_empty_prompt:
            return super().null_condition(cond)
        out = dict(cond)
        for key in self.text_condition_keys:
            out[key] = torch.zeros_like(cond[key])
        return out

    def describe(self) -> dict[str, Any]:
        return {**super().describe(), "force_zeros_for_empty_prompt": self.force_zeros_for_empty_prompt}
