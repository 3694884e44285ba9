"""The files of a sample folder, and writing them so that a kill at any moment loses nothing
that was recorded.

    samples/
      sample_settings.json   model and sampling settings every image shares (checked on resume)
      manifest.jsonl         one line per finished image (written after its PNG is in place)
      images/p00012_s3.png   prompt index 12, seed 3
      scores.jsonl           per image per scorer (``snpo score``), scores.csv (a wide table)

An image counts as done when its manifest line exists and the PNG's sha256 matches it.
PNGs are written to ``*.tmp`` and renamed into place; manifest lines are appended in one
write per batch, after the batch's PNGs. A kill can therefore leave a ``*.tmp`` file, PNGs
without manifest lines, or a torn last line: a resumed run ignores all three and redraws.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from snpo.errors import ConfigError
from snpo.files import TMP_SUFFIX, atomic_write_bytes, sha256_file

MANIFEST = "manifest.jsonl"
SETTINGS = "sample_settings.json"
IMAGES = "images"
SCORES = "scores.jsonl"
SCORES_CSV = "scores.csv"


def image_name(prompt_index: int, seed: int) -> str:
    """The image's path relative to the sample folder."""
    return f"{IMAGES}/p{prompt_index:05d}_s{seed}.png"


def write_json(path: str | Path, data: Any) -> None:
    atomic_write_bytes(path, (json.dumps(data, indent=2, sort_keys=True) + "\n").encode())


def read_jsonl(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The records of a JSONL file, and how many lines were unreadable (a torn last line
    from a kill, or garbage). A missing file has no records."""
    path = Path(path)
    if not path.is_file():
        return [], 0
    records, bad = [], 0
    for line in path.read_bytes().split(b"\n"):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            bad += 1
            continue
        if isinstance(record, dict):
            records.append(record)
        else:
            bad += 1
    return records, bad


def append_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Append records in ONE write (a kill leaves all or none of them, or a torn last line
    that :func:`read_jsonl` skips), then flush to disk."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    if not data:
        return
    path = Path(path)
    # a torn last line must not swallow the first new record: start on a fresh line
    if path.is_file() and path.stat().st_size > 0:
        with open(path, "rb") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                data = b"\n" + data
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        view = memoryview(data)
        while view:
            written = os.write(fd, view)
            view = view[written:]
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_jsonl(path: str | Path, records: Iterable[dict[str, Any]]) -> None:
    """Replace a JSONL file atomically (used to drop torn or stale lines on resume)."""
    data = "".join(json.dumps(r, sort_keys=True) + "\n" for r in records).encode()
    atomic_write_bytes(path, data)


def remove_stale_tmp(folder: str | Path) -> int:
    """Delete ``*.tmp`` files a killed run left behind; returns how many."""
    count = 0
    for tmp in Path(folder).glob(f"*{TMP_SUFFIX}"):
        tmp.unlink(missing_ok=True)
        count += 1
    return count


def read_manifest(folder: str | Path) -> list[dict[str, Any]]:
    """The manifest records of a sample folder whose PNG is present and matches its sha256,
    last record winning for an image written twice. One-line error without a manifest."""
    folder = Path(folder)
    if not (folder / MANIFEST).is_file():
        raise ConfigError(f"samples: {folder} has no {MANIFEST} (not a `snpo sample` folder)")
    records, _ = read_jsonl(folder / MANIFEST)
    latest: dict[str, dict[str, Any]] = {}
    for record in records:
        if isinstance(record.get("file"), str):
            latest[record["file"]] = record
    return [r for r in latest.values() if valid_image(folder, r)]


def valid_image(folder: Path, record: dict[str, Any]) -> bool:
    """The record's PNG exists and has the recorded sha256."""
    path = folder / record["file"]
    return path.is_file() and sha256_file(path) == record.get("sha256")
