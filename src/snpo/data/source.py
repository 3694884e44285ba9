"""``PreferenceSource``: a store of rows + a column schema -> validated preference pairs.

Two steps, so that a useless dataset fails *before* any model is loaded:

1. ``scan()`` - the cheap validation pass. Reads only the small columns (caption, labels, and
   image ids where the source has them), skips and counts bad rows, and builds the index of
   usable rows. It raises a one-line ``DataSourceError`` when no row is usable. On Pick-a-Pic it
   never reads image bytes unless ``dedup="bytes"`` is asked for.
2. ``get(i)`` - reads and decodes one pair. An image that cannot be decoded can only be found
   here; ``get`` then raises ``RecordSkipped`` and the caller (``PreferencePairDataset``)
   skips and counts it.

Each skipped row is counted once, under the first check it fails, in this order: empty caption,
over-long caption (more than ``max_caption_chars`` characters: text encoders read only the first
77 tokens, so such a caption is junk or mostly ignored), bad label, tie, unreadable image (only
what is visible without decoding: missing file, zero bytes), duplicate pair. A shard that
cannot be read at all is skipped and counted as ``unreadable_shard`` (in files).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np

from snpo.data.records import (
    DataSourceError,
    PreferenceRecord,
    decode_image,
    image_digest,
    image_problem,
    normalize_image_value,
)
from snpo.data.skips import (
    DUPLICATE_PAIR,
    EMPTY_CAPTION,
    FILE_KINDS,
    MALFORMED_ROW,
    OVERLONG_CAPTION,
    UNREADABLE_IMAGE,
    SkipReport,
)
from snpo.data.store import RowStore

DedupMode = Literal["auto", "bytes", "none"]


@dataclass(frozen=True)
class Schema:
    """Which columns hold the prompt, the two images, and (optionally) labels and image ids.

    Without ``labels`` the first image column is the preferred one (prompt/chosen/rejected).
    ``classify(label_0, label_1, drop_ties)`` returns ``(skip_kind or None, second_image_won)``.
    """

    name: str
    prompt: str
    images: tuple[str, str]
    labels: tuple[str, str] | None = None
    ids: tuple[str, str] | None = None
    classify: Callable[[Any, Any, bool], tuple[str | None, bool]] | None = None

    @property
    def required(self) -> tuple[str, ...]:
        return (self.prompt, *self.images, *(self.labels or ()))


PAIRS = Schema(name="prompt/chosen/rejected", prompt="prompt", images=("chosen", "rejected"))


def choose_schema(columns: list[str], schemas: tuple[Schema, ...]) -> Schema:
    """The schema whose required columns are best covered (ties: the first one).

    Picking the closest schema makes the missing-column error name what is really missing
    (a Pick-a-Pic shard without ``label_1``, not "no prompt column").
    """
    present = set(columns)
    return max(schemas, key=lambda s: sum(c in present for c in s.required) / len(s.required))


class PreferenceSource:
    """Validated preference pairs from one store; see the module docstring for the two steps.

    Args:
        store: where the rows live.
        schema: what the columns mean.
        drop_ties: skip (and count) tied rows; when False they are kept, image 0 first.
        dedup: how to recognise a pair seen before (same prompt, same chosen and same rejected
            image): ``"bytes"`` hashes the stored image bytes (exact, but reads every image
            once); ``"auto"`` uses the cheapest exact-enough identity - Pick-a-Pic's
            ``image_*_uid`` columns when present, the resolved file paths for JSONL/CSV, the
            image bytes otherwise; ``"none"`` keeps duplicates.
        max_caption_chars: skip (and count) captions longer than this; None: no limit.
    """

    def __init__(
        self,
        store: RowStore,
        schema: Schema,
        *,
        drop_ties: bool = True,
        dedup: DedupMode = "auto",
        max_caption_chars: int | None = None,
    ) -> None:
        if dedup not in ("auto", "bytes", "none"):
            raise ValueError(f"dedup must be 'auto', 'bytes' or 'none', not {dedup!r}")
        store.check_columns(schema.required)
        self.store = store
        self.schema = schema
        self.drop_ties = drop_ties
        self.dedup = dedup
        self.max_caption_chars = max_caption_chars
        self._report: SkipReport | None = None
        self._locations: np.ndarray | None = None
        self._swap: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.store.name

    def __repr__(self) -> str:
        scanned = self._locations is not None
        state = f"{len(self._locations)} pairs" if scanned else "not scanned"
        return f"PreferenceSource({self.schema.name}, {self.name!r}, {state})"

    # -- validation pass ---------------------------------------------------------------------
    @property
    def dedup_method(self) -> str:
        """The identity used for duplicates: ``ids``, ``paths``, ``bytes`` or ``none``."""
        if self.dedup != "auto":
            return self.dedup
        if self.schema.ids and all(c in self.store.columns for c in self.schema.ids):
            return "ids"
        return "paths" if self.store.images_in_memory else "bytes"

    def scan(self) -> SkipReport:
        """Validate the cheap fields, build the index of usable rows, return the skip counts.

        Reads the source once (later calls return the same report). Raises
        ``DataSourceError`` naming the source and the skip counts when no row is usable.
        """
        if self._report is None:
            self._report = self._scan()
        assert self._locations is not None
        if len(self._locations) == 0:  # raised on every call: such a source is never usable
            raise DataSourceError(
                f"no usable preference pairs in {self.name}: {self._report.summary()}"
            )
        return self._report

    def _scan(self) -> SkipReport:
        schema, method = self.schema, self.dedup_method
        read_images = method in ("bytes", "paths") or self.store.images_in_memory
        columns = [schema.prompt, *(schema.labels or ())]
        if method == "ids":
            columns += list(schema.ids or ())
        if read_images:
            columns += list(schema.images)

        report = SkipReport()
        for kind, n in self.store.preskipped().items():
            if kind not in FILE_KINDS:  # rows that never became rows; a file is not a row
                report.total_seen += n
            report.add(kind, n)
        seen: set[bytes] = set()
        locations: list[int] = []
        swaps: list[bool] = []
        for start, n_rows, batch in self.store.iter_batches(columns):
            report.total_seen += n_rows
            if batch is None:  # the store could not read this run of rows at all
                report.add(MALFORMED_ROW, n_rows)
                continue
            for j in range(n_rows):
                kind, swap, identity = self._check_row(batch, j, method, read_images)
                if kind is None and identity is not None:
                    if identity in seen:
                        kind = DUPLICATE_PAIR
                    else:
                        seen.add(identity)
                if kind is not None:
                    report.add(kind)
                    continue
                locations.append(start + j)
                swaps.append(swap)
        self._locations = np.asarray(locations, dtype=np.int64)
        self._swap = np.asarray(swaps, dtype=bool)
        return report

    def _check_row(
        self, batch: dict[str, list], j: int, method: str, read_images: bool
    ) -> tuple[str | None, bool, bytes | None]:
        """``(skip_kind or None, second_image_won, duplicate identity or None)`` of one row."""
        schema = self.schema
        prompt = batch[schema.prompt][j]
        if not isinstance(prompt, str) or not prompt.strip():
            return EMPTY_CAPTION, False, None
        if self.max_caption_chars is not None and len(prompt) > self.max_caption_chars:
            return OVERLONG_CAPTION, False, None
        swap = False
        if schema.labels and schema.classify:
            kind, swap = schema.classify(
                batch[schema.labels[0]][j], batch[schema.labels[1]][j], self.drop_ties
            )
            if kind is not None:
                return kind, False, None
        if read_images:
            for col in schema.images:
                if image_problem(batch[col][j], self.store.base_dir) is not None:
                    return UNREADABLE_IMAGE, False, None
        if method == "none":
            return None, swap, None
        if method == "ids":
            ids = [batch[c][j] for c in schema.ids or ()]
            if any(v is None or v == "" for v in ids):
                return None, swap, None  # no identity: cannot be recognised as a duplicate
            parts = [str(v).encode() for v in ids]
        elif method == "paths":
            parts = [_path_identity(batch[c][j], self.store.base_dir) for c in schema.images]
        else:
            digests = [image_digest(batch[c][j], self.store.base_dir) for c in schema.images]
            if any(d is None for d in digests):
                return UNREADABLE_IMAGE, False, None
            parts = [d for d in digests if d is not None]
        if swap:  # identity is (prompt, winner, loser): a reversed judgement is not a duplicate
            parts.reverse()
        h = hashlib.blake2b(prompt.encode("utf-8", "surrogatepass"), digest_size=16)
        for part in parts:
            h.update(b"\0" + part)
        return None, swap, h.digest()

    # -- access ------------------------------------------------------------------------------
    @property
    def report(self) -> SkipReport:
        """The validation report (runs ``scan()`` first if needed)."""
        return self.scan()

    def __len__(self) -> int:
        self.scan()
        assert self._locations is not None
        return len(self._locations)

    def _location(self, index: int) -> tuple[int, bool]:
        n = len(self)
        if index < 0:
            index += n
        if not 0 <= index < n:
            raise IndexError(f"pair {index} out of range ({n} pairs in {self.name})")
        assert self._locations is not None and self._swap is not None
        return int(self._locations[index]), bool(self._swap[index])

    def key(self, index: int) -> str:
        """The stable id of pair ``index`` (e.g. ``"shard.parquet:417"``), without reading it."""
        return self.store.key(self._location(index)[0])

    def get(self, index: int) -> PreferenceRecord:
        """Read and decode pair ``index``; raises ``RecordSkipped`` for an unreadable image."""
        location, swap = self._location(index)
        first_col, second_col = self.schema.images
        key = self.store.key(location)
        row = self.store.fetch(location, (self.schema.prompt, first_col, second_col))
        first = decode_image(row[first_col], key, self.store.base_dir)
        second = decode_image(row[second_col], key, self.store.base_dir)
        chosen, rejected = (second, first) if swap else (first, second)
        return PreferenceRecord(
            prompt=row[self.schema.prompt], chosen=chosen, rejected=rejected, key=key
        )

    def groups(self) -> np.ndarray:
        """Locality group of each pair (pairs of one parquet row group share a group)."""
        self.scan()
        assert self._locations is not None
        return self.store.groups(self._locations)


def _path_identity(value: Any, base_dir: Path | None) -> bytes:
    norm = normalize_image_value(value, base_dir)
    if isinstance(norm, Path):
        return os.path.abspath(norm).encode()
    return image_digest(value, base_dir) or b""
