"""The torch ``Dataset`` of preference pairs, and its collate function.

Images are decoded lazily, in ``__getitem__``, because a corrupt image can only be found by
decoding it and decoding ~1M pairs up front is out of the question. What happens to an
unreadable pair depends on ``on_unreadable``:

* ``"skip"`` (default): ``__getitem__`` returns a ``SkippedItem(kind, key, detail)`` instead
  of a dict; ``collate_pairs`` drops it, so that batch is smaller (possibly empty: check
  ``batch["size"]``).
* ``"substitute"``: ``__getitem__`` tries the next pairs (``i+1, i+2, ...``, deterministic)
  and returns the first readable one, so batches keep their size.

Either way the skipped pair is counted, twice over on purpose:

* in ``dataset.report`` directly, which works in the process that decodes - the main process
  with ``num_workers=0``; a worker process only updates its own copy, which is lost;
* in ``batch["skipped"]``: the ``SkippedItem`` objects travel with the batch from any worker to
  the main process. ``dataset.report.record_batch(batch)`` in the training loop therefore
  gives exact counts with any ``num_workers``. Counts are keyed by the pair's key, so a bad
  pair met again in a later epoch, or recorded both ways, is counted once.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch.utils.data import Dataset

from snpo.data.records import RecordSkipped
from snpo.data.skips import SkipReport
from snpo.data.source import PreferenceSource
from snpo.data.transforms import PairedTransform

TENSOR_KEYS = (
    "chosen_pixels",
    "rejected_pixels",
    "chosen_original_size",
    "chosen_crop_top_left",
    "rejected_original_size",
    "rejected_crop_top_left",
)


@dataclass(frozen=True)
class SkippedItem:
    """Stands in for a pair that could not be read (picklable, so it crosses workers)."""

    kind: str
    key: str
    detail: str = ""


def item_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed from ``(seed, epoch, index)``: the same item gets the same crop and flip
    in any process and after any resume, and neighbouring items get unrelated ones."""
    digest = hashlib.blake2b(f"{seed}:{epoch}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


class PreferencePairDataset(Dataset):
    """Preference pairs as tensors: see the module docstring for unreadable images.

    Args:
        source: a ``PreferenceSource`` (scanned here if it was not yet).
        transform: the paired transform.
        seed: seeds each item's random crop/flip together with ``epoch`` and the index.
        on_unreadable: ``"skip"`` or ``"substitute"``.
        max_substitutes: how many following pairs ``"substitute"`` tries before giving up.
    """

    def __init__(
        self,
        source: PreferenceSource,
        transform: PairedTransform,
        *,
        seed: int = 0,
        on_unreadable: Literal["skip", "substitute"] = "skip",
        max_substitutes: int = 32,
    ) -> None:
        if on_unreadable not in ("skip", "substitute"):
            raise ValueError(f"on_unreadable must be 'skip' or 'substitute', not {on_unreadable!r}")
        self.source = source
        self.transform = transform
        self.seed = seed
        self.epoch = 0
        self.on_unreadable = on_unreadable
        self.max_substitutes = max_substitutes
        # Starts as the validation report so that `kept` stays meaningful; decode-time skips
        # are added to it (keyed, so each bad pair counts once).
        self.report: SkipReport = source.scan().copy()

    def set_epoch(self, epoch: int) -> None:
        """Vary the random crops/flips per epoch. Call it before creating the epoch's iterator:
        workers copy the dataset when the iterator starts (so not with persistent_workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.source)

    def _load(self, index: int) -> dict[str, Any]:
        record = self.source.get(index)
        generator = torch.Generator().manual_seed(item_seed(self.seed, self.epoch, index))
        item: dict[str, Any] = {"prompt": record.prompt, "key": record.key}
        item.update(self.transform(record.chosen, record.rejected, generator))
        return item

    def __getitem__(self, index: int) -> dict[str, Any] | SkippedItem:
        try:
            return self._load(index)
        except RecordSkipped as exc:
            first = self._skip(exc)
        if self.on_unreadable == "skip":
            return first
        skipped = [first]
        n = len(self)
        for step in range(1, min(self.max_substitutes, n - 1) + 1):
            try:
                item = self._load((index + step) % n)
            except RecordSkipped as exc:
                skipped.append(self._skip(exc))
                continue
            item["skipped"] = skipped
            return item
        raise RuntimeError(
            f"pairs {index}..{index + len(skipped) - 1} of {self.source.name} are all "
            f"unreadable; {self.report.summary()}"
        )

    def _skip(self, exc: RecordSkipped) -> SkippedItem:
        self.report.add(exc.kind, key=exc.key)
        return SkippedItem(exc.kind, exc.key, exc.detail)


def collate_pairs(items: Sequence[dict[str, Any] | SkippedItem | None]) -> dict[str, Any]:
    """Stack a list of dataset items into a batch, dropping skipped ones.

    Returns ``prompt`` and ``key`` (lists of str), the six tensors of ``TENSOR_KEYS`` stacked
    (absent when every item was skipped), ``size`` (the number of pairs) and ``skipped`` (the
    ``SkippedItem`` list, for ``SkipReport.record_batch``).
    """
    kept: list[dict[str, Any]] = []
    skipped: list[SkippedItem] = []
    for item in items:
        if isinstance(item, SkippedItem):
            skipped.append(item)
        elif item is not None:
            kept.append(item)
            skipped.extend(item.get("skipped", ()))
    batch: dict[str, Any] = {
        "prompt": [item["prompt"] for item in kept],
        "key": [item["key"] for item in kept],
        "size": len(kept),
        "skipped": skipped,
    }
    if kept:
        for name in TENSOR_KEYS:
            batch[name] = torch.stack([item[name] for item in kept])
    return batch
