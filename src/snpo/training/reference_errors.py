"""Reference errors computed once and reused by every run of a sweep (``precompute_reference``).

The frozen reference's per-sample errors ``e_ref`` depend on the pair's latents, its
condition (prompt or null branch), its noise and its timestep, and on nothing the sweep
changes (``beta``, ``mix_lambda``, ``mix_scale``, the objective, the learning rate, ...). The
reference forward is about a third of a training step, so a sweep of K runs that share data
pays it K times for the same numbers. With ``precompute_reference: true`` the first run
records ``e_ref`` of every pair it trains on; later runs read them and skip the reference
forward; any pair not stored yet is computed and recorded as usual.

Why this is exact with the trainer's per-slot seeding
-----------------------------------------------------
Each pair's noise, timestep and branch label come from the seed of its SLOT in the run,
``pair_seed(seed, step, index)`` (``snpo.methods.draws``), which names a position in the
data order, not the pair itself. But the data order is a permutation seeded by ``(seed,
epoch)``, and the pairs of step ``s`` are the next ``total`` pairs of that order, ``total =
batch x accumulation x processes`` (the seeds do not depend on how ``total`` is split). So
for runs sharing the seed, the data and ``total``, slot ``(step, index)`` holds the same pair
in the same epoch and draws the same noise: no special noise mode is needed. The stored values are the exact float32 errors the run computed, so a run that reads
them gets bit-identical losses to one that recomputes them (on the same device and kernels).

Records are keyed by the pair seed (which encodes seed, step and index) and carry a hash of the
pair's key (its dataset key, else its prompt). A stored record whose pair differs from the
run's raises: the data or its order changed. The folder is named by a fingerprint of every
``TrainConfig`` field except those that cannot change ``e_ref`` (``REUSABLE_ACROSS`` in
``snpo.training.fingerprints``), plus the denoiser weights, the dataset files, the cache manifest and
the number of processes. Valid for the single-network methods on the dataset's own labels
(``dpo``, ``bdpo``, ``snpo-naive``, ``snpo``, ``sft``: the winner/loser swap happens in the
objective, after the errors); not for CHATS (per-network conditions) or reversed labels.

Storage: append-only binary records (24 bytes a pair) per process rank, ``fingerprint.json``
beside them. A run killed mid-write loses at most its last partial record; concurrent writers
only duplicate records.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from snpo.errors import ConfigError
from snpo.files import atomic_write_json, stable_hash

RECORD = np.dtype([("seed", "<i8"), ("key", "<i8"), ("chosen", "<f4"), ("rejected", "<f4")])
FINGERPRINT_FILE = "fingerprint.json"


def key_hash(text: str) -> int:
    """A 63-bit hash of a pair's identity (int64-safe)."""
    return int.from_bytes(hashlib.blake2b(text.encode(), digest_size=8).digest(), "little") >> 1


def pair_identities(batch: dict[str, Any]) -> list[str]:
    """What identifies each pair of a batch: its dataset key, else its prompt."""
    ids = batch.get("key") or batch.get("prompt")
    if ids is None:
        raise ConfigError("precompute_reference: batches carry neither 'key' nor 'prompt'")
    return [str(i) for i in ids]


class ReferenceErrorStore:
    """Stored reference errors under ``root/<fingerprint hash>/`` (see the module docstring)."""

    def __init__(self, root: str | Path, fingerprint: dict[str, Any], *, rank: int | None = None) -> None:
        self.folder = Path(root) / stable_hash(fingerprint)
        self.folder.mkdir(parents=True, exist_ok=True)
        meta = self.folder / FINGERPRINT_FILE
        if not meta.exists():  # several processes may write it at once: each its own tmp file
            atomic_write_json(meta, fingerprint, per_process=True, sort_keys=True, default=str)
        rank = int(os.environ.get("RANK", "0")) if rank is None else rank
        self.path = self.folder / f"records-rank{rank}.bin"
        if self.path.exists() and self.path.stat().st_size % RECORD.itemsize:
            with open(self.path, "r+b") as fh:  # a run killed mid-write: drop the torn record
                fh.truncate(self.path.stat().st_size - self.path.stat().st_size % RECORD.itemsize)
        self.hits = 0
        self.misses = 0
        self.recorded = 0
        self._load()

    def _load(self) -> None:
        parts = []
        for path in sorted(self.folder.glob("records-rank*.bin")):
            raw = path.read_bytes()
            raw = raw[: len(raw) - len(raw) % RECORD.itemsize]  # drop a torn last record
            parts.append(np.frombuffer(raw, dtype=RECORD))
        records = np.concatenate(parts) if parts else np.zeros(0, dtype=RECORD)
        _, first = np.unique(records["seed"], return_index=True)
        self.records = records[first]  # sorted by seed, duplicates dropped
        self.stored = len(self.records)

    def __len__(self) -> int:
        return self.stored

    def lookup(self, pair_seeds: Sequence[int], batch: dict[str, Any]) -> tuple[Tensor, Tensor] | None:
        """(chosen, rejected) reference errors of the batch's pairs, or None unless every pair
        is stored. Raises ValueError when a stored slot belongs to another pair."""
        seeds = np.asarray(pair_seeds, dtype=np.int64)
        where = np.searchsorted(self.records["seed"], seeds)
        where = np.minimum(where, max(len(self.records) - 1, 0))
        if len(self.records) == 0 or not np.all(self.records["seed"][where] == seeds):
            self.misses += len(seeds)
            return None
        found = self.records[where]
        keys = np.asarray([key_hash(k) for k in pair_identities(batch)], dtype=np.int64)
        bad = np.flatnonzero(found["key"] != keys)
        if len(bad):
            raise ConfigError(
                f"reference_errors_dir: stored reference errors in {self.folder} are for other "
                f"pairs (pair {pair_identities(batch)[bad[0]]!r} differs): the data, its order or "
                "the batch layout changed; use another reference_errors_dir"
            )
        self.hits += len(seeds)
        return torch.from_numpy(found["chosen"].copy()), torch.from_numpy(found["rejected"].copy())

    def record(
        self, pair_seeds: Sequence[int], batch: dict[str, Any], chosen: Tensor, rejected: Tensor
    ) -> None:
        """Append the batch's reference errors (one write, so concurrent writers interleave
        whole records)."""
        out = np.zeros(len(pair_seeds), dtype=RECORD)
        out["seed"] = np.asarray(pair_seeds, dtype=np.int64)
        out["key"] = [key_hash(k) for k in pair_identities(batch)]
        out["chosen"] = chosen.detach().float().cpu().numpy()
        out["rejected"] = rejected.detach().float().cpu().numpy()
        with open(self.path, "ab") as fh:
            fh.write(out.tobytes())
        self.recorded += len(out)


def reference_errors_root(config: Any) -> Path:
    if config.reference_errors_dir:
        return Path(config.reference_errors_dir)
    if not config.cache_dir:
        raise ConfigError("reference_errors_dir: expected a folder (or a cache_dir), got nothing")
    return Path(config.cache_dir) / "reference-errors"


def open_reference_store(config: Any) -> ReferenceErrorStore:
    """The store of this config's sweep (``precompute_reference``)."""
    from snpo.training.fingerprints import reference_fingerprint

    return ReferenceErrorStore(reference_errors_root(config), reference_fingerprint(config))
