"""Unpaired feedback: ``prompt, image, label`` rows (thumbs up / down), for Diffusion-KTO.

Two kinds of source give the same rows (:func:`load_unpaired_source` picks by the columns):

* :class:`UnpairedSource`: a table of ``prompt`` (or ``caption``), ``image`` and ``label``:
  JSONL/CSV with image paths (relative ones against the file's folder), parquet with image
  bytes or paths, a ``datasets`` dataset (an ``Image`` column or paths) with a boolean or 0/1
  label. Labels read as desirable: ``true``, ``1``, ``1.0``, ``"1"``, ``"true"``, ``"yes"``;
  undesirable: ``false``, ``0``, ``0.0``, ``"0"``, ``"false"``, ``"no"`` (case-insensitive);
  anything else is a ``bad_label`` row.
* :class:`PairSplitSource`: any PAIRED dataset snpo reads (Pick-a-Pic, ``prompt, chosen,
  rejected``), each pair split into two rows: the chosen image labelled 1, the rejected one 0.
  Ties, bad labels, duplicates and the rest are dropped and counted by the paired reader's
  own scan (its report counts pairs). Diffusion-KTO's own Pick-a-Pic file is per unique
  image (an image that won anywhere is desirable); the split keeps Pick-a-Pic's pairs as they
  are, so a KTO run sees exactly the images a DPO run sees.

Bad rows are skipped and counted per kind as the paired readers do (``snpo.data.skips``):
``empty_caption``, ``overlong_caption``, ``bad_label``, ``unreadable_image`` (a missing or
empty file at the scan; a corrupt image when decoded: the next readable row is substituted
and counted), ``malformed_row``. Duplicate rows are kept (there is no pair to recognise).

:class:`UnpairedDataset` decodes one image per row with the same crop and flip draw as the
paired dataset (``item_seed(seed, epoch, index)``; the split rows of a pair use the PAIR's
index, so both images get the pair's crop and flip, as in a paired or cached run).
:class:`SplitPairDataset` splits any dataset of pair items (the latent cache, the toy's
tensors) the same way, and :func:`collate_unpaired` batches either.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from snpo.data.dataset import SkippedItem, item_seed
from snpo.data.records import DataSourceError, RecordSkipped, decode_image, image_problem
from snpo.data.sampler import GroupedShuffleSampler
from snpo.data.skips import (
    BAD_LABEL,
    EMPTY_CAPTION,
    FILE_KINDS,
    MALFORMED_ROW,
    OVERLONG_CAPTION,
    UNREADABLE_IMAGE,
    SkipReport,
)
from snpo.data.source import PAIRS, PreferenceSource, choose_schema
from snpo.data.store import RowStore
from snpo.data.transforms import PairedTransform

TRUE_LABELS = frozenset({"1", "1.0", "true", "yes"})
FALSE_LABELS = frozenset({"0", "0.0", "false", "no"})
TENSOR_KEYS = ("label", "pixels", "original_size", "crop_top_left", "latents")


@dataclass(frozen=True)
class UnpairedSchema:
    """Which columns hold the prompt, the image and the binary label."""

    name: str
    prompt: str
    image: str
    label: str = "label"

    @property
    def required(self) -> tuple[str, ...]:
        return (self.prompt, self.image, self.label)


UNPAIRED = UnpairedSchema("prompt/image/label", "prompt", "image")
CAPTIONED = UnpairedSchema("caption/image/label", "caption", "image")
UNPAIRED_SCHEMAS = (UNPAIRED, CAPTIONED)
#: the columns a JSONL/CSV file is read for: either unpaired schema, or pairs to split
LOCAL_FIELDS = tuple(dict.fromkeys([*UNPAIRED.required, *CAPTIONED.required, *PAIRS.required]))


def parse_label(value: Any) -> bool | None:
    """True (desirable), False (undesirable) or None (not a binary label); see the module doc."""
    if isinstance(value, bool | np.bool_):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return bool(value) if int(value) in (0, 1) else None
    if isinstance(value, numbers.Real):
        value = float(value)
        return bool(value) if math.isfinite(value) and value in (0.0, 1.0) else None
    if isinstance(value, str):
        text = value.strip().lower()
        if text in TRUE_LABELS:
            return True
        if text in FALSE_LABELS:
            return False
    return None


@dataclass(frozen=True)
class UnpairedRecord:
    """One labelled image: the prompt, the image, True when desirable, and a stable id."""

    prompt: str
    image: Image.Image
    label: bool
    key: str


class UnpairedSource:
    """Validated ``prompt, image, label`` rows from one store (scan, then get; as
    ``PreferenceSource``: a useless dataset fails before any model is loaded)."""

    def __init__(self, store: RowStore, schema: UnpairedSchema, *, max_caption_chars: int | None = None) -> None:
        store.check_columns(schema.required)
        self.store, self.schema, self.max_caption_chars = store, schema, max_caption_chars
        self._report: SkipReport | None = None
        self._locations: np.ndarray | None = None
        self._labels: np.ndarray | None = None

    @property
    def name(self) -> str:
        return self.store.name

    def __repr__(self) -> str:
        return f"UnpairedSource({self.schema.name}, {self.name!r})"

    def scan(self) -> SkipReport:
        """Validate captions, labels (and image paths when cheap); raises ``DataSourceError``
        naming the source and the counts when no row is usable."""
        if self._report is None:
            self._report = self._scan()
        assert self._locations is not None
        if len(self._locations) == 0:
            raise DataSourceError(f"no usable labelled images in {self.name}: {self._report.summary()}")
        return self._report

    def _scan(self) -> SkipReport:
        schema, store = self.schema, self.store
        columns = [schema.prompt, schema.label] + ([schema.image] if store.images_in_memory else [])
        report = SkipReport(unit="rows")
        for kind, n in store.preskipped().items():
            if kind not in FILE_KINDS:
                report.total_seen += n
            report.add(kind, n)
        locations: list[int] = []
        labels: list[bool] = []
        for start, n_rows, batch in store.iter_batches(columns):
            report.total_seen += n_rows
            if batch is None:
                report.add(MALFORMED_ROW, n_rows)
                continue
            for j in range(n_rows):
                kind, label = self._check_row(batch, j)
                if kind is not None:
                    report.add(kind)
                    continue
                locations.append(start + j)
                labels.append(bool(label))
        self._locations = np.asarray(locations, dtype=np.int64)
        self._labels = np.asarray(labels, dtype=bool)
        return report

    def _check_row(self, batch: dict[str, list], j: int) -> tuple[str | None, bool | None]:
        schema = self.schema
        prompt = batch[schema.prompt][j]
        if not isinstance(prompt, str) or not prompt.strip():
            return EMPTY_CAPTION, None
        if self.max_caption_chars is not None and len(prompt) > self.max_caption_chars:
            return OVERLONG_CAPTION, None
        label = parse_label(batch[schema.label][j])
        if label is None:
            return BAD_LABEL, None
        if schema.image in batch and image_problem(batch[schema.image][j], self.store.base_dir) is not None:
            return UNREADABLE_IMAGE, None
        return None, label

    @property
    def report(self) -> SkipReport:
        return self.scan()

    def __len__(self) -> int:
        self.scan()
        assert self._locations is not None
        return len(self._locations)

    def _location(self, index: int) -> int:
        n = len(self)
        if not 0 <= index < n:
            raise IndexError(f"row {index} out of range ({n} rows in {self.name})")
        assert self._locations is not None
        return int(self._locations[index])

    def labels(self) -> np.ndarray:
        """True (desirable) or False per usable row."""
        self.scan()
        assert self._labels is not None
        return self._labels

    def key(self, index: int) -> str:
        return self.store.key(self._location(index))

    def draw_index(self, index: int) -> int:
        """The index that seeds the row's crop and flip."""
        return index

    def get(self, index: int) -> UnpairedRecord:
        """Read and decode row ``index``; raises ``RecordSkipped`` for an unreadable image."""
        location = self._location(index)
        key = self.store.key(location)
        schema = self.schema
        row = self.store.fetch(location, (schema.prompt, schema.image, schema.label))
        image = decode_image(row[schema.image], key, self.store.base_dir)
        return UnpairedRecord(row[schema.prompt], image, bool(parse_label(row[schema.label])), key)

    def groups(self) -> np.ndarray:
        self.scan()
        assert self._locations is not None
        return self.store.groups(self._locations)


