"""``load_preference_source``: one entry point for every supported kind of dataset.

Dispatch on what ``spec`` is:

* a ``PreferenceSource``: returned as is;
* a ``datasets.Dataset`` / ``DatasetDict`` object;
* a path to a ``.jsonl``/``.csv`` file (prompt, chosen, rejected image paths);
* a path to a ``.parquet`` file, a folder of parquet shards, or a glob of them;
* a ``save_to_disk`` folder (has ``state.json`` or ``dataset_dict.json``);
* a hub id (``owner/name``) that is not a local path: its parquet shards for ``split`` are
  fetched with ``huggingface_hub.snapshot_download``; a repo without parquet shards goes
  through ``datasets.load_dataset``.

Parquet and ``datasets`` sources may use either schema: Pick-a-Pic (``caption, jpg_0, jpg_1,
label_0, label_1``) or ``prompt, chosen, rejected``; the columns decide. Opening a source reads
only metadata; call ``scan()`` (cheap) before loading any model.
"""

from __future__ import annotations

import re
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from snpo.data.hf import HFDatasetStore, is_hf_dataset, load_from_disk, load_hub_dataset, pick_split
from snpo.data.local import LOCAL_SUFFIXES, LocalTableStore
from snpo.data.parquet import GLOB_CHARS, ParquetStore, list_parquet_files, split_of
from snpo.data.pickapic import PICKAPIC
from snpo.data.records import DataSourceError, one_line
from snpo.data.source import PAIRS, DedupMode, PreferenceSource, choose_schema
from snpo.data.store import RowStore

SCHEMAS = (PAIRS, PICKAPIC)  # PAIRS first: it wins when neither schema is better covered
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def load_preference_source(
    spec: str | Path | Any,
    *,
    split: str | None = None,
    drop_ties: bool = True,
    dedup: DedupMode = "auto",
    cache_row_groups: int = 2,
    max_caption_chars: int | None = None,
) -> PreferenceSource:
    """Open a preference dataset; see the module docstring for what ``spec`` may be.

    Args:
        spec: the dataset (path, glob, hub id, ``datasets`` object or ``PreferenceSource``).
        split: which split of a folder/hub repo/``DatasetDict`` (a folder holding shards of
            several splits requires it; hub repos and ``DatasetDict`` default to ``train``).
        drop_ties: skip tied Pick-a-Pic rows (default, as Diffusion-DPO) or keep them.
        dedup: duplicate detection, see ``PreferenceSource``.
        cache_row_groups: parquet row groups kept in memory per process.
        max_caption_chars: skip captions longer than this (``overlong_caption``); None: no limit.

    Raises:
        DataSourceError: one line naming the source (not found, missing columns, ...).
    """
    if isinstance(spec, PreferenceSource):
        return spec
    options = {"drop_ties": drop_ties, "dedup": dedup, "max_caption_chars": max_caption_chars}
    store = open_store(spec, split=split, cache_row_groups=cache_row_groups)
    if isinstance(store, LocalTableStore):
        return PreferenceSource(store, PAIRS, **options)
    return _source(store, **options)


def open_store(
    spec: str | Path | Any,
    *,
    split: str | None = None,
    cache_row_groups: int = 2,
    local_fields: tuple[str, ...] = PAIRS.required,
) -> RowStore:
    """The row store of ``spec`` (see the module docstring), before any schema is applied;
    ``local_fields`` are the columns a JSONL/CSV file is read for (the unpaired reader,
    ``snpo.data.unpaired``, asks for its own)."""
    if is_hf_dataset(spec):
        return HFDatasetStore(pick_split(spec, split, type(spec).__name__))
    if not isinstance(spec, str | Path):
        raise DataSourceError(f"cannot read a preference dataset from a {type(spec).__name__}")

    text = str(spec)
    path = Path(text).expanduser()
    if GLOB_CHARS & set(text):
        files = list_parquet_files(text, split)
        return ParquetStore(files, name=text, cache_row_groups=cache_row_groups)
    if path.is_dir():
        if (path / "state.json").exists() or (path / "dataset_dict.json").exists():
            return HFDatasetStore(load_from_disk(path, split), name=text)
        files = list_parquet_files(path, split)
        return ParquetStore(files, name=text, cache_row_groups=cache_row_groups)
    if path.is_file():
        suffix = path.suffix.lower()
        if suffix in LOCAL_SUFFIXES:
            return LocalTableStore(path, fields=local_fields)
        if suffix == ".parquet":
            named = split_of(path)  # a shard named for another split is not silently used
            if split is not None and named is not None and named != split:
                raise DataSourceError(f"no parquet shards of split '{split}' in {path} (it is a '{named}' shard)")
            return ParquetStore([path], cache_row_groups=cache_row_groups)
        raise DataSourceError(f"{path}: unsupported file type (use .parquet, .jsonl or .csv)")
    if HUB_ID.match(text) and path.suffix.lower() not in {*LOCAL_SUFFIXES, ".parquet"}:
        return _from_hub(text, split, cache_row_groups)
    raise DataSourceError(f"no such file or directory: {text}")


def _source(store: RowStore, **options: Any) -> PreferenceSource:
    return PreferenceSource(store, choose_schema(store.columns, SCHEMAS), **options)


def hub_patterns(split: str) -> list[str]:
    """``allow_patterns`` for the parquet shards of one split in the usual hub layouts."""
    return [
        f"{split}-*.parquet",
        f"*/{split}-*.parquet",
        f"{split}/*.parquet",
        f"*/{split}/*.parquet",
    ]


def _from_hub(repo_id: str, split: str | None, cache_row_groups: int) -> RowStore:
    """Fetch a hub dataset's parquet shards (lazily imported ``huggingface_hub``)."""
    split = split or "train"
    try:
        from huggingface_hub import snapshot_download

        folder = snapshot_download(repo_id, repo_type="dataset", allow_patterns=hub_patterns(split))
    except Exception as exc:  # offline, no such repo, gated, ...: all fatal, all one line
        raise DataSourceError(
            f"{repo_id} is not a local path and the hub download failed: "
            f"{type(exc).__name__}: {one_line(exc)}"
        ) from exc
    # the snapshot folder is shared by calls for other splits: keep only this split's files
    patterns = hub_patterns(split)
    files = sorted(
        p
        for p in Path(folder).rglob("*.parquet")
        if any(fnmatch(p.relative_to(folder).as_posix(), pat) for pat in patterns)
    )
    if files:
        return ParquetStore(files, name=repo_id, cache_row_groups=cache_row_groups)
    # no parquet shards (a script- or JSON-based repo): let datasets build it
    return HFDatasetStore(load_hub_dataset(repo_id, split), name=repo_id)
