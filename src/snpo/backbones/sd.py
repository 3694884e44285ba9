"""Stable Diffusion 1.5-style backbones: a diffusers ``StableDiffusionPipeline`` folder.

- Images -> latents: the VAE posterior MEAN, shifted and scaled as the pipeline's decoder
  expects: ``z = (mean - shift) * scaling_factor`` (or ``(mean - latents_mean) *
  scaling_factor / latents_std`` when the VAE config has them). The posterior standard
  deviation of the SD VAEs is tiny next to the latents, and the mean makes a latent cache
  exact and multi-process runs independent of how pairs are split; the reference scripts'
  ``latent_dist.sample()`` would draw from the global RNG.
- Prompts -> ``{"encoder_hidden_states"}``: the CLIP text encoder's last hidden state of
  the prompt padded to ``tokenizer.model_max_length`` (what ``pipe.encode_prompt`` does).
- Null condition: the empty prompt ``""`` through the same text encoder, which is exactly
  the negative embedding ``StableDiffusionPipeline.encode_prompt`` makes for
  ``negative_prompt=None`` (and for ``""``).
- Prediction target: from the scheduler config (``epsilon`` or ``v_prediction``).
- The training noise scheduler is a ``DDPMScheduler`` built from the pipeline's scheduler
  config (same betas, same prediction type), as the diffusers training scripts do.

``StableDiffusionXLBackbone`` (``snpo.backbones.sdxl``) extends this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Backbone, Condition
from snpo.backbones.loading import read_model_index
from snpo.errors import ConfigError

#: Files a full fine-tune writes: ``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``.
UNET_SUBFOLDER = "unet"
LORA_WEIGHTS_NAME = "pytorch_lora_weights.safetensors"


class StableDiffusionBackbone(Backbone):
    """A ``StableDiffusionPipeline`` (SD1.x / SD2.x layout): one CLIP text encoder.

    The VAE and text encoder may be absent (``with_encoders=False``) when training from a
    latent/text cache; encoding then raises, and the null condition must be given with
    :meth:`preset_null_text`.
    """

    family = "sd"
    pipeline_class_name = "StableDiffusionPipeline"
    #: condition entries that depend on the prompt only (one row per prompt in a cache)
    text_condition_keys: tuple[str, ...] = ("encoder_hidden_states",)

    def __init__(
        self,
        unet: nn.Module,
        noise_scheduler: Any,
        *,
        vae: nn.Module | None = None,
        text_encoder: nn.Module | None = None,
        tokenizer: Any = None,
        model_name_or_path: str = "",
        upcast_vae: bool = False,
    ) -> None:
        super().__init__()
        self.denoiser = unet
        self.noise_scheduler = noise_scheduler
        self.vae = vae
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.model_name_or_path = model_name_or_path
        self.upcast_vae = upcast_vae
        self._null_text: Condition | None = None

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def component_classes(cls) -> dict[str, Any]:
        from diffusers import AutoencoderKL
        from transformers import CLIPTextModel, CLIPTokenizer

        return {"vae": AutoencoderKL, "text_encoder": CLIPTextModel, "tokenizer": CLIPTokenizer}

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        *,
        with_encoders: bool = True,
        vae_path: str | Path | None = None,
        upcast_vae: bool | None = None,
        revision: str | None = None,
        variant: str | None = None,
    ) -> StableDiffusionBackbone:
        """Load the pipeline's components from a local folder (see ``load_backbone``).

        Args:
            with_encoders: load the VAE and text encoder(s) (not needed with a cache).
            vae_path: a separate VAE folder or hub id (e.g. an fp16-safe SDXL VAE).
            upcast_vae: keep the VAE in float32 under mixed precision; None = the family's
                rule (SD1.5: no; SDXL: the VAE config's ``force_upcast``).
        """
        from diffusers import DDPMScheduler, UNet2DConditionModel

        path = Path(path)
        index = read_model_index(path)
        kwargs = {"revision": revision, "variant": variant}
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=UNET_SUBFOLDER, **kwargs)
        scheduler = DDPMScheduler.from_pretrained(path, subfolder="scheduler")
        components: dict[str, Any] = {}
        if with_encoders:
            for name, klass in cls.component_classes().items():
                if index.get(name, [None, None])[0] is None:
                    raise ConfigError(f"model_name_or_path: {path} has no {name} component")
                if name == "vae" and vae_path is not None:
                    components[name] = klass.from_pretrained(vae_path, revision=revision)
                elif name.startswith("tokenizer"):
                    components[name] = klass.from_pretrained(path, subfolder=name, revision=revision)
                else:
                    components[name] = klass.from_pretrained(path, subfolder=name, **kwargs)
        return cls._build(unet, scheduler, components, index, str(path), upcast_vae)

    @classmethod
    def _build(cls, unet, scheduler, components, index, name, upcast_vae) -> StableDiffusionBackbone:
        vae = components.get("vae")
        if upcast_vae is None:
            upcast_vae = cls.default_upcast_vae(vae)
        return cls(unet, scheduler, model_name_or_path=name, upcast_vae=upcast_vae, **components)

    @staticmethod
    def default_upcast_vae(vae: nn.Module | None) -> bool:
        return False  # SD1.5 VAEs are fine in half precision

    # ---- encoders ---------------------------------------------------------------------
    def _require(self, module: Any, name: str) -> Any:
        if module is None:
            raise RuntimeError(f"{name} is not loaded (this backbone was loaded for training from a cache)")
        return module

    @property
    def vae_scale_factor(self) -> int:
        vae = self._require(self.vae, "vae")
        return 2 ** (len(vae.config.block_out_channels) - 1)

    @property
    def encoder_dtype(self) -> torch.dtype:
        return self.vae.dtype if self.vae is not None else torch.float32

    def _latent_stats(self, like: Tensor) -> tuple[Tensor | float, Tensor | float, float]:
        config = self.vae.config
        scale = float(config.scaling_factor)
        mean, std = getattr(config, "latents_mean", None), getattr(config, "latents_std", None)
        if mean is not None and std is not None:
            shape = (1, -1, 1, 1)
            return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
                    torch.tensor(std, device=like.device, dtype=like.dtype).view(shape), scale)
        shift = getattr(config, "shift_factor", None)
        return float(shift or 0.0), 1.0, scale

    def encode_images(self, pixels: Tensor) -> Tensor:
        vae = self._require(self.vae, "vae")
        mean = vae.encode(pixels.to(vae.device, vae.dtype)).latent_dist.mean
        shift, std, scale = self._latent_stats(mean)
        return (mean - shift) * scale / std

    def decode_latents(self, latents: Tensor) -> Tensor:
        vae = self._require(self.vae, "vae")
        shift, std, scale = self._latent_stats(latents)
        latents = latents * std / scale + shift
        return vae.decode(latents.to(vae.device, vae.dtype)).sample

    def tokenize(self, tokenizer: Any, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
        out = tokenizer(
            list(prompts), padding="max_length", max_length=tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        )
        return out.input_ids, out.attention_mask

    def encode_prompts(self, prompts: Sequence[str], **extras: Tensor) -> Condition:
        encoder = self._require(self.text_encoder, "text_encoder")
        ids, mask = self.tokenize(self.tokenizer, prompts)
        # the pipeline passes the mask only when the encoder's config asks for it
        use_mask = getattr(encoder.config, "use_attention_mask", False)
        hidden = encoder(ids.to(encoder.device), attention_mask=mask.to(encoder.device) if use_mask else None)[0]
        return {"encoder_hidden_states": hidden}

    # ---- the null condition -------------------------------------------------------------
    def null_text(self) -> Condition:
        """The null condition's prompt-dependent entries, one row (computed once)."""
        if self._null_text is None:
            with torch.no_grad():
                cond = self.encode_prompts([""])
            self._null_text = {k: cond[k].detach() for k in self.text_condition_keys}
        return self._null_text

    def preset_null_text(self, null_text: Condition) -> None:
        """Use a stored null condition (from a cache) instead of running the text encoder."""
        self._null_text = {k: v.detach() for k, v in null_text.items()}

    def null_condition(self, cond: Condition) -> Condition:
        null = self.null_text()
        out = dict(cond)  # per-image entries (SDXL's time_ids) are the sampler's too
        for key in self.text_condition_keys:
            value = cond[key]
            out[key] = null[key].to(value.device, value.dtype).expand_as(value)
        return out

    # ---- devices and dtypes ---------------------------------------------------------
    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype | None = None) -> StableDiffusionBackbone:
        super().to(device, frozen_dtype)
        if self.vae is not None and self.upcast_vae and frozen_dtype is not None:
            self.vae.to(device, dtype=torch.float32)  # half-precision VAE overflows (SDXL)
        return self

    # ---- saving ---------------------------------------------------------------------
    def pipeline_class(self) -> Any:
        import diffusers

        return getattr(diffusers, self.pipeline_class_name)

    def save_trained(self, output_dir: str | Path, denoiser: nn.Module | None = None) -> list[str]:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(dir)``;
        full fine-tune: ``unet/`` for ``UNet2DConditionModel.from_pretrained(dir, subfolder="unet")``."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        denoiser = denoiser if denoiser is not None else self.denoiser
        if self.lora_rank > 0:
            from diffusers.utils import convert_state_dict_to_diffusers
            from peft.utils import get_peft_model_state_dict

            layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
            layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
            self.pipeline_class().save_lora_weights(output_dir, unet_lora_layers=layers, safe_serialization=True)
            return [LORA_WEIGHTS_NAME]
        denoiser.save_pretrained(output_dir / UNET_SUBFOLDER)
        return [UNET_SUBFOLDER]

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "model_name_or_path": self.model_name_or_path,
            "pipeline_class": self.pipeline_class_name,
        }
