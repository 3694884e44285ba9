"""Counting of skipped preference records, per kind of problem.

A large preference dataset always has some bad rows; one of them must never stop a run. Every
row that is not used is counted under exactly one *kind* (the first check it fails), and the
counts are reported as a one-line summary.

Two ways of counting coexist in one report:

* plain counts (``add(kind)``) for the cheap validation pass (``PreferenceSource.scan``), which
  sees each row exactly once;
* keyed counts (``add(kind, key=...)``) for problems found only while decoding images in the
  training loop, where the same bad row comes back every epoch and may be seen by several
  DataLoader workers: a (kind, key) pair is counted once however often it is reported.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from typing import Any

# Kinds of skipped rows. ``tie`` is not an error: ties carry no preference and are dropped by
# default, as in the original Diffusion-DPO code.
MISSING_COLUMN = "missing_column"
EMPTY_CAPTION = "empty_caption"
OVERLONG_CAPTION = "overlong_caption"
BAD_LABEL = "bad_label"
TIE = "tie"
UNREADABLE_IMAGE = "unreadable_image"
DUPLICATE_PAIR = "duplicate_pair"
MALFORMED_ROW = "malformed_row"
# A whole file that cannot be read (a zero-byte or corrupt parquet shard). Counted in files,
# not rows: its rows were never seen, so it changes neither ``total_seen`` nor ``kept``.
UNREADABLE_SHARD = "unreadable_shard"

# Canonical order of kinds in summaries, so that logs of two runs line up.
KIND_ORDER = (
    TIE,
    DUPLICATE_PAIR,
    EMPTY_CAPTION,
    OVERLONG_CAPTION,
    BAD_LABEL,
    UNREADABLE_IMAGE,
    MALFORMED_ROW,
    MISSING_COLUMN,
    UNREADABLE_SHARD,
)
NON_ERROR_KINDS = frozenset({TIE})
FILE_KINDS = frozenset({UNREADABLE_SHARD})


class SkipReport:
    """Counts of skipped rows per kind, plus how many rows were seen.

    ``kept`` is derived (``total_seen`` minus all skips), so adding a decode-time skip to a
    report that came from ``scan()`` lowers ``kept`` by one, as it should.
    """

    def __init__(self, total_seen: int = 0, counts: Mapping[str, int] | None = None, *,
                 unit: str = "pairs") -> None:
        self.total_seen = int(total_seen)
        self.unit = unit  # what a row is, in summaries: pairs, or rows of unpaired feedback
        self._plain: Counter[str] = Counter(dict(counts or {}))
        self._keyed: set[tuple[str, str]] = set()

    # -- recording -------------------------------------------------------------------------
    def add(self, kind: str, n: int = 1, *, key: str | None = None) -> bool:
        """Count ``n`` skipped rows of ``kind``; with ``key``, count that row only once.

        Returns True when the count changed (False for an already-counted keyed row).
        """
        if key is None:
            self._plain[kind] += n
            return True
        if (kind, key) in self._keyed:
            return False
        self._keyed.add((kind, key))
        return True

    def record_batch(self, batch: Mapping[str, Any]) -> int:
        """Count the skipped items a ``collate_pairs`` batch carries; returns how many are new.

        This is how decode-time skips found inside DataLoader worker processes reach the main
        process: they travel with the batch.
        """
        return self.record_skipped(batch.get("skipped", ()))

    def record_skipped(self, skipped: Iterable[Any]) -> int:
        """Count ``SkippedItem``-like objects (with ``kind`` and ``key``) once per key."""
        return sum(self.add(item.kind, key=item.key) for item in skipped)

    def merge(self, other: SkipReport) -> SkipReport:
        """Add ``other``'s rows and skips to this report (in place) and return it."""
        self.total_seen += other.total_seen
        self._plain.update(other._plain)
        self._keyed |= other._keyed
        return self

    def __iadd__(self, other: SkipReport) -> SkipReport:
        return self.merge(other)

    def copy(self) -> SkipReport:
        """An independent copy."""
        return SkipReport(unit=self.unit).merge(self)

    # -- reading ---------------------------------------------------------------------------
    @property
    def counts(self) -> dict[str, int]:
        """Skipped rows per kind (kinds with zero rows left out), in canonical order."""
        total: Counter[str] = Counter(self._plain)
        total.update(kind for kind, _ in self._keyed)
        known = [k for k in KIND_ORDER if total.get(k)]
        extra = sorted(k for k in total if k not in KIND_ORDER and total[k])
        return {k: total[k] for k in known + extra}

    @property
    def skipped(self) -> int:
        """All skipped rows, ties included (unreadable files are not rows)."""
        return sum(n for k, n in self.counts.items() if k not in FILE_KINDS)

    @property
    def errors(self) -> int:
        """Skipped rows that point to a data problem (everything but ties)."""
        return sum(n for k, n in self.counts.items() if k not in NON_ERROR_KINDS)

    @property
    def kept(self) -> int:
        """Rows seen and not skipped."""
        return self.total_seen - self.skipped

    def __getitem__(self, kind: str) -> int:
        return self.counts.get(kind, 0)

    def summary(self) -> str:
        """One line, e.g. ``kept 812 of 1000 pairs; skipped: tie 150, empty_caption 35``."""
        parts = ", ".join(f"{k} {n}" for k, n in self.counts.items()) or "none"
        return f"kept {self.kept} of {self.total_seen} {self.unit}; skipped: {parts}"

    def as_dict(self) -> dict[str, Any]:
        """Plain-data form for logs and JSON: totals and counts per kind."""
        return {
            "total_seen": self.total_seen,
            "kept": self.kept,
            "skipped": self.skipped,
            "errors": self.errors,
            "counts": self.counts,
        }

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SkipReport):
            return NotImplemented
        return self.as_dict() == other.as_dict()

    def __repr__(self) -> str:
        return f"SkipReport({self.summary()})"
