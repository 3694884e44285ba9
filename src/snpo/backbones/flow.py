"""What the flow-matching families (SD3/SD3.5, FLUX.1) share: rectified-flow noising, the
sigma sampling of diffusers' flow-matching training scripts, a transformer denoiser and the
flow-matching sampler.

- Noising: ``x_t = (1 - sigma) x0 + sigma eps``; the target is the velocity ``eps - x0``
  (``prediction_type = "flow_prediction"``, diffusers' name for it). The per-sample error is
  the plain mean over latent elements (``per_sample_mse``), so the objectives are unchanged.
  The SD3 script's default ``precondition_outputs=1`` (x0 target, i.e. the same loss times
  sigma^2) and its ``sigma_sqrt``/``cosmap`` loss weightings are NOT used: docs/method.md fixes
  the target as ``eps - x0`` with an unweighted mean.
- Sigma sampling, as ``train_dreambooth_lora_sd3.py`` / ``train_dreambooth_lora_flux.py``:
  ``u`` from ``compute_density_for_timestep_sampling``'s formulas (uniform, logit-normal or
  mode; :func:`flow_density`), ``index = int(u * 1000)``, ``t = scheduler.timesteps[index]``,
  ``sigma = scheduler.sigmas[index]``, on the training scheduler's own 1000-entry table. The
  table already carries the scheduler's static ``shift`` (SD3: 3.0); a scheduler with
  dynamic shifting (FLUX) has an unshifted table, exactly as in the scripts. ``u`` is drawn
  only from the per-pair generator the method passes in, so draws replay.
- Timesteps are in the scheduler's units (0..1000, float), as the scripts feed them
  (SD3 passes them as they are, FLUX divides by 1000 in ``predict``).
- Latents: the VAE posterior mean, ``(mean - shift_factor) * scaling_factor`` (the SD
  backbones' rule; the scripts draw ``latent_dist.sample()`` from the global RNG).
- Sampling: ``FlowMatchEulerDiscreteScheduler`` (or another ``FlowMatch*`` scheduler) from the
  pipeline's config with the pipeline's own sigmas and resolution shift ``mu``; the initial
  noise is drawn in the unpacked latent shape, one CPU generator per image, which is what
  ``pipe(prompt, generator=torch.Generator().manual_seed(s))`` draws for one image.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from snpo.backbones.base import Condition
from snpo.backbones.loading import read_model_index
from snpo.backbones.sd import LORA_WEIGHTS_NAME, StableDiffusionBackbone
from snpo.errors import ConfigError

#: Files a full fine-tune writes: ``<Transformer>.from_pretrained(dir, subfolder="transformer")``.
TRANSFORMER_SUBFOLDER = "transformer"
#: ``weighting_scheme`` values (``compute_density_for_timestep_sampling``): ``none`` is the SD3
#: script's name for uniform sampling; ``sigma_sqrt``/``cosmap`` (uniform draws plus a loss
#: weight) would change the objective and are not offered.
FLOW_WEIGHTING_SCHEMES = ("logit_normal", "mode", "uniform", "none")


def flow_density(
    weighting_scheme: str, n: int, *, logit_mean: float = 0.0, logit_std: float = 1.0,
    mode_scale: float = 1.29, generator: torch.Generator,
) -> Tensor:
    """``n`` draws of ``u`` in [0, 1]: the formulas of diffusers'
    ``training_utils.compute_density_for_timestep_sampling`` (which takes a generator only
    since recent releases), drawing from ``generator`` and nothing else."""
    device = generator.device
    if weighting_scheme == "logit_normal":
        u = torch.normal(mean=logit_mean, std=logit_std, size=(n,), device=device, generator=generator)
        return torch.nn.functional.sigmoid(u)
    u = torch.rand(size=(n,), device=device, generator=generator)
    if weighting_scheme == "mode":
        u = 1 - u - mode_scale * (torch.cos(math.pi * u / 2) ** 2 - 1 + u)
    return u


def calculate_shift(image_seq_len: int, base_seq_len: int, max_seq_len: int, base_shift: float,
                    max_shift: float) -> float:
    """The resolution-dependent shift ``mu`` of the SD3/FLUX pipelines (same formula)."""
    m = (max_shift - base_shift) / (max_seq_len - base_seq_len)
    b = base_shift - m * base_seq_len
    return image_seq_len * m + b


class RectifiedFlow:
    """Rectified-flow training and Euler sampling for any :class:`~snpo.backbones.base.Backbone`
    whose ``noise_scheduler`` is a ``FlowMatchEulerDiscreteScheduler`` (a mixin, listed before
    the backbone class): noising, target, sigma sampling and the sampler hooks."""

    #: sigma sampling (``compute_density_for_timestep_sampling``); defaults of the scripts
    weighting_scheme: str = "logit_normal"
    logit_mean: float = 0.0
    logit_std: float = 1.0
    mode_scale: float = 1.29
    #: what a run's config sets (``Backbone.apply_settings``)
    setting_names: tuple[str, ...] = ("weighting_scheme", "logit_mean", "logit_std", "mode_scale")
    #: the pipelines sample with their flow-matching Euler scheduler (``snpo sample``'s default)
    sampling_scheduler_name: str = "FlowMatchEulerDiscreteScheduler"

    # ---- rectified flow ---------------------------------------------------------------
    @property
    def prediction_type(self) -> str:
        return "flow_prediction"

    def _training_table(self) -> tuple[Tensor, Tensor]:
        """The training scheduler's (timesteps, sigmas) table, ``num_train_timesteps``
        entries, as a fresh scheduler from the model's config holds it (the scripts'
        ``noise_scheduler_copy``; untouched by any ``set_timesteps``)."""
        if getattr(self, "_table", None) is None:
            fresh = type(self.noise_scheduler).from_config(self.noise_scheduler.config)
            self._table = (fresh.timesteps.detach().to("cpu", torch.float32).clone(),
                           fresh.sigmas.detach().to("cpu", torch.float32).clone())
        return self._table

    def sample_timesteps(self, n: int, generator: torch.Generator) -> Tensor:
        """``n`` training timesteps (scheduler units), drawn only from ``generator``."""
        scheme = self.weighting_scheme
        if scheme not in FLOW_WEIGHTING_SCHEMES:
            raise ConfigError(f"weighting_scheme: expected one of {', '.join(FLOW_WEIGHTING_SCHEMES)}, got {scheme!r}")
        u = flow_density(scheme, n, logit_mean=self.logit_mean, logit_std=self.logit_std,
                         mode_scale=self.mode_scale, generator=generator)
        timesteps, _ = self._training_table()
        # as the scripts: int(u * N); clamped because the mode density maps u = 0 to 1
        indices = (u.cpu() * self.num_train_timesteps).long().clamp(0, len(timesteps) - 1)
        return timesteps[indices]

    def sigmas(self, timesteps: Tensor) -> Tensor:
        """sigma of each training timestep: the table entry (the scripts' ``get_sigmas``), or
        ``t / num_train_timesteps`` for a timestep off the table."""
        table_t, table_s = self._training_table()
        t = timesteps.detach().to("cpu", torch.float32).reshape(-1)
        match = t[:, None] == table_t[None, :]
        sigma = torch.where(match.any(dim=1), table_s[match.float().argmax(dim=1)], t / self.num_train_timesteps)
        return sigma.to(timesteps.device)

    def _sigma_like(self, timesteps: Tensor, like: Tensor) -> Tensor:
        sigma = self.sigmas(timesteps).to(like.device, like.dtype)
        return sigma.view(-1, *([1] * (like.dim() - 1)))

    def add_noise(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        sigma = self._sigma_like(timesteps, latents)
        return (1.0 - sigma) * latents + sigma * noise

    def training_target(self, latents: Tensor, noise: Tensor, timesteps: Tensor) -> Tensor:
        """The velocity ``eps - x0`` (the flow-matching scripts' ``noise - model_input``)."""
        return noise - latents

    # ---- sampling -------------------------------------------------------------------
    def _scheduler_class(self, name: str) -> type:
        import diffusers

        from snpo.sampling import SCHEDULERS

        class_name = SCHEDULERS.get(name.lower(), name)
        cls = getattr(diffusers, class_name, None)
        if cls is None or not class_name.startswith("FlowMatch"):
            raise ConfigError(
                f"scheduler: {name!r} cannot sample the flow-matching {self.family} model; use "
                f"FlowMatchEulerDiscreteScheduler (its pipeline's scheduler)"
            )
        return cls

    def pipeline_timestep_kwargs(self, num_inference_steps: int, latent_shape: Sequence[int]) -> dict[str, Any]:
        """``sigmas`` / ``mu`` the family's pipeline passes to ``set_timesteps``."""
        return {}

    def sampling_scheduler(
        self, name: str, num_inference_steps: int, device: torch.device | str, latent_shape: Sequence[int]
    ) -> Any:
        """The pipeline's scheduler with the pipeline's timesteps (``retrieve_timesteps``)."""
        scheduler = self._scheduler_class(name).from_config(self.noise_scheduler.config)
        kwargs = self.pipeline_timestep_kwargs(num_inference_steps, latent_shape)
        accepted = inspect.signature(scheduler.set_timesteps).parameters
        kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        if kwargs.get("sigmas") is not None:
            scheduler.set_timesteps(device=device, **kwargs)  # as retrieve_timesteps with sigmas
        else:
            kwargs.pop("sigmas", None)
            scheduler.set_timesteps(num_inference_steps, device=device, **kwargs)
        return scheduler

    def initial_latents(
        self, latent_shape: Sequence[int], seeds: Sequence[int], scheduler: Any, device: torch.device | str
    ) -> Tensor:
        """Standard normal noise in the unpacked latent shape, one CPU generator per image (what
        the pipelines' ``prepare_latents`` draws for one image); flow schedulers start at
        sigma = 1, so there is no scaling."""
        from snpo.sampling import initial_noise

        return initial_noise(latent_shape, seeds).to(device)

    def sampling_model_input(self, scheduler: Any, latents: Tensor, t: Tensor) -> Tensor:
        return latents  # flow-matching schedulers do not scale the model input


class FlowMatchingBackbone(RectifiedFlow, StableDiffusionBackbone):
    """A diffusers flow-matching pipeline with a transformer denoiser; see the module docstring.

    The VAE handling, the null-condition machinery (``null_text``, ``preset_null_text``,
    ``null_condition``) and device moves are the SD backbone's; the denoiser is the
    pipeline's ``transformer`` and the noise scheduler a ``FlowMatchEulerDiscreteScheduler``.
    """

    transformer_class_name = ""  # e.g. "SD3Transformer2DModel"
    text_condition_keys: tuple[str, ...] = ("encoder_hidden_states", "pooled_projections")
    image_condition_keys: tuple[str, ...] = ()
    #: components a pipeline folder (or the caller) may leave out
    optional_components: tuple[str, ...] = ()

    #: T5 tokens (the pipeline's ``max_sequence_length`` default; training and sampling
    #: must use the same, the padded tokens take part in the joint attention)
    max_sequence_length: int = 256
    setting_names: tuple[str, ...] = (*RectifiedFlow.setting_names, "max_sequence_length")
    #: ``snpo sample``'s defaults: the pipeline's own ``__call__`` defaults
    default_inference_steps: int = 28

    # ---- construction ---------------------------------------------------------------
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
        **options: Any,
    ) -> FlowMatchingBackbone:
        """Load the pipeline's components from a local folder (see ``load_backbone``);
        ``options`` are the family's loading options (SD3: ``use_t5``)."""
        import diffusers

        path = Path(path)
        index = read_model_index(path)
        kwargs = {"revision": revision, "variant": variant}
        transformer_class = getattr(diffusers, cls.transformer_class_name)
        transformer = transformer_class.from_pretrained(path, subfolder=TRANSFORMER_SUBFOLDER, **kwargs)
        scheduler = diffusers.FlowMatchEulerDiscreteScheduler.from_pretrained(path, subfolder="scheduler")
        skip = cls.skipped_components(**options)
        components: dict[str, Any] = {}
        if with_encoders:
            for name, klass in cls.component_classes().items():
                if name in skip or (index.get(name, [None, None])[0] is None and name in cls.optional_components):
                    components[name] = None
                elif index.get(name, [None, None])[0] is None:
                    raise ConfigError(f"model_name_or_path: {path} has no {name} component")
                elif name == "vae" and vae_path is not None:
                    components[name] = klass.from_pretrained(vae_path, revision=revision)
                elif name.startswith("tokenizer"):
                    components[name] = klass.from_pretrained(path, subfolder=name, revision=revision)
                else:
                    components[name] = klass.from_pretrained(path, subfolder=name, **kwargs)
        backbone = cls._build(transformer, scheduler, components, index, str(path), upcast_vae)
        backbone.apply_loading_options(index, **options)
        return backbone

    def apply_loading_options(self, index: dict[str, Any], **options: Any) -> None:
        """Record what the loading options and the folder decide (whether or not the
        encoders were loaded, so a run from a cache encodes like the run that built it)."""

    @classmethod
    def skipped_components(cls, **options: Any) -> set[str]:
        """Components not to load for these loading options."""
        if options:
            raise TypeError(f"{cls.__name__}.from_pretrained: unexpected options {sorted(options)}")
        return set()

    @staticmethod
    def default_upcast_vae(vae: nn.Module | None) -> bool:
        # the SD3 script keeps the VAE in float32; FLUX's VAE config asks for it too
        return bool(getattr(getattr(vae, "config", None), "force_upcast", True))

    # ---- geometry -------------------------------------------------------------------
    @property
    def latent_channels(self) -> int:
        return int(self.denoiser.config.in_channels)

    @property
    def spatial_multiple(self) -> int:
        """Image sides must be a multiple of this (VAE factor x the transformer's patch)."""
        return self.vae_scale_factor * int(self.denoiser.config.patch_size)

    @property
    def default_size(self) -> int:
        """The pipeline's default image side."""
        return int(self.denoiser.config.sample_size) * self.vae_scale_factor

    def latent_geometry(self, resolution: int | None = None) -> tuple[tuple[int, int, int], int]:
        """(latent shape for the sampler, image side) for a square image of ``resolution``
        (None: the pipeline's default size). Latents are always UNPACKED ``(C, h, w)``."""
        side = int(resolution or self.default_size)
        if side % self.spatial_multiple:
            raise ConfigError(f"resolution: must be a multiple of {self.spatial_multiple} for this model, got {side}")
        size = side // self.vae_scale_factor
        return (self.latent_channels, size, size), side

    # ---- devices, dtypes, saving --------------------------------------------------------
    def frozen_modules(self) -> dict[str, nn.Module]:
        names = ("vae", "text_encoder", "text_encoder_2", "text_encoder_3")
        return {n: getattr(self, n) for n in names if getattr(self, n, None) is not None}

    def to(self, device: torch.device | str, frozen_dtype: torch.dtype | None = None) -> FlowMatchingBackbone:
        """As the SD backbones; in float16 the modules a text encoder keeps in float32 when
        loaded in half precision (T5's ``wo`` projections, ``_keep_in_fp32_modules``, which
        overflow in float16) stay in float32, as ``from_pretrained(torch_dtype=float16)``
        would leave them."""
        super().to(device, frozen_dtype)
        if frozen_dtype == torch.float16:
            for encoder in self.frozen_modules().values():
                keep = set(getattr(encoder, "_keep_in_fp32_modules", None) or ())
                for name, module in encoder.named_modules():
                    if name.rsplit(".", 1)[-1] in keep:
                        module.to(torch.float32)
        return self

    def save_trained(self, output_dir: str | Path, denoiser: nn.Module | None = None) -> list[str]:
        """LoRA: ``pytorch_lora_weights.safetensors`` for ``pipe.load_lora_weights(dir)``
        (the scripts' ``save_lora_weights(dir, transformer_lora_layers=...)``); full
        fine-tune: ``transformer/`` for ``<Transformer>.from_pretrained(dir, subfolder="transformer")``."""
        output_dir = Path(output_dir)
        output_dir.mkdir(parents=True, exist_ok=True)
        denoiser = denoiser if denoiser is not None else self.denoiser
        if self.lora_rank > 0:
            from peft.utils import get_peft_model_state_dict

            layers = get_peft_model_state_dict(denoiser)
            layers = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in layers.items()}
            self.pipeline_class().save_lora_weights(
                output_dir, transformer_lora_layers=layers, safe_serialization=True
            )
            return [LORA_WEIGHTS_NAME]
        denoiser.save_pretrained(output_dir / TRANSFORMER_SUBFOLDER)
        return [TRANSFORMER_SUBFOLDER]

    def encoding_options(self) -> dict[str, Any]:
        """Settings the encoded condition depends on besides the model files (a latent/text
        cache built with other values holds other tensors)."""
        return {"max_sequence_length": int(self.max_sequence_length)}

    @classmethod
    def encoding_options_for(cls, options: dict[str, Any], index: dict[str, Any]) -> dict[str, Any]:
        return {"max_sequence_length": int(options.get("max_sequence_length") or cls.max_sequence_length)}

    def describe(self) -> dict[str, Any]:
        return {
            **super().describe(),
            "denoiser_class": self.transformer_class_name,
            "denoiser_subfolder": TRANSFORMER_SUBFOLDER,
            **self.encoding_options(),
            "weighting_scheme": self.weighting_scheme,
            "logit_mean": self.logit_mean,
            "logit_std": self.logit_std,
            "mode_scale": self.mode_scale,
            "has_null_branch": self.has_null_branch,
        }

    # ---- helpers for the families -----------------------------------------------------
    def _clip_ids(self, tokenizer: Any, prompts: Sequence[str]) -> Tensor:
        """CLIP ids padded to the FIRST tokenizer's ``model_max_length`` (the pipelines'
        ``tokenizer_max_length``, used for both CLIP encoders)."""
        return tokenizer(
            list(prompts), padding="max_length", max_length=self.tokenizer.model_max_length,
            truncation=True, return_tensors="pt",
        ).input_ids

    def _t5_ids(self, tokenizer: Any, prompts: Sequence[str]) -> Tensor:
        return tokenizer(
            list(prompts), padding="max_length", max_length=self.max_sequence_length,
            truncation=True, add_special_tokens=True, return_tensors="pt",
        ).input_ids

    def null_text(self) -> Condition:
        """The encoded empty prompt, one row (computed once per ``encoding_options``)."""
        key = self.encoding_options()
        if self._null_text is not None and getattr(self, "_null_key", key) != key:
            self._null_text = None  # e.g. max_sequence_length changed after a first use
        if self._null_text is None:
            super().null_text()
            self._null_key = key
        return self._null_text

    def preset_null_text(self, null_text: Condition) -> None:
        super().preset_null_text(null_text)
        self._null_key = self.encoding_options()

    def null_condition(self, cond: Condition) -> Condition:
        """The encoded empty prompt (all encoders, pooled included), one row per row of
        ``cond``: what the SD3 pipeline (and FLUX with true CFG) feeds its null branch."""
        return super().null_condition(cond)
