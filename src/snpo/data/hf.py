"""Hugging Face ``datasets`` objects as a row store (the optional ``snpo[hub]`` extra).

``datasets`` is imported only when one of these is used, so the rest of the data layer works
without it. Rows are read in Arrow format, which never decodes the ``Image`` columns: images
reach ``decode_image`` as ``{"bytes", "path"}`` dicts, so a corrupt one is skipped and
counted instead of raising inside ``datasets``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from snpo.data.records import DataSourceError, one_line
from snpo.data.store import RowStore

BATCH_ROWS = 1000


def import_datasets() -> Any:
    """``import datasets``, or a one-line error saying which extra provides it."""
    try:
        import datasets
    except ImportError as exc:
        raise DataSourceError(
            "reading a Hugging Face dataset needs the 'datasets' package: pip install 'snpo[hub]'"
        ) from exc
    return datasets


def is_hf_dataset(obj: object) -> bool:
    """True for a ``datasets.Dataset`` or ``DatasetDict``, checked without importing datasets."""
    return type(obj).__module__.startswith("datasets.") and hasattr(obj, "column_names")


def pick_split(obj: Any, split: str | None, name: str) -> Any:
    """The ``Dataset`` of ``split`` in a ``DatasetDict`` (``train`` when not given)."""
    if isinstance(obj, dict):  # DatasetDict is a dict subclass; a Dataset is not
        wanted = split or "train"
        if wanted not in obj:
            raise DataSourceError(
                f"{name} has no split '{wanted}' (splits: {', '.join(obj) or 'none'}): pass split="
            )
        obj = obj[wanted]
    if not hasattr(obj, "num_rows") or type(obj).__name__.startswith("Iterable"):
        # streaming datasets have no random access, which shuffling and resuming need
        raise DataSourceError(
            f"{name}: a {type(obj).__name__} cannot be read (streaming datasets are not "
            "supported; load it without streaming=True, or pass its parquet shards)"
        )
    return obj


def load_from_disk(path: Path, split: str | None) -> Any:
    """A ``save_to_disk`` folder (a ``Dataset`` or a ``DatasetDict``), memory-mapped."""
    datasets = import_datasets()
    try:
        obj = datasets.load_from_disk(str(path))
    except Exception as exc:  # datasets raises FileNotFoundError, ValueError, ...
        raise DataSourceError(f"cannot load dataset folder {path}: {one_line(exc)}") from exc
    return pick_split(obj, split, str(path))


def load_hub_dataset(repo_id: str, split: str | None) -> Any:
    """``datasets.load_dataset(repo_id, split=...)``, with a one-line error when it fails."""
    datasets = import_datasets()
    try:
        return datasets.load_dataset(repo_id, split=split or "train")
    except Exception as exc:  # offline, unknown repo, unknown split, ...
        raise DataSourceError(
            f"cannot load hub dataset {repo_id}: {type(exc).__name__}: {one_line(exc)}"
        ) from exc


class HFDatasetStore(RowStore):
    """Rows of a ``datasets.Dataset`` (memory-mapped or in memory), read in Arrow format."""

    def __init__(self, dataset: Any, *, name: str | None = None) -> None:
        self.dataset = dataset
        self.name = name or f"Dataset({dataset.num_rows} rows)"
        # Relative image paths inside a save_to_disk folder are relative to that folder.
        files = getattr(dataset, "cache_files", None) or []
        self.base_dir = Path(files[0]["filename"]).parent if files else None
        self._arrow = dataset.with_format("arrow")
        self._views: dict[tuple[str, ...], Any] = {}

    @property
    def num_rows(self) -> int:
        return int(self.dataset.num_rows)

    @property
    def columns(self) -> list[str]:
        return list(self.dataset.column_names)

    def _view(self, columns: Sequence[str]) -> Any:
        cols = tuple(columns)
        if cols not in self._views:
            self._views[cols] = self._arrow.select_columns(list(cols))
        return self._views[cols]

    def iter_batches(
        self, columns: Sequence[str]
    ) -> Iterator[tuple[int, int, dict[str, list] | None]]:
        start = 0
        for table in self._view(columns).iter(batch_size=BATCH_ROWS):
            yield start, table.num_rows, {c: table.column(c).to_pylist() for c in columns}
            start += table.num_rows

    def fetch(self, location: int, columns: Sequence[str]) -> dict[str, Any]:
        table = self._view(columns)[int(location)]
        return {c: table.column(c)[0].as_py() for c in columns}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_views"] = {}  # rebuilt on demand in the worker
        return state
