"""The backbone interface: how a model family turns images and prompts into model inputs.

A backbone owns the denoiser being trained, the frozen encoders, the training noise
scheduler, the null condition the SAMPLER feeds the unconditional branch, the prediction
target, and the reference model (adapters disabled, or a frozen copy). It knows nothing of
losses. A new model family is one new file implementing :class:`Backbone` plus one line in
``snpo.backbones.BACKBONES``.

Conditions are dicts of tensors with the batch in the first dimension (for SD1.5
``{"encoder_hidden_states"}``, for SDXL also ``{"text_embeds", "time_ids"}``), so selecting
the null condition per sample is a ``torch.where`` per entry.
"""

from __future__ import annotations

import contextlib
import copy
from abc import ABC, abstractmethod
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from snpo.errors import ConfigError

Condition = dict[str, Tensor]

#: LoRA target modules of the diffusers UNet attention blocks (the Diffusion-DPO choice).
LORA_TARGET_MODULES = ("to_k", "to_q", "to_v", "to_out.0")


def select_condition(negative: Tensor, null: Condition, cond: Condition) -> Condition:
    """Per sample: ``null`` where ``negative`` is True, else ``cond``."""
    selected = {}
    for key, value in cond.items():
        mask = negative.to(torch.bool).view(-1, *([1] * (value.dim() - 1)))
        selected[key] = torch.where(mask.to(value.device), null[key].to(value.dtype), value)
    return selected


def cat_conditions(*conds: Condition) -> Condition:
    """Concatenate conditions along the batch dimension."""
    return {key: torch.cat([c[key] for c in conds]) for key in conds[0]}


def per_sample_mse(prediction: Tensor, target: Tensor) -> Tensor:
    """Mean squared error over every dimension but the first, in float32."""
    diff = prediction.float() - target.float()
    return diff.pow(2).flatten(1).mean(dim=1)


def _cast_floats(value: Any, dtype: torch.dtype) -> Any:
    if isinstance(value, Tensor) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, dict):
        return {k: _cast_floats(v, dtype) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cast_floats(v, dtype) for v in value)
    return value


