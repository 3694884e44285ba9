"""Lazy reading of parquet shards (Pick-a-Pic v2, or any parquet with preference columns).

The Pick-a-Pic v2 train split is ~960k rows and ~300 GB of JPEG bytes, so nothing here ever
holds more than a few row groups in memory:

* opening the store reads only the shards' footers (row counts, schema);
* bulk reads (the validation pass) go one row group at a time, projected on the columns asked
  for, so validating captions and labels never touches the image bytes;
* ``fetch`` reads the one row group that holds the row (projected on the columns asked for) and
  keeps the last ``cache_row_groups`` of them, so rows read in row-group order cost one read
  per row group. Parquet cannot read a single row of a row group, so a *uniformly* shuffled
  order reads a whole row group per row: see ``GroupedShuffleSampler``.

File handles and cached row groups are per process: they are dropped when the store is pickled
(spawned DataLoader workers) and reopened after a fork (the pid changes).
"""

from __future__ import annotations

import glob as globlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from snpo.data.records import DataSourceError, RecordSkipped, one_line
from snpo.data.skips import MALFORMED_ROW, UNREADABLE_SHARD
from snpo.data.store import LRU, RowStore, missing_columns_error

GLOB_CHARS = set("*?[")


KNOWN_SPLITS = ("train", "validation", "valid", "val", "test", "dev")


def split_of(path: Path) -> str | None:
    """The split a shard belongs to, from HF naming (``train-00001-of-00645.parquet``,
    ``validation_unique-...``, ``test/xxx.parquet``); None when the name says nothing."""
    for name in (path.name.split(".")[0].split("-", 1)[0], path.parent.name):
        if any(name == k or name.startswith(k + "_") for k in KNOWN_SPLITS):
            return name
    return None


def list_parquet_files(spec: str | Path, split: str | None) -> list[Path]:
    """Shards named by a folder, a glob or a single file, sorted, filtered by ``split``.

    Split names come from HF shard naming (see ``split_of``). Shards whose names say nothing
    about a split are all used, whatever ``split`` is. Shards of several splits need
    ``split``: mixing train and test by accident would be a silent disaster.
    """
    text = str(spec)
    if GLOB_CHARS & set(text):
        files = [Path(p) for p in globlib.glob(os.path.expanduser(text), recursive=True)]
        files = [p for p in files if p.is_file() and p.suffix == ".parquet"]
    elif Path(text).is_dir():
        files = [p for p in Path(text).rglob("*.parquet") if p.is_file()]
    else:
        files = [Path(text)]
    files.sort()
    if not files:
        raise DataSourceError(f"no parquet files match {text}")
    found = sorted({s for p in files if (s := split_of(p)) is not None})
    if split is not None and found:
        chosen = [p for p in files if split_of(p) == split]
        if not chosen:
            raise DataSourceError(
                f"no parquet shards of split '{split}' in {text} (splits found: {', '.join(found)})"
            )
        return chosen
    if split is None and len(found) > 1:
        raise DataSourceError(
            f"{text} holds shards of several splits ({', '.join(found)}): pass split="
        )
    return files


