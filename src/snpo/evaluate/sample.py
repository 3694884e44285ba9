"""``snpo sample``: images for a prompt set from a base model, a LoRA, a full fine-tune, a
Diff-NPO pair or a CHATS pair; several seeds, batched, resumable, with a manifest.

    snpo sample --model_name_or_path stable-diffusion-v1-5/stable-diffusion-v1-5 \\
        --lora runs/snpo --prompts pickapic_v2/data --prompts_split test_unique \\
        --seeds 0,1,2,3 --output_dir samples/snpo

The model is ``model_name_or_path`` (a diffusers pipeline folder or hub id, or a snpo toy
folder) with at most one of:

- ``lora``: a LoRA (``pytorch_lora_weights.safetensors``, as ``snpo train`` saves it), fused
  into the denoiser's weights (``theta + scale * B @ A``: sampling runs at plain-UNet speed);
- ``unet``: full fine-tuned denoiser weights (a training output folder with ``unet/``, a unet
  folder or a ``.safetensors`` file);
- ``chats``: a CHATS output folder (``win/`` and ``lose/``, each a LoRA or full weights),
  sampled with ``eps_win(c) + s (eps_win(c) - eps_lose(proxy))``, ``proxy = (1 + a) null -
  a c``. CHATS' ``s`` acts like CFG's ``s + 1``: ``chats_guidance_scale`` defaults to
  ``guidance_scale - 1``, the same extrapolation as plain CFG.

plus, for Diff-NPO, ``npo_negative``: the network trained on reversed preferences (LoRA or
full), which serves the null branch: ``eps_neg(null) + s (eps_pos(c) - eps_neg(null))``, the
positive network being the base with ``lora``/``unet`` applied. With ``npo_merge`` (default)
the null-branch network is the Diff-NPO merge ``theta_ref + a (theta_pos - theta_ref) + b
(theta_npo - theta_ref)`` (``npo_merge_a``, ``npo_merge_b``; public code: 1 and 1); pass an
already merged model (``snpo merge``) with ``npo_merge false``.

Defaults per family (``scheduler: auto``, ``num_inference_steps`` and ``guidance_scale`` null):
the paper's protocol (DDIM 50 steps, CFG 7.5) for SD1.5, SDXL and the toy; the pipelines' own
defaults for SD3 (flow-matching Euler, 28 steps, CFG 7.0) and FLUX.1 (28 steps, its embedded
guidance ``embedded_guidance_scale`` and no null branch; with ``true_cfg`` true CFG on the
empty prompt at ``guidance_scale``, default 4.0). Flow models sample with the T5 length they
were trained with (``max_sequence_length``). The resolved values are what the manifest records.

Images. Seed ``s`` draws the initial latent from ``torch.Generator("cpu").manual_seed(s)``
for every prompt: the same start a diffusers pipeline makes for ``pipe(prompt,
generator=torch.Generator("cpu").manual_seed(s))``, and the same across runs, so runs are
compared image for image. Work is planned per seed in batches of ``batch_size`` prompts in
prompt order; a resumed run (the same command) skips every image already in the manifest
and redraws a missing one within its original batch, so it writes exactly the images an
uninterrupted run writes. (Batch composition matters because a batched forward may round
differently from a single one on some hardware; a resume with another ``batch_size`` or
device gives images equal to float rounding, not necessarily byte-identical.) Settings that
change images (model, steps, guidance, scheduler, resolution, dtype) are checked against the
folder's ``sample_settings.json``: a mismatch stops with one line instead of mixing images.
"""

from __future__ import annotations

import copy
import hashlib
import io
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from snpo.dtypes import DTYPE_SPELLINGS, DTYPES, LEGACY_DTYPE_NAMES, torch_dtype
from snpo.errors import ConfigError
from snpo.evaluate import manifest as mf
from snpo.evaluate.prompts import PROMPT_FORMATS, PromptSet, load_prompts
from snpo.sampling import Guide, SamplerSettings

MAX_SEED = 2**63 - 1


