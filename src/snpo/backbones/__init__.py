"""The backbone registry: model families by name, and loading a model folder or hub id.

    backbone = load_backbone("stable-diffusion-v1-5/stable-diffusion-v1-5")   # or a folder

The family is read from the pipeline's ``model_index.json`` (``_class_name``; for an unknown
class name, from its components: ``text_encoder_2`` means SDXL). A new family is one file
implementing ``snpo.backbones.base.Backbone`` plus one line in ``BACKBONES`` and, if it has
its own pipeline class, one in ``PIPELINE_FAMILIES``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from snpo.backbones.base import Backbone
from snpo.backbones.sd import StableDiffusionBackbone
from snpo.backbones.sdxl import StableDiffusionXLBackbone
from snpo.backbones.toy import TOY_CLASS_NAME, ToyBackbone

BACKBONES: dict[str, type[Backbone]] = {
    "toy": ToyBackbone,
    "sd": StableDiffusionBackbone,
    "sdxl": StableDiffusionXLBackbone,
}

#: ``model_index.json`` ``_class_name`` -> family
PIPELINE_FAMILIES: dict[str, str] = {
    TOY_CLASS_NAME: "toy",
    "StableDiffusionPipeline": "sd",
    "StableDiffusionImg2ImgPipeline": "sd",
    "StableDiffusionXLPipeline": "sdxl",
    "StableDiffusionXLImg2ImgPipeline": "sdxl",
}


class ModelNotFoundError(ValueError):
    """``model_name_or_path`` cannot be opened; the message is one line."""


def _is_hub_id(spec: str) -> bool:
    return spec.count("/") == 1 and not spec.startswith((".", "/", "~")) and not Path(spec).exists()


def read_model_index(spec: str | Path, *, revision: str | None = None) -> dict[str, Any]:
    """``model_index.json`` of a folder or a hub repo (only that file is fetched)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(f"model_name_or_path: {spec} has no model_index.json (not a diffusers pipeline folder)")
        return json.loads(index.read_text())
    if not _is_hub_id(str(spec)):
        raise ModelNotFoundError(f"model_name_or_path: no such folder {str(spec)!r}")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(spec), "model_index.json", revision=revision)).read_text())
    except Exception as exc:  # offline, unknown repo, gated: one line whatever the cause
        raise ModelNotFoundError(
            f"model_name_or_path: {spec} is not a local folder and the hub lookup failed: {type(exc).__name__}"
        ) from exc


def detect_family(spec: str | Path, *, revision: str | None = None) -> str:
    """The family of a pipeline folder or hub id, from its ``model_index.json`` (cheap)."""
    index = read_model_index(spec, revision=revision)
    name = index.get("_class_name", "")
    if name in PIPELINE_FAMILIES:
        return PIPELINE_FAMILIES[name]
    if "text_encoder_2" in index and "unet" in index:
        return "sdxl"
    if "text_encoder" in index and "unet" in index:
        return "sd"
    raise ModelNotFoundError(
        f"model_name_or_path: {spec} is a {name or 'pipeline of unknown class'}; "
        f"supported: {', '.join(sorted(PIPELINE_FAMILIES))}"
    )


def resolve_model_path(spec: str | Path, *, revision: str | None = None, variant: str | None = None) -> Path:
    """A local folder for ``spec``: the folder itself, or the hub snapshot (downloaded once,
    the files a diffusers pipeline needs only)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        return path
    read_model_index(spec, revision=revision)  # a clear error before a long download
    try:
        from diffusers import DiffusionPipeline

        return Path(DiffusionPipeline.download(str(spec), revision=revision, variant=variant))
    except Exception as exc:
        raise ModelNotFoundError(f"model_name_or_path: download of {spec} failed: {type(exc).__name__}") from exc


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
    "resolve_model_path",
]
