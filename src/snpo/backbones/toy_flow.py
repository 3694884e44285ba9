"""The flow-matching toy: the toy backbone's tiny UNet, text encoder and patch "VAE"
(``snpo.backbones.toy``) trained as a rectified flow, so the SD3/FLUX training and sampling
path (``snpo.backbones.flow.RectifiedFlow``) runs offline on a CPU.

- Noising ``x_t = (1 - sigma) x0 + sigma eps``, target ``eps - x0``, sigma drawn as the
  diffusers flow-matching scripts do (logit-normal by default) from a
  ``FlowMatchEulerDiscreteScheduler`` with ``num_train_timesteps`` and a static ``shift``.
- Sampling: Euler steps of that scheduler (``scheduler: FlowMatchEulerDiscreteScheduler``),
  starting from unscaled noise; CFG with the empty prompt as the null branch, as the toy.

Saved like the toy (``model_index.json`` + ``unet/``, ``text_encoder/``, ``tokenizer/``,
``scheduler/``) under its own class name, so ``detect_family`` tells the two apart.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from diffusers import FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from torch import nn
from transformers import CLIPTextModel, CLIPTokenizer

from snpo.backbones.flow import RectifiedFlow
from snpo.backbones.toy import ToyBackbone, ToyModelConfig
from snpo.errors import ConfigError

TOY_FLOW_CLASS_NAME = "SnpoToyFlowPipeline"


class ToyFlowBackbone(RectifiedFlow, ToyBackbone):
    """The toy model as a rectified flow; see the module docstring."""

    family = "toy-flow"

    @classmethod
    def create(
        cls, tokenizer: CLIPTokenizer, config: ToyModelConfig | None = None, *, seed: int = 0, shift: float = 1.0,
    ) -> ToyFlowBackbone:
        """A randomly initialised flow toy (``config.prediction_type`` and ``beta_schedule``
        do not apply; ``shift`` is the scheduler's static sigma shift)."""
        toy = ToyBackbone.create(tokenizer, config, seed=seed)
        scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=toy.config.num_train_timesteps, shift=shift)
        return cls(toy.denoiser, toy.text_encoder, tokenizer, scheduler, toy.config)

    @classmethod
    def from_pretrained(cls, path: str | Path, **_loading: Any) -> ToyFlowBackbone:
        """Load a saved flow toy folder (``load_backbone``'s loading options do not apply)."""
        path = Path(path)
        index = json.loads((path / "model_index.json").read_text())
        if index.get("_class_name") != TOY_FLOW_CLASS_NAME:
            raise ConfigError(f"model_name_or_path: {path} is not a snpo flow toy model folder")
        config = ToyModelConfig(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in index["toy_config"].items()})
        return cls(
            UNet2DConditionModel.from_pretrained(path / "unet"),
            CLIPTextModel.from_pretrained(path / "text_encoder"),
            CLIPTokenizer.from_pretrained(path / "tokenizer"),
            FlowMatchEulerDiscreteScheduler.from_pretrained(path / "scheduler"),
            config,
        )

    def save_pretrained(self, path: str | Path, denoiser: nn.Module | None = None) -> None:
        super().save_pretrained(path, denoiser)
        index = {"_class_name": TOY_FLOW_CLASS_NAME, "toy_config": asdict(self.config)}
        (Path(path) / "model_index.json").write_text(json.dumps(index, indent=2))

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "weighting_scheme": self.weighting_scheme,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "mode_scale": self.mode_scale,
            "shift": float(self.noise_scheduler.config.shift),
        }
