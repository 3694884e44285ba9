"""The backbone registry: model families by name, and loading a model folder or hub id.

    backbone = load_backbone("stable-diffusion-v1-5/stable-diffusion-v1-5")   # or a folder

The family is read from the pipeline's ``model_index.json`` (``_class_name``; for an unknown
class name, from its components: ``text_encoder_2`` means SDXL). A new family is one file
implementing ``snpo.backbones.base.Backbone`` plus one line in ``BACKBONES`` and, if it has
its own pipeline class, one in ``PIPELINE_FAMILIES``.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from snpo.backbones.base import Backbone
from snpo.backbones.flux import FluxBackbone
from snpo.backbones.loading import ModelNotFoundError, read_model_index, resolve_model_path
from snpo.backbones.sd import StableDiffusionBackbone
from snpo.backbones.sd3 import StableDiffusion3Backbone
from snpo.backbones.sdxl import StableDiffusionXLBackbone
from snpo.backbones.toy import TOY_CLASS_NAME, ToyBackbone
from snpo.backbones.toy_flow import TOY_FLOW_CLASS_NAME, ToyFlowBackbone

BACKBONES: dict[str, type[Backbone]] = {
    "toy": ToyBackbone,
    "toy-flow": ToyFlowBackbone,
    "sd": StableDiffusionBackbone,
    "sdxl": StableDiffusionXLBackbone,
    "sd3": StableDiffusion3Backbone,
    "flux": FluxBackbone,
}

#: ``model_index.json`` ``_class_name`` -> family
PIPELINE_FAMILIES: dict[str, str] = {
    TOY_CLASS_NAME: "toy",
    TOY_FLOW_CLASS_NAME: "toy-flow",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
    "StableDiffusion3Pipeline": "sd3",
    "StableDiffusion3Img2ImgPipeline": "sd3",
    "FluxPipeline": "flux",
    "FluxImg2ImgPipeline": "flux",
}


def detect_family(spec: str | Path, *, revision: str | None = None) -> str:
    """The family of a pipeline folder or hub id, from its ``model_index.json`` (cheap)."""
    index = read_model_index(spec, revision=revision)
    name = index.get("_class_name", "")
    if name in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[name]
    if "text_encoder_2" in index and "unet" in index:
        return "sdxl"
    if "transformer" in index and "text_encoder_3" in index:
        return "sd3"
    if "transformer" in index and (index.get("text_encoder_2") or [None, None])[-1] == "T5EncoderModel":
        return "flux"
    if "text_encoder" in index and "unet" in index:
        return "sd"
    raise ModelNotFoundError(
        f"model_name_or_path: {spec} is a {name or 'pipeline of unknown class'}; "
        f"supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
    )


#: config keys (``TrainConfig``, ``SampleConfig``) a family may read: the loading options
#: (``Backbone.loading_options``) and the settings (``Backbone.setting_names``) of every family
FAMILY_KEYS = ("use_t5", "weighting_scheme", "logit_mean", "logit_std", "mode_scale",
               "max_sequence_length", "embedded_guidance_scale", "true_cfg")


def family_options(config: Any) -> dict[str, Any]:
    """The family keys of a config (absent ones as None: the family's default)."""
    return {key: getattr(config, key, None) for key in FAMILY_KEYS}


def load_backbone(
    model_name_or_path: str | Path,
    *,
    family: str | None = None,
    with_encoders: bool = True,
    vae_path: str | Path | None = None,
    upcast_vae: bool | None = None,
    revision: str | None = None,
    variant: str | None = None,
    options: Mapping[str, Any] | None = None,
) -> Backbone:
    """Load a backbone from a pipeline folder or hub id; the family is detected unless given.

    ``with_encoders=False`` skips the VAE and text encoders (training from a cache).
    ``options`` (e.g. :func:`family_options` of a config): the family's loading options go to
    its ``from_pretrained`` (SD3: ``use_t5``), its settings are set on the backbone (flow
    models: sigma sampling, T5 length, FLUX guidance and ``true_cfg``); other keys and None
    values are ignored.
    """
    family = family or detect_family(model_name_or_path, revision=revision)
    if family not in BACKBONES:
        raise ModelNotFoundError(f"family: expected one of {', '.join(BACKBONES)}, got {family!r}")
    path = resolve_model_path(model_name_or_path, revision=revision, variant=variant)
    cls = BACKBONES[family]
    options = {k: v for k, v in (options or {}).items() if v is not None}
    if family == "toy":
        backbone = ToyBackbone.from_pretrained(path)
    else:
        loading = {k: v for k, v in options.items() if k in cls.loading_options}
        backbone = cls.from_pretrained(
            path, with_encoders=with_encoders, vae_path=vae_path, upcast_vae=upcast_vae,
            revision=revision, variant=variant, **loading,
        )
        backbone.model_name_or_path = str(model_name_or_path)
    backbone.apply_settings(options)
    return backbone


def encoding_options(family: str, model_path: str | Path, options: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """What the encoded conditions of ``family``'s model at ``model_path`` depend on besides
    its files, with these options (flow models: T5 length, SD3's T5 switch); what
    ``Backbone.encoding_options()`` of the loaded model returns. Reads ``model_index.json`` only."""
    index = read_model_index(model_path)
    return BACKBONES[family].encoding_options_for(dict(options or {}), index)


def has_null_branch(family: str, options: Mapping[str, Any] | None = None) -> bool:
    """Whether ``family``'s sampler runs a null (unconditional) branch with these options
    (FLUX: only with ``true_cfg``), known before any weights load."""
    return BACKBONES[family].has_null_branch_for(true_cfg=bool((options or {}).get("true_cfg")))


__all__ = [
    "BACKBONES",
    "FAMILY_KEYS",
    "PIPELINE_FAMILIES",
    "Backbone",
    "ModelNotFoundError",
    "detect_family",
    "encoding_options",
    "family_options",
    "has_null_branch",
    "load_backbone",
    "read_model_index",
    "resolve_model_path",
]
