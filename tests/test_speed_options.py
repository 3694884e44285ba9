"""Opt-in speed options of TrainConfig: stored reference errors reproduce a run exactly, a
stale store is refused, channels_last trains the same model (to float rounding)."""

from __future__ import annotations

import pytest
import torch

from conftest import TINY, WORDS, colour_pairs
from snpo.backbones.toy import ToyBackbone
from snpo.toy.data import TensorPairDataset, stack_batch
from snpo.toy.tokenizer import build_toy_tokenizer
from snpo.training.config import TrainConfig
from snpo.training.fingerprints import REUSABLE_ACROSS
from snpo.training.job import build_method
from snpo.training.reference_errors import ReferenceErrorStore
from snpo.training.trainer import Trainer

FINGERPRINT = {"what": "test"}


def toy(tmp_path) -> ToyBackbone:
    tokenizer = build_toy_tokenizer(WORDS, tmp_path / "tok", max_length=TINY.max_prompt_tokens)
    return ToyBackbone.create(tokenizer, TINY, seed=0)


def train(tmp_path, dataset, *, store=None, steps=6, **overrides):
    values = dict(output_dir=str(tmp_path / "out"), max_steps=steps, per_device_train_batch_size=4,
                  learning_rate=3e-3, lr_scheduler="constant", beta=500.0, method="snpo",
                  cfg_dropout=0.5, checkpointing_steps=0, report_to="none", seed=0)
    values.update(overrides)
    config = TrainConfig(**values)
    backbone = toy(tmp_path)
    method = build_method(config, backbone).method  # the speed options as `snpo train` sets them
    method.reference_store = store
    backbone.result = Trainer(config, backbone, dataset, method, collate_fn=stack_batch,
                              show_progress=False, save_model=False, write_logs=False).train()
    return backbone, method


def lora_state(backbone):
    return {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}


def test_stored_reference_errors_reproduce_the_run_exactly(tmp_path):
    """First run records e_ref (same result as no store); a second run with another beta reads
    every one of them and matches a store-less run with that beta bit for bit."""
    data = colour_pairs(12)
    plain, _ = train(tmp_path, data, beta=500.0, steps=6)  # 6 steps of 4 over 12 pairs: 2 epochs
    store = ReferenceErrorStore(tmp_path / "store", FINGERPRINT)
    first, m1 = train(tmp_path, data, store=store, beta=500.0, steps=6)
    assert store.recorded == 24 and store.hits == 0
    assert all(torch.equal(v, lora_state(first)[k]) for k, v in lora_state(plain).items())

    plain_b, _ = train(tmp_path, data, beta=2000.0, mix_lambda=0.5, steps=6)
    store_b = ReferenceErrorStore(tmp_path / "store", FINGERPRINT)
    assert len(store_b) == 24
    read, m2 = train(tmp_path, data, store=store_b, beta=2000.0, mix_lambda=0.5, steps=6)
    assert store_b.hits == 24 and store_b.misses == 0 and store_b.recorded == 0
    assert all(torch.equal(v, lora_state(read)[k]) for k, v in lora_state(plain_b).items())

    # a longer run reads the stored steps and records the rest
    store_c = ReferenceErrorStore(tmp_path / "store", FINGERPRINT)
    train(tmp_path, data, store=store_c, steps=9)
    assert store_c.hits == 24 and store_c.recorded == 12


def test_store_refuses_other_pairs_in_the_same_slots(tmp_path):
    data = colour_pairs(12)
    store = ReferenceErrorStore(tmp_path / "store", FINGERPRINT)
    train(tmp_path, data, store=store, steps=2)
    other = TensorPairDataset(data.chosen, data.rejected, [p + " x" for p in data.prompts])
    with pytest.raises(ValueError, match="reference_errors_dir: .* other pairs"):
        train(tmp_path, other, store=ReferenceErrorStore(tmp_path / "store", FINGERPRINT), steps=2)


def test_store_survives_a_torn_record(tmp_path):
    store = ReferenceErrorStore(tmp_path / "store", FINGERPRINT)
    batch = {"prompt": ["a", "b"]}
    store.record([1, 2], batch, torch.tensor([0.5, 0.25]), torch.tensor([0.75, 1.0]))
    with open(store.path, "ab") as fh:
        fh.write(b"\x01\x02\x03")  # a run killed mid-write
    again = ReferenceErrorStore(tmp_path / "store", FINGERPRINT)
    chosen, rejected = again.lookup([2, 1], batch={"prompt": ["b", "a"]})
    assert chosen.tolist() == [0.25, 0.5] and rejected.tolist() == [1.0, 0.75]
    assert again.lookup([3], batch={"prompt": ["c"]}) is None
    again.record([3], {"prompt": ["c"]}, torch.tensor([2.0]), torch.tensor([3.0]))
    assert len(ReferenceErrorStore(tmp_path / "store", FINGERPRINT)) == 3


def test_precompute_reference_config_needs_a_folder():
    with pytest.raises(ValueError, match="^reference_errors_dir:"):
        TrainConfig(model_name_or_path="x", dataset_name="y", precompute_reference=True).validate()
    TrainConfig(model_name_or_path="x", dataset_name="y", precompute_reference=True,
                cache_dir="c").validate()
    # the knobs a beta / lambda / objective sweep turns do not separate stores
    assert {"beta", "mix_lambda", "mix_scale", "method", "learning_rate"} <= REUSABLE_ACROSS
    assert not {"seed", "cfg_dropout", "resolution", "per_device_train_batch_size"} & REUSABLE_ACROSS


def test_channels_last_computes_the_same_losses(tmp_path):
    data = colour_pairs(8)
    plain, _ = train(tmp_path, data, steps=3)
    fast, _ = train(tmp_path, data, steps=3, channels_last=True)
    assert fast.channels_last and not plain.channels_last
    assert fast.denoiser.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    for a, b in zip(plain.result.history, fast.result.history):  # same math, other kernels
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-3, abs=1e-5)
