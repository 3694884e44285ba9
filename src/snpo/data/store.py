"""The storage interface that a ``PreferenceSource`` reads rows through.

A store knows *where* rows live (parquet shards, a ``datasets.Dataset``, a JSONL/CSV file) but
nothing about what they mean; ``PreferenceSource`` applies a column schema on top. Rows are
addressed by a *location*: an int from 0 to ``num_rows - 1``, stable for a given store.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any, Generic, TypeVar

import numpy as np

from snpo.data.records import DataSourceError

K = TypeVar("K")
V = TypeVar("V")


class RowStore:
    """Base class: rows addressed by location, read in bulk by column or one at a time."""

    #: how the store is named in messages and record keys (a path, a glob, a hub id)
    name: str = "<store>"
    #: folder that relative image paths are resolved against
    base_dir: Path | None = None
    #: True when image values are already in memory (paths), so reading them in bulk is cheap
    images_in_memory: bool = False

    @property
    def num_rows(self) -> int:
        raise NotImplementedError

    @property
    def columns(self) -> list[str]:
        raise NotImplementedError

    def check_columns(self, required: Sequence[str]) -> None:
        """Raise a one-line ``DataSourceError`` when a required column is absent."""
        missing = [c for c in required if c not in self.columns]
        if missing:
            raise missing_columns_error(self.name, missing, self.columns)

    def preskipped(self) -> dict[str, int]:
        """Rows that never became rows (e.g. unparseable JSONL lines), counted per kind."""
        return {}

    def iter_batches(
        self, columns: Sequence[str]
    ) -> Iterator[tuple[int, int, dict[str, list] | None]]:
        """Yield ``(first_location, n_rows, {column: values})`` for consecutive runs of rows.

        The dict is None when that run of rows cannot be read at all (a corrupt row group):
        the validation pass then counts its rows as ``malformed_row`` instead of failing.
        """
        raise NotImplementedError

    def fetch(self, location: int, columns: Sequence[str]) -> dict[str, Any]:
        """The values of ``columns`` in one row."""
        raise NotImplementedError

    def key(self, location: int) -> str:
        """A stable id for a row, e.g. ``"train-00001.parquet:417"``."""
        return f"{self.name}:{location}"

    def groups(self, locations: np.ndarray) -> np.ndarray:
        """Locality group of each location: rows of one group are cheap to read together.

        The default (one group) suits stores with cheap random access.
        """
        return np.zeros(len(locations), dtype=np.int64)


def missing_columns_error(name: str, missing: Sequence[str], present: Sequence[str]) -> Exception:
    """The one-line error for a source that lacks required columns."""
    return DataSourceError(
        f"missing_column: {name} lacks column(s) {', '.join(missing)} "
        f"(has: {', '.join(present) or 'none'})"
    )


class LRU(Generic[K, V]):
    """A tiny least-recently-used cache; ``on_evict`` can release a resource (a file handle)."""

    def __init__(self, capacity: int, on_evict: Callable[[V], None] | None = None) -> None:
        self.capacity = max(1, int(capacity))
        self._items: OrderedDict[K, V] = OrderedDict()
        self._on_evict = on_evict

    def get(self, key: K, make: Callable[[], V]) -> tuple[V, bool]:
        """The cached value for ``key`` (made with ``make()`` if absent) and whether it was hit."""
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key], True
        value = make()
        self._items[key] = value
        while len(self._items) > self.capacity:
            _, old = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(old)
        return value, False

    def clear(self) -> None:
        while self._items:
            _, old = self._items.popitem(last=False)
            if self._on_evict is not None:
                self._on_evict(old)

    def __len__(self) -> int:
        return len(self._items)
