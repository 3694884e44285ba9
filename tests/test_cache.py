"""The latent/text cache: a cached run does no encoder work and trains the same weights as an
uncached one; a stale or incomplete cache is refused in one line; an interrupted ``snpo cache``
resumes where it stopped; SDXL's per-image time_ids survive caching. The first two hold for
SD3 (three text encoders, T5 settings in the fingerprint) as for SD1.5."""

from __future__ import annotations

import json
import os

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from diffusers import AutoencoderKL
from PIL import Image
from safetensors.torch import load_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

import snpo.data.cache as cache_module
from fixtures_data import encode, make_pickapic_parquet
from snpo.backbones import load_backbone
from snpo.cli import main
from snpo.configuration import config_to_dict, load_config
from snpo.data import PairedTransform, PreferencePairDataset, collate_pairs, load_preference_source
from snpo.data.cache import CacheError, collate_cached, open_cache, read_manifest
from snpo.training.config import TrainConfig
from snpo.training.fingerprints import cache_fingerprint_for
from snpo.training.run import run_cache, run_train
from tiny_pipelines import RESOLUTION, make_sd3, make_sd15, make_sdxl

FAMILIES = ["sd15", "sd3"]
MAKERS = {"sd15": make_sd15, "sd3": make_sd3}
FAMILY_OVERRIDES = {"sd15": {}, "sd3": {"max_sequence_length": 24}}  # a short T5: only speed


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    return make_sd15(tmp_path_factory.mktemp("sd") / "model")


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    return make_sd3(tmp_path_factory.mktemp("sd3") / "model")


@pytest.fixture
def family_model(request, family):
    """The tiny model of the test's ``family`` parameter."""
    return request.getfixturevalue({"sd15": "sd_model", "sd3": "sd3_model"}[family])


def config(model, data, out, **overrides) -> TrainConfig:
    values = dict(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(out),
                  resolution=RESOLUTION, per_device_train_batch_size=2, learning_rate=1e-2,
                  lr_scheduler="constant", beta=500, checkpointing_steps=0, report_to="none",
                  lora_rank=4, method="snpo", cfg_dropout=0.5, random_flip=True, max_steps=3,
                  adam_epsilon=1e-5,  # Adam's default 1e-8 turns float noise of near-zero gradients into lr-sized steps
                  cache_shard_size=4, cache_batch_size=3, seed=0)
    values.update(overrides)
    return load_config(TrainConfig, None, {k: v for k, v in values.items() if v is not None})


class EncoderCalls:
    """Counts VAE and text-encoder forwards (class-wide: any instance, any process copy)."""

    def __init__(self, monkeypatch) -> None:
        self.calls = 0
        for cls, name in ((AutoencoderKL, "encode"), (AutoencoderKL, "decode"), (CLIPTextModel, "forward"),
                          (CLIPTextModelWithProjection, "forward"), (T5EncoderModel, "forward")):
            original = getattr(cls, name)

            def counted(*args, _original=original, **kwargs):
                self.calls += 1
                return _original(*args, **kwargs)

            monkeypatch.setattr(cls, name, counted)


def make_textured_pickapic(path, n: int) -> None:
    """Pick-a-Pic rows with random-noise images (solid colours would look the same flipped)."""
    rng = np.random.default_rng(0)
    rows = {"caption": [], "jpg_0": [], "jpg_1": [], "label_0": [], "label_1": []}
    for i in range(n):
        rows["caption"].append(f"prompt {i % 3}")  # repeated prompts, as in Pick-a-Pic
        for col in ("jpg_0", "jpg_1"):
            pixels = rng.integers(0, 256, size=(20, 28, 3), dtype=np.uint8)
            rows[col].append(encode(Image.fromarray(pixels), "PNG"))
        rows["label_0"].append(float(i % 2))
        rows["label_1"].append(float(1 - i % 2))
    pq.write_table(pa.table(rows), path)