class PairSplitSource:
    """A paired source as unpaired rows: row ``2i`` is pair ``i``'s chosen image (label 1),
    row ``2i + 1`` its rejected image (label 0). Decodes only the image a row needs."""

    def __init__(self, pairs: PreferenceSource) -> None:
        self.pairs = pairs
        self.store = pairs.store
        self.schema = pairs.schema

    @property
    def name(self) -> str:
        return self.pairs.name

    def __repr__(self) -> str:
        return f"PairSplitSource({self.pairs!r})"

    def scan(self) -> SkipReport:
        """The paired reader's scan (counted in pairs; each kept pair gives two rows)."""
        return self.pairs.scan()

    @property
    def report(self) -> SkipReport:
        return self.scan()

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def labels(self) -> np.ndarray:
        return np.tile(np.array([True, False]), len(self.pairs))

    def key(self, index: int) -> str:
        pair, side = divmod(index, 2)
        return f"{self.pairs.key(pair)}:{'rejected' if side else 'chosen'}"

    def draw_index(self, index: int) -> int:
        return index // 2  # the pair's crop and flip, as a paired or cached run draws them

    def get(self, index: int) -> UnpairedRecord:
        if not 0 <= index < len(self):
            raise IndexError(f"row {index} out of range ({len(self)} rows in {self.name})")
        pair, side = divmod(index, 2)
        location, swap = self.pairs._location(pair)  # (row, second image won)
        first, second = self.schema.images
        chosen, rejected = (second, first) if swap else (first, second)
        column = rejected if side else chosen
        key = self.store.key(location)
        row = self.store.fetch(location, (self.schema.prompt, column))
        image = decode_image(row[column], key, self.store.base_dir)
        return UnpairedRecord(row[self.schema.prompt], image, not side, f"{key}:{'rejected' if side else 'chosen'}")

    def groups(self) -> np.ndarray:
        return np.repeat(self.pairs.groups(), 2)


