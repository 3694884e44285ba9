"""Shared fixtures: tiny toy backbones and synthetic preference pairs, built at test time."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))  # fixture builders importable by tests
# One thread: these models are tiny, and two spinning OpenMP threads on a busy 2-core machine
# slowed a small convolution from 0.4 ms to 49 ms.
torch.set_num_threads(1)

from snpo.backbones.toy import ToyBackbone, ToyModelConfig  # noqa: E402
from snpo.toy.data import TensorPairDataset  # noqa: E402
from snpo.toy.tokenizer import build_toy_tokenizer  # noqa: E402

TINY = ToyModelConfig(
    resolution=8, patch_size=2, block_out_channels=(16, 16), layers_per_block=1,
    attention_heads=1, text_width=16, text_layers=1, text_heads=2, max_prompt_tokens=8,
    num_train_timesteps=100, prediction_type="epsilon",
)
WORDS = ["a", "red", "blue", "square", "circle"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Back to one thread for every test module, whatever an earlier test set (the demo and
    accelerate may change it): thread hand-offs cost far more than these tiny models' maths."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


@pytest.fixture
def tiny_toy(tmp_path) -> ToyBackbone:
    """A randomly initialised tiny toy model (same classes as the demo's)."""
    tokenizer = build_toy_tokenizer(WORDS, tmp_path / "tok", max_length=TINY.max_prompt_tokens)
    return ToyBackbone.create(tokenizer, TINY, seed=0)


def colour_pairs(n: int, resolution: int = 8) -> TensorPairDataset:
    """Pairs where the chosen image is reddish and the rejected one bluish, with variation."""
    g = torch.Generator().manual_seed(0)
    base = torch.rand(n, 3, resolution, resolution, generator=g) * 0.2
    chosen, rejected = base.clone(), base.clone()
    chosen[:, 0] += 0.7
    rejected[:, 2] += 0.7
    prompts = ["a red square" if i % 2 else "a red circle" for i in range(n)]
    return TensorPairDataset(chosen.clamp(0, 1), rejected.clamp(0, 1), prompts)
