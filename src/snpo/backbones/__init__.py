"""The backbone registry: model families by name, and loading a model folder or hub id.

    backbone = load_backbone("stable-diffusion-v1-5/stable-diffusion-v1-5")   # or a folder

The family is read from the pipeline's ``model_index.json`` (``_class_name``; for an unknown
class name, from its components: ``text_encoder_2`` means SDXL). A new family is one file
implementing ``snpo.backbones.base.Backbone`` plus one line in ``BACKBONES`` and, if it has
its own pipeline class, one in ``PIPELINE_FAMILIES``.
"""

from __future__ import annotations

from pathlib import Path

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


def load_backbone(
    model_name_or_path: str | Path,
    *,
    family: str | None = None,
    with_encoders: bool = True,
    vae_path: str | Path | None = None,
    upcast_vae: bool | None = None,
    revision: str | None = None,
    variant: str | None = None,
) -> Backbone:
    """Load a backbone from a pipeline folder or hub id; the family is detected unless given.

    ``with_encoders=False`` skips the VAE and text encoders (training from a cache).
    """
    family = family or detect_family(model_name_or_path, revision=revision)
    if family not in BACKBONES:
        raise ModelNotFoundError(f"family: expected one of {', '.join(BACKBONES)}, got {family!r}")
    path = resolve_model_path(model_name_or_path, revision=revision, variant=variant)
    if family == "toy":
        return ToyBackbone.from_pretrained(path)
    backbone = BACKBONES[family].from_pretrained(
        path, with_encoders=with_encoders, vae_path=vae_path, upcast_vae=upcast_vae,
        revision=revision, variant=variant,
    )
    backbone.model_name_or_path = str(model_name_or_path)
    return backbone


__all__ = [
    "BACKBONES",
    "PIPELINE_FAMILIES",
    "Backbone",
    "ModelNotFoundError",
    "detect_family",
    "load_backbone",
    "read_model_index",
    "resolve_model_path",
]