def load_unpaired_source(
    spec: str | Path | Any,
    *,
    split: str | None = None,
    drop_ties: bool = True,
    max_caption_chars: int | None = None,
    cache_row_groups: int = 2,
) -> UnpairedSource | PairSplitSource:
    """Unpaired rows from ``spec`` (any path, glob, hub id or ``datasets`` object
    ``load_preference_source`` reads): its own ``prompt``/``caption``, ``image``, ``label``
    columns, or pairs split in two (see the module docstring)."""
    from snpo.data.load import SCHEMAS, open_store

    if isinstance(spec, UnpairedSource | PairSplitSource):
        return spec
    if isinstance(spec, PreferenceSource):
        return PairSplitSource(spec)
    store = open_store(spec, split=split, cache_row_groups=cache_row_groups, local_fields=LOCAL_FIELDS)
    present = set(store.columns)
    for schema in UNPAIRED_SCHEMAS:
        if set(schema.required) <= present:
            return UnpairedSource(store, schema, max_caption_chars=max_caption_chars)
    for schema in SCHEMAS:
        if set(schema.required) <= present:
            pairs = PreferenceSource(store, choose_schema(store.columns, SCHEMAS), drop_ties=drop_ties,
                                     max_caption_chars=max_caption_chars)
            return PairSplitSource(pairs)
    raise DataSourceError(
        f"missing_column: {store.name} has neither unpaired feedback columns (prompt or caption, image, "
        f"label) nor preference pairs to split (prompt, chosen, rejected; or Pick-a-Pic's caption, jpg_0, "
        f"jpg_1, label_0, label_1) (has: {', '.join(store.columns) or 'none'})"
    )


# ---- datasets --------------------------------------------------------------------------
class UnpairedDataset(Dataset):
    """Labelled images as tensors; unreadable ones skipped or substituted and counted, as
    ``PreferencePairDataset`` does (see its module docstring)."""

    def __init__(
        self,
        source: UnpairedSource | PairSplitSource,
        transform: PairedTransform,
        *,
        seed: int = 0,
        on_unreadable: Literal["skip", "substitute"] = "substitute",
        max_substitutes: int = 32,
    ) -> None:
        if on_unreadable not in ("skip", "substitute"):
            raise ValueError(f"on_unreadable must be 'skip' or 'substitute', not {on_unreadable!r}")
        self.source, self.transform, self.seed, self.epoch = source, transform, seed, 0
        self.on_unreadable, self.max_substitutes = on_unreadable, max_substitutes
        self.report: SkipReport = source.scan().copy()

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> dict[str, Any]:
        record = self.source.get(index)
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, self.source.draw_index(index)))
        u_top, u_left, flip = self.transform.sample(generator)
        pixels, original_size, crop = self.transform.apply(record.image, u_top, u_left, flip)
        return {"prompt": record.prompt, "key": record.key, "label": torch.tensor(record.label),
                "pixels": pixels, "original_size": torch.tensor(original_size, dtype=torch.long),
                "crop_top_left": torch.tensor(crop, dtype=torch.long)}

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedItem:
        try:
            return self._load(index)
        except RecordSkipped as exc:
            first = self._skip(exc)
        if self.on_unreadable == "skip":
            return first
        skipped, n = [first], len(self)
        for step in range(1, min(self.max_substitutes, n - 1) + 1):
            try:
                item = self._load((index + step) % n)
            except RecordSkipped as exc:
                skipped.append(self._skip(exc))
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(f"rows {index}..{index + len(skipped) - 1} of {self.source.name} are all "
                           f"unreadable; {self.report.summary()}")

    def _skip(self, exc: RecordSkipped) -> SkippedItem:
        self.report.add(exc.kind, key=exc.key)
        return SkippedItem(exc.kind, exc.key, exc.detail)