@dataclass
class SampleConfig:
    """Settings of ``snpo sample`` (YAML keys or ``--key value``); see the module docstring."""

    model_name_or_path: str = ""  # base pipeline folder or hub id (SD1.5, SDXL, SD3, FLUX), or a snpo toy folder
    lora: str | None = None  # a LoRA (a `snpo train` output folder or .safetensors), fused into the weights
    lora_scale: float | None = None  # None: the adapter's own lora_alpha / r
    unet: str | None = None  # full fine-tuned denoiser weights (a training output, a unet folder or a file)
    npo_negative: str | None = None  # Diff-NPO: the network trained on reversed labels, used on the null branch
    npo_merge: bool = True  # merge npo_negative with the reference and the positive model, as Diff-NPO does
    npo_merge_a: float = 1.0  # merge weight of theta_pos - theta_ref (public code: 1)
    npo_merge_b: float = 1.0  # merge weight of theta_npo - theta_ref (public code: 1)
    chats: str | None = None  # a CHATS output folder (win/ and lose/), sampled with its proxy-prompt guide
    chats_guidance_scale: float | None = None  # None: guidance_scale - 1
    chats_proxy_alpha: float = 0.5  # CHATS proxy prompt (1 + a) null - a c
    method: str | None = None  # whose guide samples; None: chats -> chats, npo_negative -> npo-negative, else plain CFG
    pretrained_vae_model_name_or_path: str | None = None  # another VAE folder or hub id (e.g. an fp16-safe SDXL VAE)
    vae: str | None = field(default=None, metadata={"alias_of": "pretrained_vae_model_name_or_path"})
    revision: str | None = None  # git revision of a hub model
    prompts: str = ""  # a .txt (one per line), HPDv2 .json, PartiPrompts .tsv or Pick-a-Pic parquet
    prompts_format: str = "auto"  # auto | the reader to use for prompts
    prompts_split: str | None = None  # Pick-a-Pic: train, validation, test, test_unique, ...
    max_prompts: int | None = None  # the first N prompts of the set
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2, 3])  # one image per prompt per seed
    num_inference_steps: int | None = None  # denoising steps; null = the family's (SD1.5/SDXL/toy: 50, the paper; SD3, FLUX: 28, their pipelines')
    guidance_scale: float | None = None  # CFG scale; null = the family's (SD1.5/SDXL/toy: 7.5, the paper; SD3: 7.0; FLUX: 1 = no null branch, with true_cfg 4.0)
    scheduler: str = "auto"  # auto (the family's: ddim; FlowMatchEulerDiscreteScheduler for SD3/FLUX) | ddim | ddpm | pndm | euler | euler_a | dpm++ | unipc | a diffusers class name
    resolution: int | None = None  # None: the model's own (SD1.5 512, SDXL 1024)
    batch_size: int = 8  # prompts per forward
    output_dir: str = "snpo-samples"  # images/, manifest.jsonl, sample_settings.json
    device: str = "auto"  # auto: cuda when available, else cpu
    dtype: str = "fp32"  # fp32 | fp16 | bf16 (float32 / float16 / bfloat16 accepted)
    show_progress: bool = True  # progress bars
    # flow-matching models (SD3 / FLUX): as the model was trained (the keys of `snpo train`)
    max_sequence_length: int | None = None  # T5 tokens of the prompt; null = the pipeline's default (SD3 256, FLUX 512)
    use_t5: bool = True  # SD3: encode prompts with T5 (false: zeros in its place, as the pipeline without text_encoder_3)
    embedded_guidance_scale: float = 3.5  # FLUX.1-dev: the guidance value its transformer takes as an input (pipeline default 3.5)
    true_cfg: bool = False  # FLUX: true CFG, a null branch on the empty prompt at scale guidance_scale (FluxPipeline's true_cfg_scale)

    def __post_init__(self) -> None:
        self.notes: list[str] = []
        self._family: str | None = None  # the model's family, once read (resolve_defaults)
        if self.vae is not None:
            self.notes.append("vae: read as pretrained_vae_model_name_or_path (the name snpo train uses)")
            if self.pretrained_vae_model_name_or_path not in (None, self.vae):
                raise ConfigError("vae: an alias of pretrained_vae_model_name_or_path; give one of them")
            self.pretrained_vae_model_name_or_path, self.vae = self.vae, None
        if isinstance(self.dtype, str):
            self.dtype = DTYPE_SPELLINGS.get(self.dtype, self.dtype)

    def method_spec(self) -> Any:
        """The method whose guide samples (given, or told by the weights that are given)."""
        from snpo.methods import get_method

        return get_method(self.method or ("chats" if self.chats else "npo-negative" if self.npo_negative
                                          else "snpo"))

    def resolve_defaults(self) -> str:
        """The model's family (from its ``model_index.json``, no weights), with the family's
        scheduler, steps and guidance scale filled in where none were given; returns the family."""
        from snpo.backbones import BACKBONES, detect_family

        if self._family is None:
            self._family = detect_family(self.model_name_or_path, revision=self.revision)
        defaults = BACKBONES[self._family].sampling_defaults(true_cfg=self.true_cfg)
        if self.scheduler == "auto":
            self.scheduler = defaults["scheduler"]
        if self.num_inference_steps is None:
            self.num_inference_steps = defaults["num_inference_steps"]
        if self.guidance_scale is None:
            self.guidance_scale = defaults["guidance_scale"]
        return self._family

    def family_settings(self) -> dict[str, Any]:
        """The family keys that change this family's images (none for SD1.5/SDXL/toy), with the
        family's defaults filled in: part of the sampling settings."""
        from snpo.backbones import BACKBONES, family_options

        cls = BACKBONES[self.resolve_defaults()]
        names = [k for k in ("use_t5", "max_sequence_length", "embedded_guidance_scale", "true_cfg")
                 if k in cls.loading_options or k in cls.setting_names]
        out = {k: v for k, v in family_options(self).items() if k in names}
        if "max_sequence_length" in out and out["max_sequence_length"] is None:
            out["max_sequence_length"] = int(cls.max_sequence_length)
        return out

    def validate(self) -> None:
        """Every check that needs no model weights (the family is read from the model's
        ``model_index.json``): one-line errors naming the key."""
        if not self.model_name_or_path:
            raise ConfigError(
                "model_name_or_path: required (a pipeline folder, hub id or toy folder)"
            )
        family = self.resolve_defaults()
        if not self.prompts:
            raise ConfigError(
                "prompts: required (a .txt, HPDv2 .json, PartiPrompts .tsv or Pick-a-Pic parquet)"
            )
        if self.prompts_format not in PROMPT_FORMATS:
            choices = ", ".join(PROMPT_FORMATS)
            raise ConfigError(
                f"prompts_format: expected one of {choices}, got {self.prompts_format!r}"
            )
        if self.max_prompts is not None and self.max_prompts < 1:
            raise ConfigError(f"max_prompts: expected an integer >= 1, got {self.max_prompts!r}")
        if not self.seeds:
            raise ConfigError("seeds: expected at least one seed")
        if len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds: each seed once, got {list(self.seeds)}")
        if any(not 0 <= s <= MAX_SEED for s in self.seeds):
            raise ConfigError(f"seeds: expected integers in [0, 2**63), got {list(self.seeds)}")
        SamplerSettings(
            self.num_inference_steps, self.guidance_scale, self.scheduler, self.batch_size
        ).validate()
        if self.resolution is not None and self.resolution < 8:
            raise ConfigError(
                f"resolution: expected an image side >= 8 pixels, got {self.resolution!r}"
            )
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        roles = self.method_spec().sampling_roles
        needs = {"npo": ("npo_negative", self.npo_negative), "win": ("chats", self.chats),
                 "lose": ("chats", self.chats)}
        for role in roles:
            if role in needs and not needs[role][1]:
                raise ConfigError(f"{needs[role][0]}: method {self.method} samples with a {role} "
                                  f"network; give {needs[role][0]}")
        self._check_null_branch(family, roles)
        resolve_device(self.device)
        for name in ("npo_merge_a", "npo_merge_b", "chats_proxy_alpha"):
            if not math.isfinite(getattr(self, name)):
                raise ConfigError(f"{name}: expected a finite number, got {getattr(self, name)!r}")
        if self.lora_scale is not None and not math.isfinite(self.lora_scale):
            raise ConfigError(f"lora_scale: expected a finite number, got {self.lora_scale!r}")
        if self.chats_guidance_scale is not None and self.chats_guidance_scale < 0:
            raise ConfigError(
                f"chats_guidance_scale: expected a number >= 0, got {self.chats_guidance_scale!r}"
            )
        if self.lora and self.unet:
            raise ConfigError("unet: give lora or unet, not both (one positive network)")
        if self.chats and (self.lora or self.unet or self.npo_negative):
            raise ConfigError(
                "chats: a CHATS pair is its own model; drop lora, unet and npo_negative"
            )
        self._check_weights("lora", self.lora, "lora")
        self._check_weights("unet", self.unet, "full")
        self._check_weights("npo_negative", self.npo_negative, None)
        if self.chats:
            for part in ("win", "lose"):
                if not (Path(self.chats) / part).exists():
                    raise ConfigError(
                        f"chats: {self.chats} has no {part}/ (expected a CHATS output folder)"
                    )
                self._check_weights("chats", str(Path(self.chats) / part), None)

    def _check_null_branch(self, family: str, roles: Sequence[str]) -> None:
        """A FLUX model without true CFG samples with no null branch: CFG (guidance_scale != 1)
        and the dual-model guides (which evaluate a network on the null condition) do not apply."""
        from snpo.backbones import family_options, has_null_branch

        if has_null_branch(family, family_options(self)):
            return
        if {"npo", "lose"} & set(roles):
            raise ConfigError(f"method: {self.method_spec().name} samples a network on the null branch, which "
                              f"this {family} model runs only with true CFG; set true_cfg: true")
        if self.guidance_scale != 1:
            raise ConfigError(
                f"guidance_scale: this {family} model samples with no null branch (its distilled guidance "
                f"is embedded_guidance_scale), so the CFG scale must be 1; set true_cfg: true for true CFG "
                f"on the empty prompt at this scale, got {self.guidance_scale!r}"
            )

    @staticmethod
    def _check_weights(name: str, path: str | None, expected: str | None) -> None:
        if not path:
            return
        from snpo.merging import resolve_weights

        try:
            kind, _ = resolve_weights(path)
        except ValueError as err:
            raise ConfigError(f"{name}: {err}") from None
        if expected == "lora" and kind != "lora":
            raise ConfigError(f"lora: {path} holds full weights; pass it as unet")
        if expected == "full" and kind != "full":
            raise ConfigError(f"unet: {path} holds a LoRA; pass it as lora")

    @property
    def resolved_chats_guidance_scale(self) -> float:
        if self.chats_guidance_scale is not None:
            return self.chats_guidance_scale
        return max(self.guidance_scale - 1, 0.0)

    def model_spec(self) -> dict[str, Any]:
        """What the networks are made of (local paths made absolute): part of every image's
        identity, recorded in the manifest."""
        spec: dict[str, Any] = {"model_name_or_path": _path_or_id(self.model_name_or_path)}
        if self.pretrained_vae_model_name_or_path:  # recorded under its old name: manifests stay comparable
            spec["vae"] = _path_or_id(self.pretrained_vae_model_name_or_path)
        if self.revision:
            spec["revision"] = self.revision
        if self.lora:
            spec["lora"] = _path_or_id(self.lora)
            spec["lora_scale"] = self.lora_scale
        if self.unet:
            spec["unet"] = _path_or_id(self.unet)
        if self.npo_negative:
            spec["npo_negative"] = _path_or_id(self.npo_negative)
            spec["npo_merge"] = self.npo_merge
            if self.npo_merge:
                spec["npo_merge_a"], spec["npo_merge_b"] = self.npo_merge_a, self.npo_merge_b
        if self.chats:
            spec["chats"] = _path_or_id(self.chats)
            spec["chats_proxy_alpha"] = self.chats_proxy_alpha
        spec["guide"] = self.guide_kind
        return spec

    @property
    def guide_kind(self) -> str:
        return self.method_spec().guide_name

    def sampling_settings(self) -> dict[str, Any]:
        """Settings that change the images (batch size and seeds do not: see the docstring)."""
        self.resolve_defaults()
        guidance = self.resolved_chats_guidance_scale if self.chats else self.guidance_scale
        return {
            "num_inference_steps": self.num_inference_steps,
            "guidance_scale": guidance,
            "scheduler": self.scheduler,
            "resolution": self.resolution,
            "dtype": LEGACY_DTYPE_NAMES[self.dtype],  # as manifests have always recorded it
            **self.family_settings(),  # flow models: T5 length, FLUX guidance and true CFG
        }


