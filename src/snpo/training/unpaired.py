"""The training data of a method that trains on labelled images (``kto``), as the trainer
needs it: from an unpaired dataset, from a paired one split into rows, from a latent cache of
pairs split the same way, or from pair data given to ``build_job`` (the toy's tensors).

As for pairs (``snpo.training.data``): the data is scanned before any model is loaded (a
dataset with no usable row stops here with one line), unreadable images met while training
are substituted by the next readable row and counted, and the order is a read-local shuffle
seeded by ``(seed, epoch)`` (the two rows of a split pair share their pair's locality group).
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import numpy as np

from snpo.data import DataSourceError, PairedTransform
from snpo.data.unpaired import (
    PairSplitSource,
    RowGroupSampler,
    SplitPairDataset,
    UnpairedDataset,
    collate_unpaired,
    load_unpaired_source,
)
from snpo.training.data import FirstPairs, SkipCounter, TrainingData, cached_data, say
from snpo.training.fingerprints import RESAMPLE


def scan_unpaired(config: Any):
    """The dataset's labelled rows, scanned (one line and a stop when nothing is usable)."""
    try:
        source = load_unpaired_source(config.dataset_name, split=config.dataset_split, drop_ties=config.drop_ties,
                                      max_caption_chars=config.max_caption_chars)
        report = source.scan()
    except DataSourceError as err:
        field_name = "dataset_split" if "split" in str(err) else "dataset_name"
        raise DataSourceError(f"{field_name}: {err}") from None
    for path, reason in getattr(source.store, "unreadable_files", ()):
        say(f"data: skipped unreadable shard {path}: {reason}")
    labels = source.labels()
    how = " (pairs split into rows: chosen 1, rejected 0)" if isinstance(source, PairSplitSource) else ""
    say(f"data: {source.name}: {report.summary()}{how}; {int(labels.sum())} desirable and "
        f"{int((~labels).sum())} undesirable images")
    return source


def unpaired_data(config: Any, family: str) -> TrainingData:
    """Labelled rows for ``config``: from the latent cache (its pairs split) or the dataset."""
    if config.cache_dir:
        return split_pairs_data(cached_data(config, family), seed=config.seed)
    source = scan_unpaired(config)
    transform = PairedTransform(config.resolution, center_crop=config.center_crop,
                                random_flip=config.random_flip, resample=RESAMPLE)
    rows = UnpairedDataset(source, transform, seed=config.seed, on_unreadable="substitute")
    sampler = RowGroupSampler(source.groups(), seed=config.seed)
    dataset: Any = rows
    if config.max_train_samples is not None:
        dataset = FirstPairs(rows, config.max_train_samples)
        sampler.groups = sampler.groups[: len(dataset)]
    counter = SkipCounter(rows)
    return TrainingData(dataset, collate_unpaired, sampler, callbacks=[counter], stateful=[counter],
                        report=counter.report, unpaired=True)


def split_pairs_data(data: TrainingData, *, seed: int = 0) -> TrainingData:
    """Pair data as labelled rows (row ``2i`` the chosen image, label 1; ``2i + 1`` the
    rejected one, label 0), keeping the pairs' locality groups, callbacks and report."""
    groups = getattr(data.sampler, "groups", None)
    sampler = RowGroupSampler(np.repeat(np.asarray(groups), 2), seed=seed) if groups is not None else None
    return replace(data, dataset=SplitPairDataset(data.dataset), collate_fn=collate_unpaired, sampler=sampler,
                   unpaired=True)


__all__ = ["scan_unpaired", "split_pairs_data", "unpaired_data"]