class SplitPairDataset(Dataset):
    """Any dataset of pair items (``chosen_*``/``rejected_*`` entries: pixels, or the cache's
    latents and ``cond_chosen``/``cond_rejected``) as labelled rows: ``2i`` chosen, ``2i + 1``
    rejected. Reads the pair for each of its rows (cheap for tensors in memory or on disk)."""

    def __init__(self, pairs: Dataset) -> None:
        self.pairs = pairs

    def __len__(self) -> int:
        return 2 * len(self.pairs)

    def set_epoch(self, epoch: int) -> None:
        if hasattr(self.pairs, "set_epoch"):
            self.pairs.set_epoch(epoch)

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedItem:
        if not 0 <= index < len(self):
            raise IndexError(index)
        pair, side_index = divmod(index, 2)
        item = self.pairs[pair]
        if isinstance(item, SkippedItem):
            return item
        side = "rejected" if side_index else "chosen"
        out: dict[str, Any] = {"prompt": item["prompt"], "key": f"{item.get('key', pair)}:{side}",
                               "label": torch.tensor(not side_index)}
        for name, value in item.items():
            if name.startswith(side + "_"):
                out[name[len(side) + 1:]] = value
        if f"cond_{side}" in item:
            out["cond"] = item[f"cond_{side}"]
        if item.get("skipped") and not side_index:
            out["skipped"] = item["skipped"]  # counted once, with the chosen row
        return out


def collate_unpaired(items: Sequence[dict[str, Any] | SkippedItem | None]) -> dict[str, Any]:
    """Stack labelled rows, dropping skipped ones: ``prompt``, ``key``, ``size``, ``skipped``,
    ``label`` (bool), and ``pixels`` (+ ``original_size``, ``crop_top_left``) or the cache's
    ``latents`` and ``cond``."""
    kept: list[dict[str, Any]] = []
    skipped: list[SkippedItem] = []
    for item in items:
        if isinstance(item, SkippedItem):
            skipped.append(item)
        elif item is not None:
            kept.append(item)
            skipped.extend(item.get("skipped", ()))
    batch: dict[str, Any] = {"prompt": [i["prompt"] for i in kept], "key": [i.get("key", "") for i in kept],
                             "size": len(kept), "skipped": skipped}
    if kept:
        for name in TENSOR_KEYS:
            if name in kept[0]:
                batch[name] = torch.stack([torch.as_tensor(i[name]) for i in kept])
        if "cond" in kept[0]:
            batch["cond"] = {k: torch.stack([i["cond"][k] for i in kept]) for k in kept[0]["cond"]}
    return batch


class RowGroupSampler(GroupedShuffleSampler):
    """``GroupedShuffleSampler``'s read-local shuffle over explicit locality groups (one per
    row; the rows of a split pair share their pair's group)."""

    def __init__(self, groups: np.ndarray, *, seed: int = 0, groups_per_window: int = 4) -> None:
        self.groups = np.asarray(groups)
        self.seed, self.epoch = seed, 0
        self.groups_per_window = max(1, int(groups_per_window))


__all__ = [
    "CAPTIONED",
    "UNPAIRED",
    "PairSplitSource",
    "RowGroupSampler",
    "SplitPairDataset",
    "UnpairedDataset",
    "UnpairedRecord",
    "UnpairedSchema",
    "UnpairedSource",
    "collate_unpaired",
    "load_unpaired_source",
    "parse_label",
]