def _path_or_id(spec: str) -> str:
    path = Path(spec).expanduser()
    return str(path.resolve()) if path.exists() else spec


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise ConfigError(f"device: expected auto, cpu, cuda or cuda:N, got {name!r}") from None


# ---- the networks and the guide ----------------------------------------------------------------
def fused_state_dict(
    denoiser: nn.Module, path: str | Path, *, lora_scale: float | None = None
) -> dict[str, Tensor]:
    """The denoiser's weights with ``path`` applied: a LoRA fused in (``theta + scale B A``)
    or full fine-tuned weights (every key of the denoiser, same shapes)."""
    from snpo.merging import LoraWeights, load_weights, merge_weights

    reference = {k: v.detach() for k, v in denoiser.state_dict().items()}
    source = load_weights(path, lora_scale=lora_scale)
    if isinstance(source, LoraWeights):
        # a = 1, b = 0: theta_ref + (theta_lora - theta_ref), computed on the LoRA's delta
        return merge_weights(reference, source, source, 1.0, 0.0)
    extra, missing = sorted(set(source) - set(reference)), sorted(set(reference) - set(source))
    if extra or missing:
        which = f"extra key {extra[0]!r}" if extra else f"missing key {missing[0]!r}"
        raise ConfigError(f"unet: {path} does not fit this model's denoiser ({which})")
    out = {}
    for key, value in reference.items():
        loaded = source[key]
        if loaded.shape != value.shape:
            raise ConfigError(
                f"unet: {path} {key!r} has shape {tuple(loaded.shape)}, "
                f"the model {tuple(value.shape)}"
            )
        out[key] = loaded.to(value.dtype)
    return out


