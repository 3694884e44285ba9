"""The training data of a run, as the trainer needs it: from a dataset or from a cache.

``training_data(config, family)`` scans the data (a dataset with no usable pair stops here
with one line) or opens the latent/text cache (a stale cache stops here), before any model is
loaded. Unreadable images met while training are SUBSTITUTED by the next readable pair
(counted and reported, as every skipped row): batches keep their size, so no process ever
meets an empty batch and per-pair seeds do not depend on which pairs were bad.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from torch.utils.data import Dataset

from snpo.data import (
    DataSourceError,
    GroupedShuffleSampler,
    PairedTransform,
    PreferencePairDataset,
    SkippedItem,
    collate_pairs,
    load_preference_source,
)
from snpo.training.fingerprints import RESAMPLE, cache_fingerprint_for
from snpo.training.trainer import Callback


def is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def say(message: str) -> None:
    """Print on the main process only (a multi-process run would say it once per rank)."""
    if is_main_process():
        print(message, flush=True)


@dataclass
class TrainingData:
    """What the trainer reads: the dataset, how to batch and order it, and its report.

    ``null_text`` (a cache's stored null condition) means the backbone is loaded without
    encoders and told the null condition instead of computing it."""

    dataset: Dataset
    collate_fn: Callable | None = None
    sampler: Any = None  # None: the trainer's EpochShuffleSampler
    callbacks: list[Callback] = field(default_factory=list)
    stateful: list[Any] = field(default_factory=list)
    report: Callable[[], dict[str, Any]] | None = None
    null_text: Any = None
    unpaired: bool = False  # batches of labelled images (method kto: snpo.data.unpaired), not pairs

    @property
    def cached(self) -> bool:
        return self.null_text is not None


class FirstPairs(Dataset):
    """The first ``n`` pairs of a dataset (``max_train_samples``), keeping ``set_epoch``."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


class SkipCounter(Callback):
    """Counts the pairs skipped while training, on every process, and gathers them at the end
    so the model card reports all of them."""

    def __init__(self, dataset: PreferencePairDataset) -> None:
        self.dataset = dataset
        self.items: list[SkippedItem] = []

    def on_micro_batch(self, batch: dict[str, Any]) -> None:
        seen = {(i.kind, i.key) for i in self.items}
        for item in batch.get("skipped", ()):
            if (item.kind, item.key) not in seen:  # a bad pair met again (next epoch) counts once
                seen.add((item.kind, item.key))
                self.items.append(item)
                say(f"data: skipped {item.kind} at {item.key}: {item.detail}")

    # saved in checkpoints, so a resumed run still reports the pairs skipped before the kill
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": [[i.kind, i.key, i.detail] for i in self.items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = [SkippedItem(*entry) for entry in state.get("skipped", [])]

    def on_train_end(self, accelerator: Any) -> None:
        items = self.items
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            items = gather_object(items)
        self.dataset.report.record_skipped(items)
        say(f"data: after training: {self.dataset.report.summary()}")

    def report(self) -> dict[str, Any]:
        return {**self.dataset.report.as_dict(), "summary": self.dataset.report.summary()}


def scan_source(config: Any):
    """The dataset's preference source, scanned (one line and a stop when nothing is usable)."""
    try:
        source = load_preference_source(config.dataset_name, split=config.dataset_split,
                                        drop_ties=config.drop_ties, max_caption_chars=config.max_caption_chars)
        report = source.scan()  # DataSourceError (one line) when no pair is usable
    except DataSourceError as err:
        # name the setting to fix: the split when the split is what is missing
        field_name = "dataset_split" if "split" in str(err) else "dataset_name"
        raise DataSourceError(f"{field_name}: {err}") from None
    for path, reason in getattr(source.store, "unreadable_files", ()):
        say(f"data: skipped unreadable shard {path}: {reason}")
    say(f"data: {source.name}: {report.summary()}")
    return source


def cached_data(config: Any, family: str) -> TrainingData:
    from snpo.backbones import resolve_model_path
    from snpo.data.cache import CachedGroupSampler, collate_cached, open_cache

    model_path = resolve_model_path(config.model_name_or_path, revision=config.revision, variant=config.variant)
    dataset = open_cache(config.cache_dir, cache_fingerprint_for(config, family, model_path), seed=config.seed)
    summary = dataset.report.summary()
    say(f"data: cache {config.cache_dir}: {len(dataset)} pairs; {summary}")
    return TrainingData(
        dataset, collate_cached, CachedGroupSampler(dataset, seed=config.seed),  # the uncached order
        report=lambda: {**dataset.report.as_dict(), "summary": summary, "cache_dir": config.cache_dir},
        null_text=dataset.null_text,
    )


def dataset_data(config: Any) -> TrainingData:
    source = scan_source(config)
    transform = PairedTransform(config.resolution, center_crop=config.center_crop,
                                random_flip=config.random_flip, resample=RESAMPLE)
    pairs = PreferencePairDataset(source, transform, seed=config.seed, on_unreadable="substitute")
    sampler = GroupedShuffleSampler(source, seed=config.seed)  # row-group-local reads
    dataset: Dataset = pairs
    if config.max_train_samples is not None:
        dataset = FirstPairs(pairs, config.max_train_samples)
        sampler.groups = sampler.groups[: len(dataset)]  # the order is built from these only
    counter = SkipCounter(pairs)
    return TrainingData(dataset, collate_pairs, sampler, callbacks=[counter], stateful=[counter],
                        report=counter.report)


def training_data(config: Any, family: str) -> TrainingData:
    """From ``cache_dir`` when set (no encoder work while training), else from the dataset;
    labelled images instead of pairs for a method that trains on them (``kto``)."""
    from snpo.methods.kto import reads_unpaired_rows

    if reads_unpaired_rows(config.method):
        from snpo.training.unpaired import unpaired_data

        return unpaired_data(config, family)
    return cached_data(config, family) if config.cache_dir else dataset_data(config)


__all__ = ["FirstPairs", "SkipCounter", "TrainingData", "training_data"]
