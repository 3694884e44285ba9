"""Preference records, the data layer's errors, and the handling of stored image values.

Sources store an image in one of a few shapes: raw bytes (Pick-a-Pic's ``jpg_0``), a
``{"bytes": ..., "path": ...}`` dict (how ``datasets`` stores an ``Image`` column), a file path
(JSONL/CSV), or an already decoded PIL image. The helpers here accept all of them, so the
sources never special-case a format.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from PIL import Image

from snpo.data.skips import UNREADABLE_IMAGE
from snpo.errors import UserError


class DataSourceError(UserError):
    """A source cannot be used at all (no such file, a missing column, no usable rows).

    The message is always one line and names the source, so a trainer can print it as is.
    """


class RecordSkipped(Exception):
    """One record cannot be used (raised by ``PreferenceSource.get``); ``kind`` says why."""

    def __init__(self, kind: str, key: str, detail: str = "") -> None:
        super().__init__(f"{kind} at {key}: {detail}" if detail else f"{kind} at {key}")
        self.kind = kind
        self.key = key
        self.detail = detail


@dataclass(frozen=True)
class PreferenceRecord:
    """One preference pair: the prompt, the preferred and the other image, and a stable id."""

    prompt: str
    chosen: Image.Image
    rejected: Image.Image
    key: str


def one_line(text: object, limit: int = 300) -> str:
    """First line of ``text``, shortened: error messages must stay on one line."""
    lines = str(text).strip().splitlines()
    first = lines[0] if lines else ""
    return first if len(first) <= limit else first[: limit - 3] + "..."


def normalize_image_value(
    value: Any, base_dir: Path | None = None
) -> bytes | Path | Image.Image | None:
    """Normalise a stored image value to bytes, a path (relative ones joined to ``base_dir``),
    a PIL image, or None."""
    if isinstance(value, dict):
        # datasets' Image storage: bytes win over path (path is often just the original name)
        data = value.get("bytes")
        value = data if data is not None else value.get("path")
    if value is None or isinstance(value, Image.Image):
        return value
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    if isinstance(value, str | os.PathLike):
        if not str(value):
            return None
        path = Path(value).expanduser()
        if not path.is_absolute() and base_dir is not None:
            path = base_dir / path
        return path
    raise TypeError(f"unsupported image value of type {type(value).__name__}")


def image_problem(value: Any, base_dir: Path | None = None) -> str | None:
    """Why ``value`` cannot be an image without decoding it (None when it might be one).

    Cheap: looks only at sizes and file existence, so the validation pass can run it on
    values that are already in memory (paths of a JSONL file, bytes read for hashing).
    """
    try:
        norm = normalize_image_value(value, base_dir)
    except TypeError as exc:
        return str(exc)
    if norm is None:
        return "no image"
    if isinstance(norm, bytes):
        return None if norm else "zero bytes"
    if isinstance(norm, Path):
        try:
            size = norm.stat().st_size
        except OSError:
            return f"missing file {norm}"
        return None if size else f"zero-byte file {norm}"
    return None


def image_digest(value: Any, base_dir: Path | None = None) -> bytes | None:
    """A 16-byte hash of the image's stored bytes (None when there are no bytes to hash)."""
    try:
        norm = normalize_image_value(value, base_dir)
    except TypeError:
        return None
    if isinstance(norm, Path):
        try:
            norm = norm.read_bytes()
        except OSError:
            return None
    elif isinstance(norm, Image.Image):
        norm = norm.tobytes() + repr((norm.mode, norm.size)).encode()
    if not norm:
        return None
    return hashlib.blake2b(norm, digest_size=16).digest()


def decode_image(value: Any, key: str, base_dir: Path | None = None) -> Image.Image:
    """Decode a stored image value to an RGB PIL image, or raise ``RecordSkipped``.

    Any decoding failure (corrupt or truncated bytes, a missing or empty file) becomes
    ``RecordSkipped(UNREADABLE_IMAGE)``: one bad image must not stop training.
    """
    problem = image_problem(value, base_dir)
    if problem is not None:
        raise RecordSkipped(UNREADABLE_IMAGE, key, problem)
    norm = normalize_image_value(value, base_dir)
    try:
        if isinstance(norm, Image.Image):
            image = norm
        else:
            source = io.BytesIO(norm) if isinstance(norm, bytes) else norm
            image = Image.open(source)
            image.load()  # PIL decodes lazily; force it here so corrupt data fails here
        return image if image.mode == "RGB" else image.convert("RGB")
    except Exception as exc:  # PIL raises many types (OSError, SyntaxError, ValueError...)
        # drop object addresses ("<_io.BytesIO object at 0x7f...>"): the same bad image must
        # give the same message in every process, epoch and resumed run
        detail = re.sub(r"\s*<[^<>]* at 0x[0-9a-fA-F]+>", "", one_line(exc))
        raise RecordSkipped(UNREADABLE_IMAGE, key, detail) from exc
