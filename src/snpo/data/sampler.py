"""A shuffle that keeps reads local, for parquet sources read lazily.

Parquet cannot read one row of a row group: a uniformly shuffled order over Pick-a-Pic reads a
whole row group (~100 image pairs) per pair. ``GroupedShuffleSampler`` shuffles the order of
the row groups, then shuffles the pairs within windows of ``groups_per_window`` consecutive
(shuffled) groups. With ``cache_row_groups >= groups_per_window`` each row group is read about
once per epoch per DataLoader worker, and batches still mix pairs of several groups (shards
are written in collection order, so a group holds related prompts; wider windows mix more).

For sources with cheap random access (``datasets``, JSONL/CSV) every pair is in one group and
this is a plain full shuffle.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
from torch.utils.data import Sampler

from snpo.data.source import PreferenceSource


class GroupedShuffleSampler(Sampler[int]):
    """Indices of ``source`` in a shuffled, read-local order, reproducible from (seed, epoch).

    Args:
        source: the ``PreferenceSource`` (or a dataset with a ``source`` attribute).
        seed: the shuffle seed.
        groups_per_window: how many locality groups are mixed together.
    """

    def __init__(self, source: object, *, seed: int = 0, groups_per_window: int = 4) -> None:
        source = getattr(source, "source", source)
        if not isinstance(source, PreferenceSource):
            raise TypeError(f"expected a PreferenceSource, not {type(source).__name__}")
        self.groups = source.groups()
        self.seed = seed
        self.epoch = 0
        self.groups_per_window = max(1, int(groups_per_window))

    def set_epoch(self, epoch: int) -> None:
        """A new order per epoch (call before iterating)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.groups)

    def order(self) -> np.ndarray:
        """The full index order of the current epoch."""
        rng = np.random.default_rng([self.seed, self.epoch])
        group_ids, members = np.unique(self.groups, return_inverse=True)
        # indices sorted by group, so each group's members are one contiguous slice
        by_group = np.argsort(members, kind="stable")
        bounds = np.searchsorted(members[by_group], np.arange(len(group_ids) + 1))
        chunks = []
        group_order = rng.permutation(len(group_ids))
        for w in range(0, len(group_order), self.groups_per_window):
            window = group_order[w : w + self.groups_per_window]
            idx = np.concatenate([by_group[bounds[g] : bounds[g + 1]] for g in window])
            chunks.append(rng.permutation(idx))
        return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.int64)

    def __iter__(self) -> Iterator[int]:
        return iter(self.order().tolist())
