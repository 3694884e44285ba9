"""Local JSONL or CSV files of ``prompt, chosen, rejected`` with image paths.

Relative image paths are resolved against the folder of the JSONL/CSV file (not the working
directory), so a dataset folder can be moved or read from anywhere. Only the text is loaded
in memory; images are opened when a pair is read.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from snpo.data.records import DataSourceError, one_line
from snpo.data.skips import MALFORMED_ROW
from snpo.data.store import RowStore

LOCAL_SUFFIXES = {".jsonl": "jsonl", ".ndjson": "jsonl", ".csv": "csv"}


class LocalTableStore(RowStore):
    """Rows of a JSONL or CSV file, held in memory as columns of strings."""

    images_in_memory = True  # image values are paths: checking them needs only a stat()

    def __init__(self, path: str | Path, *, fields: Sequence[str]) -> None:
        self.path = Path(path)
        self.name = str(self.path)
        self.base_dir = self.path.parent
        fmt = LOCAL_SUFFIXES.get(self.path.suffix.lower())
        if fmt is None:
            raise DataSourceError(f"{self.path}: expected a .jsonl or .csv file")
        self._malformed = 0
        self._line_numbers: list[int] = []
        try:
            if fmt == "jsonl":
                rows, present = self._read_jsonl(fields)
            else:
                rows, present = self._read_csv()
        except (OSError, UnicodeDecodeError, csv.Error) as exc:
            raise DataSourceError(f"cannot read {self.path}: {one_line(exc)}") from exc
        self._present = present
        self._columns = {f: [row.get(f) for row in rows] for f in fields if f in present}

    def _read_jsonl(self, fields: Sequence[str]) -> tuple[list[dict[str, Any]], list[str]]:
        rows: list[dict[str, Any]] = []
        present: dict[str, None] = {}  # ordered set
        with self.path.open(encoding="utf-8") as fh:
            for line_no, line in enumerate(fh, start=1):
                if not line.strip():
                    continue  # blank lines are not rows
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    row = None
                if not isinstance(row, dict):
                    self._malformed += 1
                    continue
                present.update(dict.fromkeys(row))
                # keep only what is needed: a JSONL with extra fields must not fill memory
                rows.append({f: row.get(f) for f in fields})
                self._line_numbers.append(line_no)
        return rows, list(present)

    def _read_csv(self) -> tuple[list[dict[str, Any]], list[str]]:
        with self.path.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh)
            rows = list(reader)
            present = [f for f in reader.fieldnames or [] if f is not None]
        # data rows start on line 2 (after the header); good enough for a stable key
        self._line_numbers = list(range(2, len(rows) + 2))
        return rows, present

    @property
    def num_rows(self) -> int:
        return len(self._line_numbers)

    @property
    def columns(self) -> list[str]:
        return self._present

    def preskipped(self) -> dict[str, int]:
        return {MALFORMED_ROW: self._malformed} if self._malformed else {}

    def iter_batches(
        self, columns: Sequence[str]
    ) -> Iterator[tuple[int, int, dict[str, list] | None]]:
        yield 0, self.num_rows, {c: self._columns[c] for c in columns}

    def fetch(self, location: int, columns: Sequence[str]) -> dict[str, Any]:
        return {c: self._columns[c][location] for c in columns}

    def key(self, location: int) -> str:
        # the line number, so that a skipped row can be found with an editor
        return f"{self.path.name}:{self._line_numbers[location]}"
