"""Small file-system helpers every layer shares: atomic writes, hub ids, stable hashes.

Atomic writes go to ``<name>.tmp`` (or ``<name>.<pid>.tmp`` when several processes may write
the same file), are flushed to disk, then renamed over the target, so a reader (or a run
killed mid-write and resumed) sees the old file or the new one, never half of one.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

TMP_SUFFIX = ".tmp"


def fsync_path(path: str | Path) -> None:
    """Flush a file, or a folder's entries (a rename inside it), to disk where the platform
    allows: a rename is only as durable as what it points at."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems refuse fsync on folders; the rename is still atomic
        pass
    finally:
        os.close(fd)


def _tmp_path(path: Path, per_process: bool) -> Path:
    suffix = f".{os.getpid()}{TMP_SUFFIX}" if per_process else TMP_SUFFIX
    return path.with_name(path.name + suffix)


def atomic_write_bytes(path: str | Path, data: bytes, *, per_process: bool = False) -> None:
    """Write ``data`` to a temporary file, flush it to disk and rename it over ``path``."""
    path = Path(path)
    tmp = _tmp_path(path, per_process)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_path(path.parent)


def atomic_write_text(path: str | Path, text: str, *, per_process: bool = False) -> None:
    atomic_write_bytes(path, text.encode(), per_process=per_process)


def atomic_write_json(path: str | Path, data: Any, *, per_process: bool = False, **dumps: Any) -> None:
    """``json.dumps(data, indent=1, **dumps)`` written atomically."""
    atomic_write_text(path, json.dumps(data, **{"indent": 1, **dumps}), per_process=per_process)


def atomic_save_safetensors(
    tensors: Mapping[str, Any], path: str | Path, metadata: Mapping[str, str] | None = None
) -> None:
    """``safetensors.torch.save_file`` written atomically (tensors made contiguous)."""
    from safetensors.torch import save_file

    path = Path(path)
    tmp = _tmp_path(path, False)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(tmp),
              metadata=dict(metadata) if metadata else None)
    os.replace(tmp, path)
    fsync_path(path.parent)


def is_hub_id(spec: str | Path) -> bool:
    """True for ``owner/name`` that is not an existing local path (a Hugging Face hub id)."""
    text = str(spec)
    return text.count("/") == 1 and not text.startswith((".", "/", "~")) and not Path(text).exists()


def stable_hash(data: Any, digest_size: int = 8) -> str:
    """A short hex digest of JSON-able ``data`` (keys sorted), stable across processes and runs."""
    text = json.dumps(data, sort_keys=True, default=str)
    return hashlib.blake2b(text.encode(), digest_size=digest_size).hexdigest()


def sha256_file(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()