def cast_module_io(module: nn.Module, dtype: torch.dtype) -> None:
    """Run ``module`` (a frozen reference in bf16/fp16) on float32 callers: its floating
    inputs are cast to ``dtype`` and its ``.sample`` (or first output) back to float32, so
    it works with and without autocast. Installed once per module."""
    if getattr(module, "_snpo_io_dtype", None) is not None:
        module._snpo_io_dtype = dtype
        return
    module._snpo_io_dtype = dtype

    def cast_inputs(mod: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        return _cast_floats(args, mod._snpo_io_dtype), _cast_floats(kwargs, mod._snpo_io_dtype)

    def cast_output(mod: nn.Module, args: tuple, kwargs: dict, out: Any) -> Any:
        if hasattr(out, "sample") and isinstance(out.sample, Tensor):
            out.sample = out.sample.float()
            return out
        if isinstance(out, tuple) and out and isinstance(out[0], Tensor):
            return (out[0].float(), *out[1:])
        return out.float() if isinstance(out, Tensor) else out

    module.register_forward_pre_hook(cast_inputs, with_kwargs=True)
    module.register_forward_hook(cast_output, with_kwargs=True)


class Backbone(ABC):
    """A model family: encoders, denoiser, scheduler, null condition and reference."""

    #: Family name used in the registry, configs and model cards.
    family: str = ""
    #: Condition entries that depend on the image as well as the prompt (SDXL's
    #: ``time_ids``); every other entry depends on the prompt only. A latent/text cache
    #: stores the former per image and the latter once per prompt.
    image_condition_keys: tuple[str, ...] = ()
    #: Opt-in speed options (TrainConfig fields), applied by ``prepare_for_training``.
    channels_last: bool = False
    torch_compile: bool = False
    #: Memory options of a full fine-tune's frozen reference copy (TrainConfig
    #: ``reference_dtype``, ``reference_offload``): its dtype (None: the frozen weights'), and
    #: whether it lives on the CPU between its forwards.
    reference_dtype: torch.dtype | None = None
    reference_offload: bool = False
    #: Modules that get LoRA adapters (a family with another denoiser names its own).
    lora_target_modules: tuple[str, ...] = LORA_TARGET_MODULES
    #: Whether the family's sampler runs an unconditional (null) branch, i.e. whether
    #: ``null_condition`` is an input the sampler really uses. True for SD1.5, SDXL, SD3 and
    #: the toy; a guidance-distilled FLUX samples with no null branch unless true CFG is
    #: opted in (``FluxBackbone.true_cfg``). Objectives that train the null branch (snpo,
    #: snpo-naive) and dual-model methods built on it should refuse a backbone without one.
    has_null_branch: bool = True
    #: options of ``from_pretrained`` this family reads (``load_backbone(options=...)``; SD3:
    #: ``use_t5``); a family ignores the others
    loading_options: tuple[str, ...] = ()
    #: settings this family reads from a run's config (``apply_settings``; flow models: sigma
    #: sampling, T5 length, FLUX guidance); a family ignores the others
    setting_names: tuple[str, ...] = ()
    #: ``snpo sample``'s defaults for this family (``sampling_defaults``): the paper's protocol
    sampling_scheduler_name: str = "ddim"
    default_inference_steps: int = 50
    default_guidance_scale: float = 7.5

    denoiser: nn.Module
    noise_scheduler: Any  # a diffusers scheduler used to noise training samples

    def __init__(self) -> None:
        self._reference: nn.Module | None = None
        self.lora_rank = 0

    # ---- settings from a config ------------------------------------------------------
    def apply_settings(self, values: dict[str, Any]) -> None:
        """Set the family's settings (``self.setting_names``) from ``values``; None leaves the
        family's default, names the family does not read are ignored."""
        for name in self.setting_names:
            if values.get(name) is not None:
                setattr(self, name, values[name])

    @classmethod
    def has_null_branch_for(cls, *, true_cfg: bool = False) -> bool:
        """Whether this family's sampler runs a null branch with these settings (known before
        any weights load)."""
        return bool(cls.has_null_branch)

    @classmethod
    def encoding_options_for(cls, options: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
        """What :meth:`encoding_options` will be for a model folder (its ``model_index.json``)
        loaded with these options, known before any weights load (a cache's fingerprint)."""
        return {}

    def encoding_options(self) -> dict[str, Any]:
        """Settings the encoded condition depends on besides the model files (a latent/text
        cache built with other values holds other tensors). None for most families."""
        return {}

    @classmethod
    def sampling_defaults(cls, *, true_cfg: bool = False) -> dict[str, Any]:
        """``snpo sample``'s scheduler, steps and guidance scale when none are given."""
        return {"scheduler": cls.sampling_scheduler_name, "num_inference_steps": cls.default_inference_steps,
                "guidance_scale": cls.default_guidance_scale}

    # ---- encoding -------------------------------------------------------------------
    @abstractmethod
    def encode_images(self, pixels: Tensor) -> Tensor:
        """Pixels in [-1, 1], shape (B, 3, H, W) -> model-space latents."""

    @abstractmethod
    def decode_latents(self, latents: Tensor) -> Tensor:
        """Model-space latents -> pixels in [-1, 1]."""

    @abstractmethod
    def encode_prompts(self, prompts: Sequence[str], **extras: Tensor) -> Condition:
        """Prompts (and per-image extras such as original sizes) -> condition dict."""

    @abstractmethod
    def null_condition(self, cond: Condition) -> Condition:
        """The unconditional condition the sampler uses, one row per row of ``cond``."""

    def empty_prompt_condition(self, cond: Condition) -> Condition:
        """The ENCODED empty prompt (every entry, pooled included), one row per row of ``cond``.
        The same as :meth:`null_condition` where the sampler feeds the encoded empty prompt
        (SD1.5, SD3, the toy); SDXL's null is zeros, but CHATS' proxy prompt is built on this."""
        return self.null_condition(cond)

    def preset_null_text(self, null_text: Condition) -> None:  # noqa: B027 (optional hook)
        """Use a stored null condition (one row, from a latent/text cache) instead of running
        the text encoder. Families whose null condition needs no encoder may ignore it."""

    def encode_batch(self, batch: dict[str, Any]) -> tuple[Tensor, Tensor, Condition]:
        """A collated batch of B pairs -> (chosen latents, rejected latents, condition).

        The condition has 2B rows, chosen images first then rejected ones, because a
        condition may depend on the image as well as the prompt (SDXL's ``time_ids`` hold
        each image's original size and crop). A batch from the latent/text cache already
        holds ``chosen_latents``, ``rejected_latents`` and ``cond``; it is passed through
        untouched, so a cached training step does no encoder work.
        """
        device = self.device
        if "chosen_latents" in batch:
            cond = {k: v.to(device) for k, v in batch["cond"].items()}
            chosen, rejected = batch["chosen_latents"], batch["rejected_latents"]
            return chosen.to(device).float(), rejected.to(device).float(), cond
        with torch.no_grad():
            pixels = torch.cat([batch["chosen_pixels"], batch["rejected_pixels"]]).to(device)
            latents = self.encode_images(pixels.to(self.encoder_dtype)).float()
            prompts = list(batch["prompt"]) * 2
            cond = self.encode_prompts(prompts, **self.condition_extras(batch))
        chosen, rejected = latents.chunk(2)
        return chosen, rejected, cond

    def condition_extras(self, batch: dict[str, Any]) -> dict[str, Tensor]:
        """Per-image inputs besides the prompt that the condition needs (2B rows, chosen
        first), e.g. SDXL's original sizes and crop offsets. None for most families."""
        return {}

    # ---- diffusion ------------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return self.noise_scheduler.config.prediction_type

    @property
    def num_train_timesteps(self) -> int:
        return int(self.noise_scheduler.config.num_train_timesteps)

    def sample_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        return torch.randint(0, self.num_train_timesteps, (n,), generator=generator)

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        return self.noise_scheduler.add_noise(latents, noise, timesteps)

    def training_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The model's own prediction target: never assume epsilon."""
        kind = self.prediction_type
        if kind == "epsilon":
            return noise
        if kind == "v_prediction":
            return self.noise_scheduler.get_velocity(latents, noise, timesteps)
        if kind == "sample":
            return latents
        raise ConfigError(f"prediction_type: unsupported {kind!r} (epsilon, v_prediction, sample)")

    def predict(self, model: nn.Module, noisy: Tensor, timesteps: Tensor, cond: Condition) -> Tensor:
        """One denoiser forward; ``model`` may be a DDP/FSDP wrapper of ``self.denoiser``."""
        extra = {k: v for k, v in cond.items() if k != "encoder_hidden_states"}
        kwargs = {"added_cond_kwargs": extra} if extra else {}
        if self.channels_last:
            noisy = noisy.contiguous(memory_format=torch.channels_last)
        return model(noisy, timesteps, encoder_hidden_states=cond["encoder_hidden_states"], **kwargs).sample

    # ---- sampling (``snpo.sampling.sample_latents``) ----------------------------------
    def sampling_scheduler(
        self, name: str, num_inference_steps: int, device: torch.device | str, latent_shape: Sequence[int]
    ) -> Any:
        """The inference scheduler ``name`` with its timesteps set for ``num_inference_steps``.

        Default: the named diffusers scheduler built from the training scheduler's config
        (``latent_shape`` unused). Flow-matching families set the pipeline's own sigmas and
        resolution-dependent shift instead."""
        from snpo.sampling import make_scheduler

        scheduler = make_scheduler(name, self.noise_scheduler.config)
        scheduler.set_timesteps(num_inference_steps, device=device)
        return scheduler

    def initial_latents(
        self, latent_shape: Sequence[int], seeds: Sequence[int], scheduler: Any, device: torch.device | str
    ) -> Tensor:
        """The starting latents of the sampler, one per seed, each from its own CPU generator
        (so an image does not depend on its batch), scaled by the scheduler's initial sigma."""
        from snpo.sampling import initial_noise

        return initial_noise(latent_shape, seeds).to(device) * scheduler.init_noise_sigma

    def sampling_model_input(self, scheduler: Any, latents: Tensor, t: Tensor) -> Tensor:
        """What the denoiser sees at step ``t`` (the scheduler's input scaling by default)."""
        return scheduler.scale_model_input(latents, t)

    # ---- devices and dtypes ---------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.denoiser.parameters()).device

    @property
    def encoder_dtype(self) -> torch.dtype:
        return torch.float32

    @abstractmethod
    def frozen_modules(self) -> dict[str, nn.Module]:
        """Encoders and other modules that are never trained."""

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype | None = None) -> Backbone:
        """Move everything to ``device``; frozen modules may be cast to a half dtype.

        With LoRA the denoiser's base weights are frozen too and are cast with them (as the
        diffusers LoRA scripts do); the trainer casts the trainable adapters back to float32.
        """
        if self.lora_rank > 0 and frozen_dtype is not None:
            self.denoiser.to(device, dtype=frozen_dtype)
        else:
            self.denoiser.to(device)
        for module in self.frozen_modules().values():
            module.to(device, dtype=frozen_dtype) if frozen_dtype else module.to(device)
        if self._reference is not None:
            dtype = self.reference_dtype or frozen_dtype
            home = "cpu" if self.reference_offload else device
            self._reference.to(home, dtype=dtype) if dtype else self._reference.to(home)
            if dtype is not None and dtype != torch.float32:
                cast_module_io(self._reference, dtype)
        return self

    # ---- training set-up and the reference -----------------------------------------
    def prepare_for_training(
        self, *, lora_rank: int = 0, gradient_checkpointing: bool = False, reference: bool = True
    ) -> list[nn.Parameter]:
        """Freeze encoders, add LoRA adapters (``lora_rank > 0``) or keep a frozen reference
        copy (full fine-tune), and return the trainable parameters. ``reference=False``: no
        frozen copy for a method that never runs the reference (MaPO)."""
        for module in self.frozen_modules().values():
            module.requires_grad_(False).eval()
        self.lora_rank = lora_rank
        if lora_rank > 0:
            self.denoiser.requires_grad_(False)
            self.add_lora_adapter(self.denoiser)
            self._reference = None  # the same network with adapters disabled
        else:
            self._reference = copy.deepcopy(self.denoiser).requires_grad_(False).eval() if reference else None
            self.denoiser.requires_grad_(True)
        if gradient_checkpointing:
            self.denoiser.enable_gradient_checkpointing()
        self.denoiser.train()
        self.apply_speed_options()
        return [p for p in self.denoiser.parameters() if p.requires_grad]

    def add_lora_adapter(self, module: nn.Module) -> None:
        """The run's LoRA adapters (``self.lora_rank``) on ``module`` (the denoiser, or a fresh
        copy of it that a sharded run's gathered weights are loaded into)."""
        from peft import LoraConfig

        module.add_adapter(
            LoraConfig(
                r=self.lora_rank,
                lora_alpha=self.lora_rank,
                init_lora_weights="gaussian",
                target_modules=list(self.lora_target_modules),
            )
        )

    def apply_speed_options(self) -> None:
        """``channels_last``: NHWC weights (inputs are converted in :meth:`predict`);
        ``torch_compile``: ``module.compile()`` in place, so the module keeps its identity
        (state dicts, peft adapters, saving). Both apply to the denoiser and to a full
        fine-tune's reference copy; both change numerics at float-rounding level only."""
        for module in (self.denoiser, self._reference):
            if module is None:
                continue
            if self.channels_last:
                module.to(memory_format=torch.channels_last)
            if self.torch_compile:
                module.compile()

    @contextlib.contextmanager
    def reference(self) -> Iterator[nn.Module]:
        """The frozen reference model, under no_grad: the frozen copy, or (LoRA) the same
        network with its adapters disabled for the duration of the block."""
        with torch.no_grad():
            if self._reference is not None and self.reference_offload:
                device = self.device  # the policy's device: the reference visits it for its forward
                self._reference.to(device)
                try:
                    yield self._reference
                finally:
                    self._reference.to("cpu")
            elif self._reference is not None:
                yield self._reference
            elif self.lora_rank > 0:
                self.denoiser.disable_adapters()
                try:
                    yield self.denoiser
                finally:
                    self.denoiser.enable_adapters()
            else:
                raise RuntimeError("reference: call prepare_for_training() first")

    # ---- saving ---------------------------------------------------------------------
    @abstractmethod
    def save_trained(self, output_dir: str | Path, denoiser: nn.Module | None = None) -> list[str]:
        """Save what training changed so the family's own loaders read it; return the
        files written (LoRA: ``pytorch_lora_weights.safetensors``; full: ``unet/``)."""

    def describe(self) -> dict[str, Any]:
        """A small JSON-able description for model cards and caches."""
        return {"family": self.family, "prediction_type": self.prediction_type}