@pytest.mark.parametrize("family", FAMILIES)
def test_cached_training_does_no_encoder_work_and_matches_uncached(tmp_path, family, family_model, monkeypatch):
    sd_model, extra = family_model, FAMILY_OVERRIDES[family]
    data = tmp_path / "train.parquet"
    make_textured_pickapic(data, 8)
    cache_dir = tmp_path / "cache"
    assert main(["cache", *sum(([f"--{k}", str(v)] for k, v in {
        "model_name_or_path": sd_model, "dataset_name": data, "cache_dir": cache_dir,
        "resolution": RESOLUTION, "random_flip": "true", "cache_shard_size": 4, "cache_batch_size": 3, **extra,
    }.items()), [])]) == 0
    manifest = read_manifest(cache_dir)
    assert manifest["complete"] and manifest["num_pairs"] == 8 and len(manifest["shards"]) == 2
    assert manifest["report"]["counts"] == {}
    shard = load_file(cache_dir / "pairs-00000.safetensors")
    assert shard["chosen_latents_flipped"].shape == shard["chosen_latents"].shape == (4, 4, 8, 8)
    assert shard["text.encoder_hidden_states"].shape[0] == 3  # prompts stored once per shard

    plain = run_train(config(sd_model, data, tmp_path / "plain", **extra), show_progress=False)
    counter = EncoderCalls(monkeypatch)
    cached = run_train(config(sd_model, data, tmp_path / "cached", cache_dir=str(cache_dir), **extra),
                       show_progress=False)
    assert counter.calls == 0  # no VAE, no text encoder: not even for the null condition
    assert plain.global_step == cached.global_step == 3
    # same pairs, same order, same flips, same noise: the same LoRA weights
    a = load_file(tmp_path / "plain" / "pytorch_lora_weights.safetensors")
    b = load_file(tmp_path / "cached" / "pytorch_lora_weights.safetensors")
    assert a.keys() == b.keys()
    for key in a:  # float noise only (measured 1.4e-5; the control below differs by 5e-2)
        torch.testing.assert_close(a[key], b[key], atol=1e-4, rtol=1e-3)
    assert [h["loss"] for h in plain.history] == pytest.approx([h["loss"] for h in cached.history], abs=1e-4)
    # control: the same run without its flips is far outside that tolerance
    run_train(config(sd_model, data, tmp_path / "noflip", random_flip=False, **extra), show_progress=False)
    c = load_file(tmp_path / "noflip" / "pytorch_lora_weights.safetensors")
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3