class ParquetStore(RowStore):
    """Rows of one or more parquet shards, read lazily by row group."""

    def __init__(
        self,
        files: Sequence[str | Path],
        *,
        name: str | None = None,
        cache_row_groups: int = 2,
        max_open_files: int = 16,
    ) -> None:
        files = [Path(f) for f in files]
        if not files:
            raise DataSourceError(f"no parquet files in {name}")
        self.name = name or str(files[0])
        self.base_dir = files[0].parent
        self.cache_row_groups = cache_row_groups
        self.max_open_files = max_open_files
        self._schemas: list[list[str]] = []
        rg_rows: list[int] = []
        rg_file: list[int] = []
        rg_local: list[int] = []
        # One bad shard (zero bytes, a cut-off upload) must not cost the other 644: it is
        # skipped and counted as unreadable_shard; only a source with no readable shard fails.
        self.files: list[Path] = []
        self.unreadable_files: list[tuple[Path, str]] = []
        for path in files:
            try:
                meta = pq.read_metadata(path)  # the footer only: no data is read
                schema = meta.schema.to_arrow_schema()
            except (OSError, pa.ArrowException) as exc:
                self.unreadable_files.append((path, one_line(exc)))
                continue
            i = len(self.files)
            self.files.append(path)
            self._schemas.append(list(schema.names))
            for j in range(meta.num_row_groups):
                rg_rows.append(meta.row_group(j).num_rows)
                rg_file.append(i)
                rg_local.append(j)
        if not self.files:
            path, reason = self.unreadable_files[0]
            raise DataSourceError(f"cannot read parquet {path}: {reason}")
        # Global row numbering: row groups laid end to end, shard after shard.
        self._rg_start = np.concatenate([[0], np.cumsum(rg_rows, dtype=np.int64)])
        self._rg_file = np.asarray(rg_file, dtype=np.int64)
        self._rg_local = np.asarray(rg_local, dtype=np.int64)
        first_rg = np.searchsorted(self._rg_file, np.arange(len(self.files)), side="left")
        self._file_start = self._rg_start[first_rg]
        self.stats = {"row_group_reads": 0, "cache_hits": 0}
        self._reset_process_state()

    # -- per-process state -------------------------------------------------------------------
    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._handles: LRU[int, pq.ParquetFile] = LRU(self.max_open_files, lambda f: f.close())
        self._cache: LRU[tuple[int, tuple[str, ...]], pa.Table] = LRU(self.cache_row_groups)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        for name in ("_handles", "_cache", "_pid"):
            state.pop(name)
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._reset_process_state()

    def _file(self, index: int) -> pq.ParquetFile:
        if self._pid != os.getpid():  # forked: never share a parent's handles or cache
            self._reset_process_state()
        handle, _ = self._handles.get(index, lambda: pq.ParquetFile(self.files[index]))
        return handle

    # -- RowStore ------------------------------------------------------------------------------
    @property
    def num_rows(self) -> int:
        return int(self._rg_start[-1])

    @property
    def columns(self) -> list[str]:
        return self._schemas[0]

    def preskipped(self) -> dict[str, int]:
        return {UNREADABLE_SHARD: len(self.unreadable_files)} if self.unreadable_files else {}

    def check_columns(self, required: Sequence[str]) -> None:
        for path, names in zip(self.files, self._schemas):
            missing = [c for c in required if c not in names]
            if missing:
                raise missing_columns_error(str(path), missing, names)

    def _read_row_group(self, rg: int, columns: Sequence[str]) -> pa.Table:
        self.stats["row_group_reads"] += 1
        handle = self._file(int(self._rg_file[rg]))
        return handle.read_row_group(int(self._rg_local[rg]), columns=list(columns))

    def iter_batches(
        self, columns: Sequence[str]
    ) -> Iterator[tuple[int, int, dict[str, list] | None]]:
        for rg in range(len(self._rg_file)):
            start, n_rows = (
                int(self._rg_start[rg]),
                int(self._rg_start[rg + 1] - self._rg_start[rg]),
            )
            try:
                table = self._read_row_group(rg, columns)
            except (OSError, pa.ArrowException):
                yield start, n_rows, None
                continue
            yield start, n_rows, {c: table.column(c).to_pylist() for c in columns}
        self._handles.clear()  # a full pass opened every shard; do not keep them all open

    def _locate(self, location: int) -> tuple[int, int]:
        if not 0 <= location < self.num_rows:
            raise IndexError(f"row {location} out of range for {self.name}")
        rg = int(np.searchsorted(self._rg_start, location, side="right")) - 1
        return rg, location - int(self._rg_start[rg])

    def fetch(self, location: int, columns: Sequence[str]) -> dict[str, Any]:
        rg, offset = self._locate(int(location))
        if self._pid != os.getpid():
            self._reset_process_state()
        cols = tuple(columns)
        try:
            table, hit = self._cache.get((rg, cols), lambda: self._read_row_group(rg, cols))
        except (OSError, pa.ArrowException) as exc:
            raise RecordSkipped(MALFORMED_ROW, self.key(location), one_line(exc)) from exc
        self.stats["cache_hits"] += int(hit)
        return {c: table.column(c)[offset].as_py() for c in cols}

    def key(self, location: int) -> str:
        rg, _ = self._locate(int(location))
        shard = int(self._rg_file[rg])
        return f"{self.files[shard].name}:{int(location) - int(self._file_start[shard])}"

    def groups(self, locations: np.ndarray) -> np.ndarray:
        # the row group holding each row: reading rows of one row group together costs one read
        return np.searchsorted(self._rg_start, np.asarray(locations), side="right") - 1
