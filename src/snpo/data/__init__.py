"""Preference-pair data: sources, validation with skip counts, paired transforms, datasets.

Typical use (the trainer validates the data before loading any model)::

    source = load_preference_source("path/to/pickapic_v2/data", split="train")
    print(source.scan().summary())      # cheap; raises DataSourceError if nothing is usable
    dataset = PreferencePairDataset(source, PairedTransform(512, random_flip=True), seed=0)
    loader = DataLoader(dataset, batch_size=8, collate_fn=collate_pairs, num_workers=4,
                        sampler=GroupedShuffleSampler(source, seed=0))
    for batch in loader:
        dataset.report.record_batch(batch)  # decode-time skips, from any worker
        if batch["size"] == 0:
            continue
        ...
"""

from snpo.data.dataset import PreferencePairDataset, SkippedItem, collate_pairs
from snpo.data.load import load_preference_source
from snpo.data.pickapic import PICKAPIC
from snpo.data.records import DataSourceError, PreferenceRecord, RecordSkipped
from snpo.data.sampler import GroupedShuffleSampler
from snpo.data.skips import SkipReport
from snpo.data.source import PAIRS, PreferenceSource, Schema
from snpo.data.transforms import PairedTransform
from snpo.data.unpaired import UnpairedDataset, collate_unpaired, load_unpaired_source

__all__ = [
    "PAIRS",
    "PICKAPIC",
    "DataSourceError",
    "GroupedShuffleSampler",
    "PairedTransform",
    "PreferencePairDataset",
    "PreferenceRecord",
    "PreferenceSource",
    "RecordSkipped",
    "Schema",
    "SkipReport",
    "SkippedItem",
    "UnpairedDataset",
    "collate_pairs",
    "collate_unpaired",
    "load_preference_source",
    "load_unpaired_source",
]