@pytest.mark.parametrize("family", FAMILIES)
def test_stale_incomplete_or_missing_cache_is_refused_in_one_line(tmp_path, family, family_model, capsys,
                                                                  monkeypatch):
    sd_model = family_model
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 10, with_ties=False)
    cache_dir = tmp_path / "cache"
    base = config(sd_model, data, tmp_path / "out", cache_dir=str(cache_dir), **FAMILY_OVERRIDES[family])
    with pytest.raises(CacheError, match="no cache"):
        run_train(base)

    original_save = cache_module._ShardWriter.save

    def save_then_stop(self, path):
        original_save(self, path)
        raise KeyboardInterrupt  # killed right after the first shard

    monkeypatch.setattr(cache_module._ShardWriter, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_cache(base, show_progress=False)
    monkeypatch.setattr(cache_module._ShardWriter, "save", original_save)
    with pytest.raises(CacheError, match=r"incomplete \(1 of 3 shards\)"):
        run_train(base)

    run_cache(base, show_progress=False)
    changes = [({"resolution": 24}, "transform.resolution: cache has 16, this run has 24"),
               ({"random_flip": False}, "transform.random_flip"),
               ({"model_name_or_path": str(MAKERS[family](tmp_path / "other", seed=1))}, "model.")]
    if family == "sd3":  # the encoded text depends on the T5 settings, not only on the files
        changes += [({"max_sequence_length": 16}, "encoding.max_sequence_length: cache has 24, this run has 16"),
                    ({"use_t5": False}, "encoding.uses_t5")]
    for change, expected in changes:
        capsys.readouterr()
        args = {**config_to_dict(base), **change}
        assert main(["train", *sum(([f"--{k}", str(v)] for k, v in args.items() if v is not None), [])]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "stale" in err[0] and expected in err[0], err


def test_interrupted_cache_resumes_where_it_stopped(tmp_path, sd_model, monkeypatch):
    """Shards written before the interruption are kept as they are; the result equals an
    uninterrupted build; an unreadable image is left out and counted."""
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 9, with_ties=False, bad_rows={"unreadable_image": 1})
    first = config(sd_model, data, tmp_path / "o", cache_dir=str(tmp_path / "resumed"))
    saves: list[str] = []
    original_save = cache_module._ShardWriter.save

    def save_then_stop(self, path):
        n = original_save(self, path)
        saves.append(path.name)
        if len(saves) == 1:
            raise KeyboardInterrupt  # killed right after the first shard
        return n

    monkeypatch.setattr(cache_module._ShardWriter, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run_cache(first, show_progress=False)
    shard0 = tmp_path / "resumed" / "pairs-00000.safetensors"
    stamp = os.stat(shard0).st_mtime_ns
    run_cache(first, show_progress=False)
    assert saves == ["pairs-00000.safetensors", "pairs-00001.safetensors", "pairs-00002.safetensors"]
    assert os.stat(shard0).st_mtime_ns == stamp  # not rewritten

    monkeypatch.setattr(cache_module._ShardWriter, "save", original_save)
    run_cache(config(sd_model, data, tmp_path / "o", cache_dir=str(tmp_path / "fresh")), show_progress=False)
    resumed, fresh = read_manifest(tmp_path / "resumed"), read_manifest(tmp_path / "fresh")
    assert resumed["num_pairs"] == fresh["num_pairs"] == 8
    assert resumed["report"]["counts"] == {"unreadable_image": 1}
    for s in resumed["shards"]:
        x, y = load_file(tmp_path / "resumed" / s["file"]), load_file(tmp_path / "fresh" / s["file"])
        assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_sdxl_cache_holds_the_same_condition_as_encoding(tmp_path):
    """Per-image time_ids (different sizes for chosen and rejected) and the text entries read
    back from the cache equal what the backbone computes from the images."""
    model = make_sdxl(tmp_path / "xl")
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 4, with_ties=False, image_size=(24, 36))
    cfg = config(model, data, tmp_path / "o", cache_dir=str(tmp_path / "cache"), random_flip=False)
    run_cache(cfg, show_progress=False)
    backbone = load_backbone(model)
    cached = open_cache(cfg.cache_dir, cache_fingerprint_for(cfg, "sdxl", model))
    source = load_preference_source(data)
    plain = PreferencePairDataset(source, PairedTransform(RESOLUTION, center_crop=True))
    batch_c = collate_cached([cached[i] for i in range(4)])
    batch_p = collate_pairs([plain[i] for i in range(4)])
    with torch.no_grad():
        chosen, rejected, cond = backbone.encode_batch(batch_p)
    c2, r2, cond2 = backbone.encode_batch(batch_c)
    torch.testing.assert_close(c2, chosen)
    torch.testing.assert_close(r2, rejected)
    assert cond.keys() == cond2.keys() == {"encoder_hidden_states", "text_embeds", "time_ids"}
    for key in cond:
        torch.testing.assert_close(cond2[key], cond[key])
    assert cond2["time_ids"][0].tolist() == [24, 36, 0, 4, RESOLUTION, RESOLUTION]
    assert json.loads((tmp_path / "cache" / "manifest.json").read_text())["layout"]["image_keys"] == ["time_ids"]


def test_random_crop_cannot_be_cached(tmp_path, sd_model):
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 3, with_ties=False)
    with pytest.raises(CacheError, match="center_crop"):
        run_cache(config(sd_model, data, tmp_path / "o", cache_dir=str(tmp_path / "c"), center_crop=False))
