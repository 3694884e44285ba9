"""The toy backbone: a CPU-sized text-to-image diffusion model built from real diffusers and
transformers classes.

- Denoiser: a tiny ``UNet2DConditionModel`` (cross-attention on the text tokens, as SD).
- Text encoder: a tiny ``CLIPTextModel`` with a word-level ``CLIPTokenizer``; the null
  condition is the embedding of the empty prompt, as in Stable Diffusion 1.5.
- "VAE": a fixed, exactly invertible patch encoding (``pixel_unshuffle``), so a 16 px RGB
  image is an 8 x 8 x 12 latent. It keeps the UNet as cheap as a CPU demo needs while
  the training step still goes image -> latent -> noise -> denoiser as it does for SD.

Saved as a folder like a diffusers pipeline: ``model_index.json``, ``unet/``,
``text_encoder/``, ``tokenizer/``, ``scheduler/``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, UNet2DConditionModel
from torch import Tensor, nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from snpo.backbones.base import Backbone, Condition
from snpo.errors import ConfigError

TOY_CLASS_NAME = "SnpoToyPipeline"


@dataclass
class ToyModelConfig:
    """Sizes of the toy model (defaults measured to fit the demo's CPU budget)."""

    resolution: int = 16
    patch_size: int = 2
    block_out_channels: tuple[int, ...] = (32, 32)
    layers_per_block: int = 1
    attention_heads: int = 1
    text_width: int = 32
    text_layers: int = 2
    text_heads: int = 2
    max_prompt_tokens: int = 16
    num_train_timesteps: int = 1000
    beta_schedule: str = "squaredcos_cap_v2"
    prediction_type: str = "v_prediction"  # epsilon left heavy residual noise at 16 px (see docs/toy.md)

    @property
    def latent_channels(self) -> int:
        return 3 * self.patch_size**2

    @property
    def latent_size(self) -> int:
        return self.resolution // self.patch_size


class ToyBackbone(Backbone):
    """Backbone for the offline toy world; see the module docstring."""

    family = "toy"

    def __init__(
        self,
        denoiser: UNet2DConditionModel,
        text_encoder: CLIPTextModel,
        tokenizer: CLIPTokenizer,
        noise_scheduler: DDPMScheduler,
        config: ToyModelConfig,
    ) -> None:
        super().__init__()
        self.denoiser = denoiser
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.noise_scheduler = noise_scheduler
        self.config = config
        self._null_embedding: Tensor | None = None

    # ---- construction ---------------------------------------------------------------
    @classmethod
    def create(cls, tokenizer: CLIPTokenizer, config: ToyModelConfig | None = None, *, seed: int = 0) -> ToyBackbone:
        """A randomly initialised toy model (to be pretrained by ``snpo.toy.world``)."""
        config = config or ToyModelConfig()
        torch.manual_seed(seed)
        text_encoder = CLIPTextModel(
            CLIPTextConfig(
                vocab_size=len(tokenizer),
                hidden_size=config.text_width,
                intermediate_size=config.text_width * 4,
                num_hidden_layers=config.text_layers,
                num_attention_heads=config.text_heads,
                max_position_embeddings=config.max_prompt_tokens,
                bos_token_id=tokenizer.bos_token_id,
                eos_token_id=tokenizer.eos_token_id,
                pad_token_id=tokenizer.pad_token_id,
            )
        )
        denoiser = cls.build_denoiser(config)
        scheduler = DDPMScheduler(
            num_train_timesteps=config.num_train_timesteps,
            beta_schedule=config.beta_schedule,
            prediction_type=config.prediction_type,
            clip_sample=False,
        )
        return cls(denoiser, text_encoder, tokenizer, scheduler, config)

    @staticmethod
    def build_denoiser(config: ToyModelConfig) -> UNet2DConditionModel:
        """The toy's UNet, randomly initialised (the architecture, for ``create`` and counts)."""
        return UNet2DConditionModel(
            sample_size=config.latent_size,
            in_channels=config.latent_channels,
            out_channels=config.latent_channels,
            block_out_channels=tuple(config.block_out_channels),
            layers_per_block=config.layers_per_block,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            cross_attention_dim=config.text_width,
            attention_head_dim=config.attention_heads,
            norm_num_groups=8,
        )

    @classmethod
    def from_pretrained(cls, path: str | Path) -> ToyBackbone:
        path = Path(path)
        index = json.loads((path / "model_index.json").read_text())
        if index.get("_class_name") != TOY_CLASS_NAME:
            raise ConfigError(f"model_name_or_path: {path} is not a snpo toy model folder")
        config = ToyModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in index["toy_config"].items()})
        return cls(
            UNet2DConditionModel.from_pretrained(path / "unet"),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            CLIPTokenizer.from_pretrained(path / "tokenizer"),
            DDPMScheduler.from_pretrained(path / "scheduler"),
            config,
        )

    def save_pretrained(self, path: str | Path, denoiser: nn.Module | None = None) -> None:
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        (denoiser or self.denoiser).save_pretrained(path / "unet")
        self.text_encoder.save_pretrained(path / "text_encoder")
        self.tokenizer.save_pretrained(path / "tokenizer")
        self.noise_scheduler.save_pretrained(path / "scheduler")
        index = {"_class_name": TOY_CLASS_NAME, "toy_config": asdict(self.config)}
        (path / "model_index.json").write_text(json.dumps(index, indent=2))

    # ---- the backbone interface -----------------------------------------------------
    def encode_images(self, pixels: Tensor) -> Tensor:
        return F.pixel_unshuffle(pixels, self.config.patch_size)

    def decode_latents(self, latents: Tensor) -> Tensor:
        return F.pixel_shuffle(latents, self.config.patch_size)

    def tokenize(self, prompts: Sequence[str]) -> Tensor:
        return self.tokenizer(
            list(prompts), padding="max_length", max_length=self.config.max_prompt_tokens,
            truncation=True, return_tensors="pt",
        ).input_ids

    def encode_prompts(self, prompts: Sequence[str], **extras: Tensor) -> Condition:
        ids = self.tokenize(prompts).to(self.text_encoder.device)
        return {"encoder_hidden_states": self.text_encoder(ids).last_hidden_state}

    def null_condition(self, cond: Condition) -> Condition:
        # The empty prompt's embedding, exactly what the sampler feeds the null branch. While
        # the text encoder trains (pretraining), it is encoded afresh each time, with its
        # gradient: a cached one would train the null branch on the initial encoder's
        # embedding, which the sampler (with the trained encoder) never feeds.
        hidden = cond["encoder_hidden_states"]
        if self.text_encoder.training and torch.is_grad_enabled():
            return {"encoder_hidden_states": self.encode_prompts([""])["encoder_hidden_states"].expand_as(hidden)}
        if self._null_embedding is None or self._null_embedding.device != hidden.device:
            with torch.no_grad():
                self._null_embedding = self.encode_prompts([""])["encoder_hidden_states"].detach()
        return {"encoder_hidden_states": self._null_embedding.to(hidden.dtype).expand_as(hidden)}

    def frozen_modules(self) -> dict[str, nn.Module]:
        return {"text_encoder": self.text_encoder}

    def save_trained(self, output_dir: str | Path, denoiser: nn.Module | None = None) -> list[str]:
        """Save a whole toy model folder (the toy is small enough to copy entirely)."""
        denoiser = denoiser or self.denoiser
        if self.lora_rank > 0:
            # fold the adapters into plain weights (base + scale * B @ A): the toy folder
            # holds a whole UNet that loads without peft
            from snpo.merging import effective_state_dict

            folded = UNet2DConditionModel.from_config(denoiser.config)
            folded.load_state_dict(effective_state_dict(denoiser))
            denoiser = folded
        self.save_pretrained(output_dir, denoiser)
        return ["model_index.json", "unet", "text_encoder", "tokenizer", "scheduler"]

    def describe(self) -> dict:
        return {**super().describe(), "toy_config": asdict(self.config)}