def _apply(net: nn.Module, path: str | Path, lora_scale: float | None = None) -> nn.Module:
    """``net`` with ``path`` applied in place (see :func:`fused_state_dict`)."""
    net.load_state_dict(fused_state_dict(net, path, lora_scale=lora_scale))
    return net


@dataclass
class Sampler:
    """A loaded model ready to sample: the backbone, the guide and the image geometry."""

    backbone: Any
    guide: Guide
    latent_shape: tuple[int, int, int]
    resolution: int
    networks: dict[str, nn.Module]
    condition_extras: Callable[[int], dict[str, Tensor]]

    def images(self, prompts: Sequence[str], seeds: Sequence[int], config: SampleConfig) -> Tensor:
        """Images in [0, 1], (N, 3, H, W), one per (prompt, seed): one batch."""
        from snpo.sampling import sample_images

        sampling = SamplerSettings(
            config.num_inference_steps,
            config.guidance_scale,
            config.scheduler,
            batch_size=max(len(prompts), 1),
        )
        return sample_images(
            self.backbone,
            self.guide,
            list(prompts),
            list(seeds),
            self.latent_shape,
            sampling,
            condition_extras=self.condition_extras(len(prompts)),
        )


def latent_geometry(backbone: Any, resolution: int | None) -> tuple[tuple[int, int, int], int]:
    """(latent shape, image side) for a square image of ``resolution`` (None: the model's).
    A family with its own rule (flow models: FLUX packs 4x the channels and has no
    ``sample_size``) gives it as ``backbone.latent_geometry``."""
    from snpo.backbones.toy import ToyBackbone

    if hasattr(backbone, "latent_geometry"):
        return backbone.latent_geometry(resolution)
    if isinstance(backbone, ToyBackbone):
        factor, default = backbone.config.patch_size, backbone.config.resolution
    else:
        sample_size = backbone.denoiser.config.sample_size
        sample_size = sample_size if isinstance(sample_size, int) else max(sample_size)
        factor = backbone.vae_scale_factor
        default = int(sample_size) * factor
    side = resolution or default
    if side % factor:
        raise ConfigError(f"resolution: must be a multiple of {factor} for this model, got {side}")
    channels = int(backbone.denoiser.config.in_channels)
    return (channels, side // factor, side // factor), side


def _load_networks(base: nn.Module, roles: Sequence[str], config: SampleConfig) -> dict[str, nn.Module]:
    """The networks a method's guide evaluates, by role: ``policy`` (the base with ``lora`` /
    ``unet`` applied), ``npo`` (Diff-NPO's network, merged as Diff-NPO does unless
    ``npo_merge`` is false), ``win`` / ``lose`` (a CHATS pair). Each is built from the base
    weights before the base itself is overwritten, so no more copies are held than needed."""
    from snpo.merging import load_weights, merge_weights

    networks: dict[str, nn.Module] = {}
    if "lose" in roles:
        networks["lose"] = _apply(copy.deepcopy(base), Path(config.chats) / "lose")
    weights = config.lora or config.unet
    positive_state = fused_state_dict(base, weights, lora_scale=config.lora_scale) if weights else None
    if "npo" in roles:
        npo = copy.deepcopy(base)
        if config.npo_merge:
            reference = {k: v.detach() for k, v in base.state_dict().items()}
            npo.load_state_dict(merge_weights(reference, positive_state or reference,
                                              load_weights(config.npo_negative),
                                              config.npo_merge_a, config.npo_merge_b))
        else:
            _apply(npo, config.npo_negative)
        networks["npo"] = npo
    if "win" in roles:
        networks["win"] = _apply(base, Path(config.chats) / "win")
    elif positive_state is not None:
        base.load_state_dict(positive_state)
    if "policy" in roles:
        networks["policy"] = base
    return networks


@dataclass(frozen=True)
class GuideSettings:
    """What a method's guide reads of ``snpo sample``'s settings."""

    guidance_scale: float
    chats_guidance_scale: float
    chats_proxy_alpha: float


def load_sampler(config: SampleConfig) -> Sampler:
    """Load the model and build the guide of ``config``'s method, on its device and dtype."""
    from snpo.backbones import family_options, load_backbone

    config.resolve_defaults()
    spec = config.method_spec()
    backbone = load_backbone(
        config.model_name_or_path, vae_path=config.pretrained_vae_model_name_or_path,
        revision=config.revision, options=family_options(config),
    )
    device, dtype = resolve_device(config.device), torch_dtype(config.dtype)
    base = backbone.denoiser.eval().requires_grad_(False)
    networks = _load_networks(base, spec.sampling_roles, config)
    for net in networks.values():
        # no dtype argument for float32: diffusers warns on any to(dtype) of a loaded model
        net.to(device) if dtype == torch.float32 else net.to(device=device, dtype=dtype)
        net.eval().requires_grad_(False)
    backbone.denoiser = networks[spec.sampling_roles[0]]  # gives device and dtype
    backbone.to(device, None if dtype == torch.float32 else dtype)
    settings = GuideSettings(config.guidance_scale, config.resolved_chats_guidance_scale,
                             config.chats_proxy_alpha)
    guide = spec.make_guide(backbone, networks, settings)
    latent_shape, side = latent_geometry(backbone, config.resolution)

    def condition_extras(n: int) -> dict[str, Tensor]:
        # SDXL micro-conditioning: original size = target size = the sampled size, as the
        # pipeline does for pipe(prompt, height=side, width=side)
        if backbone.family == "sdxl":
            return {"target_size": torch.tensor([[side, side]] * n)}
        return {}

    return Sampler(backbone, guide, latent_shape, side, networks, condition_extras)


# ---- the run ----------------------------------------------------------------------------------
@dataclass
class SampleResult:
    output_dir: Path
    total: int  # images the prompt set x seeds asks for
    drawn: int  # images drawn by this call
    skipped: int  # images already in the manifest


def png_bytes(image: Tensor) -> bytes:
    """A (3, H, W) image in [0, 1] as PNG bytes, quantised as diffusers saves images
    (``round(x * 255)``); PIL's PNG encoder is deterministic, so equal pixels give equal bytes."""
    from PIL import Image

    array = (
        (image.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    )
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array), mode="RGB").save(buffer, format="PNG")
    return buffer.getvalue()


