"""Atomic, resumable checkpoints on top of ``accelerator.save_state``.

Layout under ``output_dir/checkpoints/``::

    checkpoint-500/        complete checkpoints (model, optimizer, scheduler, RNG per rank,
                           trainer_state.json)
    checkpoint-1000.tmp/   a write in progress: never read, removed on the next save
    latest                 text file naming the newest complete checkpoint

A checkpoint is written to ``*.tmp`` and renamed into place only when complete; ``latest``
is replaced atomically after that; old checkpoints are pruned only after the new one is in
place. A kill at any moment leaves the previous checkpoint loadable and ``latest`` on it.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(root: Path, spec: str) -> Path | None:
    """``latest`` (or a path) -> a complete checkpoint folder; None when there is none yet."""
    if spec != "latest":
        path = Path(spec)
        if not (path / STATE_FILE).is_file():
            path = root / spec
        if not (path / STATE_FILE).is_file():
            raise ValueError(f"resume_from_checkpoint: {spec!r} is not a complete checkpoint folder")
        return path
    pointer = root / "latest"
    if pointer.is_file():
        candidate = root / pointer.read_text().strip()
        if (candidate / STATE_FILE).is_file():
            return candidate
    complete = list_checkpoints(root)
    return complete[-1][1] if complete else None


def begin_checkpoint(root: Path, step: int) -> Path:
    """Create the temporary folder a checkpoint is written into (main process only)."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("checkpoint-*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"checkpoint-{step}.tmp"
    tmp.mkdir()
    return tmp


def finish_checkpoint(root: Path, tmp: Path, step: int, state: dict[str, Any], total_limit: int | None) -> Path:
    """Write the trainer state, move the checkpoint into place, point ``latest`` at it, prune."""
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
    final = root / f"checkpoint-{step}"
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    atomic_write_text(root / "latest", final.name)
    if total_limit is not None:
        complete = list_checkpoints(root)
        for _, old in complete[: max(0, len(complete) - total_limit)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    return json.loads((checkpoint / STATE_FILE).read_text())
