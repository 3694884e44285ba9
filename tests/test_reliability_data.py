"""Bad data never stops a run and is never dropped silently: corrupt JPEG bytes, a missing or
empty image file, an empty or over-long caption, a NaN or out-of-range label, a duplicated
pair, a malformed JSONL line and a zero-byte parquet shard are skipped, counted per kind, and
shown in the log (stdout) and in the model card, with exact counts; the run completes (on
SD1.5, and the Pick-a-Pic case on SD3 too)."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures_data import make_local_pairs, make_pickapic_parquet, zero_byte_shard
from snpo.cli import main
from snpo.data import load_preference_source
from snpo.data.records import DataSourceError
from tiny_pipelines import RESOLUTION, make_sd3, make_sd15


@pytest.fixture(scope="module")
def sd_model(tmp_path_factory):
    return make_sd15(tmp_path_factory.mktemp("model") / "sd")


@pytest.fixture(scope="module")
def sd3_model(tmp_path_factory):
    return make_sd3(tmp_path_factory.mktemp("model") / "sd3")


def train(model: Path, data: Path, out: Path, **overrides) -> int:
    values = dict(model_name_or_path=model, dataset_name=data, output_dir=out, resolution=RESOLUTION,
                  lora_rank=4, per_device_train_batch_size=2, max_steps=6, learning_rate=1e-3, beta=500,
                  report_to="none", checkpointing_steps=0)
    values.update(overrides)
    return main(["train", *[x for k, v in values.items() for x in (f"--{k}", str(v))]])


def card_counts(card: str) -> dict[str, int]:
    """The per-kind table of the model card's Data section."""
    rows = [line for line in card.splitlines() if line.startswith("| `") and line.count("|") == 3]
    section = card[card.index("## Data"):card.index("## Training config")]
    return {line.split("`")[1]: int(line.split("|")[2]) for line in rows if line in section}


@pytest.mark.parametrize("family", ["sd15", "sd3"])
def test_every_bad_parquet_row_and_a_zero_byte_shard_are_skipped_and_counted(tmp_path, family, request, capsys):
    sd_model = request.getfixturevalue({"sd15": "sd_model", "sd3": "sd3_model"}[family])
    extra = {"max_sequence_length": 24} if family == "sd3" else {}  # a short T5: only speed
    data = tmp_path / "data"
    a = make_pickapic_parquet(data / "shard-a.parquet", 14, caption_prefix="a ", seed=0, bad_rows={
        "unreadable_image": 2,  # corrupt JPEG bytes: garbage, then a truncated scan
        "bad_label": 2,  # out of range (2, -1), then NaN
        "empty_caption": 1, "duplicate_pair": 1, "overlong_caption": 1})
    b = make_pickapic_parquet(data / "shard-b.parquet", 6, caption_prefix="b ", seed=1, with_ties=False,
                              bad_rows={"overlong_caption": 1})
    empty = zero_byte_shard(data / "shard-c.parquet")
    expected = {**a.expected_counts}
    expected["overlong_caption"] += b.expected_counts["overlong_caption"]
    assert expected == {"tie": 2, "unreadable_image": 2, "bad_label": 2, "empty_caption": 1,
                        "duplicate_pair": 1, "overlong_caption": 2}

    capsys.readouterr()
    assert train(sd_model, data, tmp_path / "out", **extra) == 0  # 6 steps x 2 pairs: every pair is met
    out = capsys.readouterr().out
    assert f"data: skipped unreadable shard {empty}: " in out
    assert ("kept 12 of 20 pairs; skipped: tie 2, duplicate_pair 1, empty_caption 1, overlong_caption 2, "
            "bad_label 2, unreadable_shard 1") in out  # the scan, before the model loads
    assert out.count("data: skipped unreadable_image at shard-a.parquet:") == 2  # met while training
    final = ("kept 10 of 20 pairs; skipped: tie 2, duplicate_pair 1, empty_caption 1, overlong_caption 2, "
             "bad_label 2, unreadable_image 2, unreadable_shard 1")
    assert f"data: after training: {final}" in out
    card = (tmp_path / "out" / "README.md").read_text()
    assert final in card
    assert card_counts(card) == {**expected, "unreadable_shard": 1}


def test_every_bad_jsonl_row_is_skipped_and_counted(tmp_path, sd_model, capsys):
    info = make_local_pairs(tmp_path / "pairs", 12, bad_rows={
        "unreadable_image": 3,  # a missing file, an empty file (both found by the scan), garbage bytes
        "empty_caption": 1, "duplicate_pair": 1, "malformed_row": 1, "overlong_caption": 1})
    assert info.expected_counts == {"unreadable_image": 3, "empty_caption": 1, "duplicate_pair": 1,
                                    "malformed_row": 1, "overlong_caption": 1}
    capsys.readouterr()
    assert train(sd_model, info.path, tmp_path / "out") == 0
    out = capsys.readouterr().out
    assert ("kept 6 of 12 pairs; skipped: duplicate_pair 1, empty_caption 1, overlong_caption 1, "
            "unreadable_image 2, malformed_row 1") in out
    final = ("kept 5 of 12 pairs; skipped: duplicate_pair 1, empty_caption 1, overlong_caption 1, "
             "unreadable_image 3, malformed_row 1")
    assert f"data: after training: {final}" in out
    card = (tmp_path / "out" / "README.md").read_text()
    assert final in card and card_counts(card) == info.expected_counts


def test_caption_limit_is_a_setting(tmp_path):
    """``max_caption_chars`` (TrainConfig, default 2000) decides what is over-long; null keeps all."""
    info = make_pickapic_parquet(tmp_path / "train.parquet", 6, with_ties=False, bad_rows={"overlong_caption": 2})
    assert load_preference_source(info.path, max_caption_chars=2000).scan()["overlong_caption"] == 2
    assert load_preference_source(info.path).scan()["overlong_caption"] == 0  # the library: no limit
    with pytest.raises(DataSourceError, match="kept 0 of 6 pairs; skipped: overlong_caption 6"):
        load_preference_source(info.path, max_caption_chars=5).scan()


def test_a_source_with_only_unreadable_shards_is_a_one_line_error(tmp_path, capsys, monkeypatch):
    import snpo.training.job as job

    monkeypatch.setattr(job, "load_backbone", lambda *a, **k: pytest.fail("model loaded before the data check"))
    zero_byte_shard(tmp_path / "data" / "a.parquet")
    zero_byte_shard(tmp_path / "data" / "b.parquet")
    with pytest.raises(DataSourceError, match="cannot read parquet"):
        load_preference_source(tmp_path / "data")
    model = make_sd15(tmp_path / "sd")
    capsys.readouterr()
    assert train(model, tmp_path / "data", tmp_path / "out") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snpo train: error: dataset_name: cannot read parquet")