def plan_batches(
    num_prompts: int, seeds: Sequence[int], batch_size: int
) -> list[list[tuple[int, int]]]:
    """(prompt index, seed) cells in batches: per seed, ``batch_size`` prompts at a time in
    prompt order. A batch's makeup depends only on its seed, the prompt count and the batch
    size, so an image is drawn in the same batch whatever else was asked for or is done."""
    return [
        [(i, seed) for i in range(start, min(start + batch_size, num_prompts))]
        for seed in seeds
        for start in range(0, num_prompts, batch_size)
    ]


def _identity(config: SampleConfig) -> dict[str, Any]:
    return {"model": config.model_spec(), "sampling": config.sampling_settings()}


def _check_settings(out: Path, identity: dict[str, Any]) -> None:
    path = out / mf.SETTINGS
    if not path.is_file():
        return
    stored = json.loads(path.read_text())
    for part in ("model", "sampling"):
        old, new = stored.get(part, {}), identity[part]
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                raise ConfigError(
                    f"output_dir: {out} holds images made with {key}={old.get(key)!r}, this run "
                    f"has {new.get(key)!r}; use another output_dir (images of different settings "
                    "never mix)"
                )


def _done_cells(out: Path, prompt_set: PromptSet) -> dict[tuple[int, int], dict[str, Any]]:
    """Finished images by (prompt index, seed); stale manifest lines are dropped for good."""
    records, bad = mf.read_jsonl(out / mf.MANIFEST)
    valid = mf.read_manifest(out) if records or bad else []
    done = {}
    for record in valid:
        index = int(record["prompt_index"])
        if index < len(prompt_set) and record["prompt"] != prompt_set.prompts[index]:
            raise ConfigError(
                f"prompts: {out} holds images of prompt {index} {record['prompt']!r:.60}, this "
                f"prompt set has {prompt_set.prompts[index]!r:.60} there; use another output_dir"
            )
        done[(index, int(record["seed"]))] = record
    if bad or len(valid) != len(records):
        mf.rewrite_jsonl(out / mf.MANIFEST, valid)  # drop torn lines and images that went missing
    return done


