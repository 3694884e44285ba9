"""Where a model lives: ``model_index.json`` and a local folder for a folder or hub id.

Family-independent, so every backbone file and the registry in ``snpo.backbones`` share it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from snpo.errors import UserError
from snpo.files import is_hub_id


class ModelNotFoundError(UserError):
    """``model_name_or_path`` cannot be opened; the message is one line."""


def read_model_index(spec: str | Path, *, revision: str | None = None) -> dict[str, Any]:
    """``model_index.json`` of a folder or a hub repo (only that file is fetched)."""
    path = Path(spec).expanduser()
    if path.is_dir():
        index = path / "model_index.json"
        if not index.is_file():
            raise ModelNotFoundError(f"model_name_or_path: {spec} has no model_index.json (not a diffusers pipeline folder)")
        return json.loads(index.read_text())
    if not is_hub_id(spec):
        raise ModelNotFoundError(f"model_name_or_path: no such folder {str(spec)!r}")
    try:
        from huggingface_hub import hf_hub_download

        return json.loads(Path(hf_hub_download(str(spec), "model_index.json", revision=revision)).read_text())
    except Exception as exc:  # offline, unknown repo, gated: one line whatever the cause
        raise ModelNotFoundError(
            f"model_name_or_path: {spec} is not a local folder and the hub lookup failed: {type(exc).__name__}"
        ) from exc


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
