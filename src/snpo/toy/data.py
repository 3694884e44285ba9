"""In-memory datasets for the toy world (the images are small enough to hold)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor
from torch.utils.data import Dataset


class TensorPairDataset(Dataset):
    """Preference pairs held as tensors: items as the trainer's pair batches expect.

    Pixels are stored in [0, 1] and served in [-1, 1].
    """

    def __init__(self, chosen: Tensor, rejected: Tensor, prompts: Sequence[str]) -> None:
        if not (len(chosen) == len(rejected) == len(prompts)):
            raise ValueError("TensorPairDataset: chosen, rejected and prompts must have one row per pair")
        self.chosen, self.rejected, self.prompts = chosen, rejected, list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {
            "prompt": self.prompts[i],
            "chosen_pixels": self.chosen[i] * 2 - 1,
            "rejected_pixels": self.rejected[i] * 2 - 1,
        }


class TensorImageDataset(Dataset):
    """Captioned images held as tensors (pixels in [0, 1], served in [-1, 1])."""

    def __init__(self, pixels: Tensor, prompts: Sequence[str]) -> None:
        if len(pixels) != len(prompts):
            raise ValueError("TensorImageDataset: pixels and prompts must have one row per image")
        self.pixels, self.prompts = pixels, list(prompts)

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> dict:
        return {"prompt": self.prompts[i], "pixels": self.pixels[i] * 2 - 1}


def stack_batch(items: list[dict]) -> dict:
    """Collate: stack tensors, list everything else."""
    out = {}
    for key in items[0]:
        values = [item[key] for item in items]
        out[key] = torch.stack(values) if isinstance(values[0], Tensor) else values
    return out