def run_sample(config: SampleConfig, *, sampler: Sampler | None = None) -> SampleResult:
    """Draw every (prompt, seed) image not already in ``output_dir``; see the module docstring.

    ``sampler`` skips loading (tests, or a caller sampling several prompt sets with one model).
    """
    from tqdm.auto import tqdm

    config.validate()
    prompt_set = load_prompts(
        config.prompts, config.prompts_format, split=config.prompts_split, limit=config.max_prompts
    )
    out = Path(config.output_dir)
    identity = _identity(config)
    _check_settings(out, identity)
    mf.remove_stale_tmp(out / mf.IMAGES)
    done = _done_cells(out, prompt_set)
    batches = plan_batches(len(prompt_set), config.seeds, config.batch_size)
    total = sum(len(b) for b in batches)
    todo = [b for b in batches if any(cell not in done for cell in b)]
    skipped = total - sum(sum(cell not in done for cell in b) for b in todo)
    if not todo:
        return SampleResult(out, total, 0, skipped)

    if sampler is None:
        from snpo.backbones import detect_family

        detect_family(config.model_name_or_path, revision=config.revision)  # cheap, before the load
        sampler = load_sampler(config)
    (out / mf.IMAGES).mkdir(parents=True, exist_ok=True)  # only once the model has loaded
    if not (out / mf.SETTINGS).is_file():
        mf.write_json(out / mf.SETTINGS, {**identity, "prompts_source": prompt_set.source})
    device = str(sampler.backbone.device)
    drawn = 0
    for batch in tqdm(todo, desc="sample", unit="batch", disable=not config.show_progress):
        prompts = [prompt_set.prompts[i] for i, _ in batch]
        images = sampler.images(prompts, [seed for _, seed in batch], config)
        records = []
        for (index, seed), image in zip(batch, images):
            if (index, seed) in done:
                continue  # already on disk and recorded: never rewritten
            name = mf.image_name(index, seed)
            data = png_bytes(image)
            mf.atomic_write_bytes(out / name, data)
            records.append(
                {
                    "file": name,
                    "prompt_index": index,
                    "prompt": prompt_set.prompts[index],
                    "category": prompt_set.categories[index],
                    "seed": seed,
                    "sha256": hashlib.sha256(data).hexdigest(),
                    "height": int(image.shape[-2]),
                    "width": int(image.shape[-1]),
                    "model": identity["model"],
                    "sampling": identity["sampling"],
                    "device": device,
                }
            )
        mf.append_jsonl(out / mf.MANIFEST, records)  # the batch counts once this line is written
        drawn += len(records)
    return SampleResult(out, total, drawn, skipped)
