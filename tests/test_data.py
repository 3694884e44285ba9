"""Tests of the data layer (snpo.data): sources, skip counting, paired transforms, datasets.

Expectations come from the fixture builders' plans (which colour won, which rows are bad),
never from the code under test. Images are solid colours: winners dark, losers light.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from fixtures_data import (
    close_rgb,
    hf_pair_columns,
    make_hf_pairs_parquet,
    make_local_pairs,
    make_pickapic_parquet,
    mean_rgb,
    solid_image,
)
from snpo.data import (
    DataSourceError,
    GroupedShuffleSampler,
    PairedTransform,
    PreferencePairDataset,
    SkippedItem,
    SkipReport,
    collate_pairs,
    load_preference_source,
)

R = 16


def run_epoch(dataset: PreferencePairDataset, **loader_kw) -> list[dict]:
    """All batches of one pass, with decode-time skips recorded as the trainer would."""
    loader = DataLoader(dataset, batch_size=4, collate_fn=collate_pairs, **loader_kw)
    batches = []
    for batch in loader:
        dataset.report.record_batch(batch)
        batches.append(batch)
    return batches


def check_colours(item: dict, row) -> None:
    assert close_rgb(mean_rgb(item["chosen_pixels"]), row.winner_rgb), (item["key"], row)
    assert close_rgb(mean_rgb(item["rejected_pixels"]), row.loser_rgb), (item["key"], row)


@pytest.fixture
def read_log(monkeypatch: pytest.MonkeyPatch) -> list[tuple[int, tuple[str, ...]]]:
    """Records every parquet row-group read as (row group, columns)."""
    log: list[tuple[int, tuple[str, ...]]] = []
    original = pq.ParquetFile.read_row_group

    def spy(self, i, columns=None, **kw):
        log.append((i, tuple(columns or ())))
        return original(self, i, columns=columns, **kw)

    monkeypatch.setattr(pq.ParquetFile, "read_row_group", spy)
    return log


# -- Pick-a-Pic: winners, ties, bad rows ------------------------------------------------------
def test_winner_selected_by_label_in_both_orders(tmp_path: Path) -> None:
    info = make_pickapic_parquet(tmp_path / "train.parquet", 12, with_ties=False)
    assert {r.winner_index for r in info.rows} == {0, 1}  # both label orders present
    dataset = PreferencePairDataset(load_preference_source(info.path), PairedTransform(R))
    assert len(dataset) == 12
    for i in range(len(dataset)):
        item = dataset[i]
        check_colours(item, info.by_caption(item["prompt"]))


def test_ties_dropped_by_default_and_counted(tmp_path: Path) -> None:
    info = make_pickapic_parquet(tmp_path / "train.parquet", 20)
    report = load_preference_source(info.path).scan()
    assert report["tie"] == 4 and report.kept == 16 and report.total_seen == 20
    assert report.errors == 0  # a tie is not an error
    assert report.summary() == "kept 16 of 20 pairs; skipped: tie 4"


def test_ties_kept_on_request_with_image_0_first(tmp_path: Path) -> None:
    info = make_pickapic_parquet(tmp_path / "train.parquet", 20)
    source = load_preference_source(info.path, drop_ties=False)
    assert source.scan().kept == 20
    dataset = PreferencePairDataset(source, PairedTransform(R))
    ties = 0
    for i in range(len(dataset)):
        item = dataset[i]
        row = info.by_caption(item["prompt"])
        ties += row.kind == "tie"
        check_colours(item, row)  # for a tie the fixture's "winner" is image 0
    assert ties == 4


@pytest.mark.parametrize("dedup", ["auto", "bytes"])
def test_bad_rows_skipped_and_counted_exactly(tmp_path: Path, dedup: str) -> None:
    bad = {"unreadable_image": 3, "empty_caption": 3, "bad_label": 5, "duplicate_pair": 2}
    info = make_pickapic_parquet(tmp_path / "train.parquet", 40, bad_rows=bad, row_group_size=7)
    source = load_preference_source(info.path, dedup=dedup)
    scanned = source.scan()
    assert scanned["tie"] == 8
    assert scanned["empty_caption"] == 3 and scanned["bad_label"] == 5
    assert scanned["duplicate_pair"] == 2
    # zero-byte images are visible without decoding only when the bytes are read (hashing)
    assert scanned["unreadable_image"] == (1 if dedup == "bytes" else 0)

    dataset = PreferencePairDataset(source, PairedTransform(R))
    for _ in range(2):  # a second epoch meets the same bad images: still counted once
        batches = run_epoch(dataset)
    expected = {"tie": 8, "duplicate_pair": 2, "empty_caption": 3, "bad_label": 5}
    expected["unreadable_image"] = 3
    assert dataset.report.counts == expected == info.expected_counts
    assert dataset.report.kept == 40 - 8 - 13 == len(info.ok_rows)
    assert dataset.report.summary() == (
        "kept 19 of 40 pairs; skipped: tie 8, duplicate_pair 2, empty_caption 3, "
        "bad_label 5, unreadable_image 3"
    )
    kept_keys = [k for b in batches for k in b["key"]]
    assert sorted(kept_keys) == sorted(r.key for r in info.ok_rows)
    assert dataset.report.as_dict()["errors"] == 13  # all but the ties


def test_no_usable_rows_fails_in_scan_before_any_decoding(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, read_log: list
) -> None:
    info = make_pickapic_parquet(
        tmp_path / "useless.parquet", 5, bad_rows={"empty_caption": 2, "bad_label": 2}
    )

    def no_decoding(*args, **kwargs):
        raise AssertionError("an image was decoded")

    monkeypatch.setattr(Image, "open", no_decoding)
    source = load_preference_source(info.path)
    with pytest.raises(DataSourceError) as err:
        source.scan()
    message = str(err.value)
    assert "\n" not in message and "useless.parquet" in message
    assert "kept 0 of 5" in message and "tie 1" in message
    assert "empty_caption 2" in message and "bad_label 2" in message
    assert all("jpg_0" not in cols and "jpg_1" not in cols for _, cols in read_log)
    with pytest.raises(DataSourceError, match="useless.parquet"):
        PreferencePairDataset(source, PairedTransform(R))


def test_missing_column_is_a_one_line_error_naming_file_and_column(tmp_path: Path) -> None:
    make_pickapic_parquet(tmp_path / "train-00000-of-00002.parquet", 4)
    make_pickapic_parquet(
        tmp_path / "train-00001-of-00002.parquet", 4, drop_columns=("label_1", "jpg_1")
    )
    with pytest.raises(DataSourceError) as err:
        load_preference_source(tmp_path / "train-*.parquet")
    message = str(err.value)
    assert "\n" not in message and "missing_column" in message
    assert "train-00001-of-00002.parquet" in message
    assert "jpg_1" in message and "label_1" in message


def test_missing_field_in_jsonl_is_an_error(tmp_path: Path) -> None:
    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "a.png"}\n')
    with pytest.raises(DataSourceError, match=r"pairs\.jsonl lacks column\(s\) rejected"):
        load_preference_source(path)


# -- paired transform -------------------------------------------------------------------------
def halves(size: tuple[int, int], left: tuple, right: tuple) -> Image.Image:
    """(height, width) image, ``left`` colour on the left half, ``right`` on the right."""
    h, w = size
    array = np.zeros((h, w, 3), dtype=np.uint8)
    array[:, : w // 2] = left
    array[:, w // 2 :] = right
    return Image.fromarray(array)


def test_paired_transform_flips_both_images_together() -> None:
    red, blue, green, white = (255, 0, 0), (0, 0, 255), (0, 255, 0), (255, 255, 255)
    chosen = halves((40, 60), red, blue)
    rejected = halves((80, 50), green, white)  # another size and aspect ratio
    transform = PairedTransform(R, center_crop=True, random_flip=True)
    flips = []
    for seed in range(24):
        out = transform(chosen, rejected, torch.Generator().manual_seed(seed))
        c_left = mean_rgb(out["chosen_pixels"][:, :, :2])
        r_left = mean_rgb(out["rejected_pixels"][:, :, :2])
        c_flipped = close_rgb(c_left, blue, 10)
        r_flipped = close_rgb(r_left, white, 10)
        assert c_flipped or close_rgb(c_left, red, 10)
        assert r_flipped or close_rgb(r_left, green, 10)
        assert c_flipped == r_flipped, seed
        flips.append(c_flipped)
    assert any(flips) and not all(flips)


def test_paired_random_crop_uses_one_relative_offset() -> None:
    rng = np.random.default_rng(0)
    chosen = Image.fromarray(rng.integers(0, 256, (32, 64, 3), dtype=np.uint8))  # -> 16 x 32
    rejected = Image.fromarray(rng.integers(0, 256, (32, 48, 3), dtype=np.uint8))  # -> 16 x 24
    transform = PairedTransform(R, center_crop=False)
    lefts = set()
    for seed in range(20):
        out = transform(chosen, rejected, torch.Generator().manual_seed(seed))
        (c_top, c_left), (r_top, r_left) = (
            out["chosen_crop_top_left"].tolist(),
            out["rejected_crop_top_left"].tolist(),
        )
        assert c_top == r_top == 0  # the short side is exactly R: no vertical slack
        # one draw u in [0, 1) gives both: left = floor(u * (slack + 1)), slacks 16 and 8
        _, u_left, _ = transform.sample(torch.Generator().manual_seed(seed))
        assert (c_left, r_left) == (int(u_left * 17), int(u_left * 9))
        lefts.add(c_left)
        # the pixels are the reported crop of the resized image
        for name, image, size, left in (
            ("chosen", chosen, (32, 16), c_left),
            ("rejected", rejected, (24, 16), r_left),
        ):
            resized = np.asarray(image.resize(size, Image.Resampling.BICUBIC), dtype=np.float32)
            expected = torch.from_numpy(resized[:, left : left + R]).permute(2, 0, 1) / 127.5 - 1
            assert torch.allclose(out[f"{name}_pixels"], expected, atol=1e-5)
    assert len(lefts) > 3
    # every offset is possible, the extreme ones included
    tiny = Image.new("RGB", (6, 2)), Image.new("RGB", (6, 2))
    draws = [
        PairedTransform(2, center_crop=False)(*tiny, torch.Generator().manual_seed(s))
        for s in range(60)
    ]
    assert {int(d["chosen_crop_top_left"][1]) for d in draws} == {0, 1, 2, 3, 4}


def test_paired_transform_same_size_gives_same_offsets_and_metadata() -> None:
    a, b = solid_image((10, 20, 30), (50, 70)), solid_image((200, 100, 0), (50, 70))
    out = PairedTransform(R, center_crop=False, random_flip=True)(a, b, torch.Generator())
    assert torch.equal(out["chosen_crop_top_left"], out["rejected_crop_top_left"])
    assert out["chosen_original_size"].tolist() == [50, 70]
    center = PairedTransform(R)(a, halves((30, 90), (0, 0, 0), (9, 9, 9)))
    assert center["chosen_crop_top_left"].tolist() == [0, 3]  # 16 x 22 -> round(6 / 2)
    assert center["rejected_crop_top_left"].tolist() == [0, 16]  # 16 x 48 -> 32 / 2
    assert center["rejected_original_size"].tolist() == [30, 90]


def test_paired_transform_reproducible_range_and_shape() -> None:
    rng = np.random.default_rng(1)
    a = Image.fromarray((rng.integers(0, 2, (40, 56, 3)) * 255).astype(np.uint8))
    b = Image.fromarray(rng.integers(0, 256, (64, 48, 3), dtype=np.uint8))
    transform = PairedTransform(R, center_crop=False, random_flip=True)
    first = transform(a, b, torch.Generator().manual_seed(7))
    again = transform(a, b, torch.Generator().manual_seed(7))
    for key, value in first.items():
        assert torch.equal(value, again[key]), key
    others = [transform(a, b, torch.Generator().manual_seed(s)) for s in range(8, 14)]
    assert any(not torch.equal(o["chosen_pixels"], first["chosen_pixels"]) for o in others)
    for name in ("chosen_pixels", "rejected_pixels"):
        pixels = first[name]
        assert pixels.shape == (3, R, R) and pixels.dtype == torch.float32
        assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    assert first["chosen_pixels"].min() < -0.9 and first["chosen_pixels"].max() > 0.9


def test_dataset_items_reproducible_across_copies_and_epochs(tmp_path: Path) -> None:
    info = make_pickapic_parquet(tmp_path / "train.parquet", 10, with_ties=False)
    transform = PairedTransform(R, center_crop=False, random_flip=True)
    dataset = PreferencePairDataset(load_preference_source(info.path), transform, seed=3)
    copy = pickle.loads(pickle.dumps(dataset))  # what a spawned DataLoader worker gets
    fresh = PreferencePairDataset(load_preference_source(info.path), transform, seed=3)
    for i in range(len(dataset)):
        a, b, c = dataset[i], copy[i], fresh[i]
        assert torch.equal(a["chosen_pixels"], b["chosen_pixels"])
        assert torch.equal(a["rejected_crop_top_left"], c["rejected_crop_top_left"])
    dataset.set_epoch(1)
    assert not all(
        torch.equal(dataset[i]["chosen_pixels"], copy[i]["chosen_pixels"])
        and torch.equal(dataset[i]["chosen_crop_top_left"], copy[i]["chosen_crop_top_left"])
        for i in range(len(dataset))
    )


# -- other formats ----------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", ["jsonl", "csv"])
def test_local_files_with_relative_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str
) -> None:
    bad = {"unreadable_image": 3, "empty_caption": 2, "duplicate_pair": 1}
    if fmt == "jsonl":
        bad["malformed_row"] = 1
    info = make_local_pairs(tmp_path / "data", 14, fmt=fmt, bad_rows=bad)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # relative paths must resolve against the file's folder
    source = load_preference_source(Path("..") / "data" / f"pairs.{fmt}")
    scanned = source.scan()
    # a missing and an empty file are found by stat(); the garbage file only when decoded
    assert scanned["unreadable_image"] == 2
    dataset = PreferencePairDataset(source, PairedTransform(R))
    batches = run_epoch(dataset)
    assert dataset.report.counts == info.expected_counts
    assert dataset.report.kept == len(info.ok_rows) == sum(b["size"] for b in batches)
    for batch in batches:
        for j, prompt in enumerate(batch["prompt"]):
            row = info.by_caption(prompt)
            assert batch["key"][j] == row.key
            check_colours({k: v[j] for k, v in batch.items() if k.endswith("pixels")}, row)


def test_hf_style_parquet_with_prompt_chosen_rejected(tmp_path: Path) -> None:
    info = make_hf_pairs_parquet(tmp_path / "pairs.parquet", 7, row_group_size=3)
    source = load_preference_source(info.path)
    assert source.schema.name == "prompt/chosen/rejected" and len(source) == 7
    for i in range(len(source)):
        record = source.get(i)
        row = info.rows[i]
        assert record.prompt == row.caption and record.key == row.key
        assert record.chosen.getpixel((0, 0)) == row.winner_rgb
        assert record.rejected.getpixel((0, 0)) == row.loser_rgb


def test_datasets_object_in_memory_and_saved(tmp_path: Path) -> None:
    datasets = pytest.importorskip("datasets")
    cols, info = hf_pair_columns(6)
    ds = datasets.Dataset.from_dict(cols)
    shuffled = ds.shuffle(seed=0)  # a view with an indices mapping
    for obj in (ds, shuffled):
        dataset = PreferencePairDataset(load_preference_source(obj), PairedTransform(R))
        assert len(dataset) == 6
        for i in range(6):
            item = dataset[i]
            check_colours(item, info.by_caption(item["prompt"]))
    datasets.DatasetDict({"train": ds, "test": ds.select([0, 1])}).save_to_disk(tmp_path / "dd")
    assert len(load_preference_source(tmp_path / "dd", split="test")) == 2
    assert len(load_preference_source(tmp_path / "dd")) == 6  # train by default
    with pytest.raises(DataSourceError, match="no split 'validation'"):
        load_preference_source(tmp_path / "dd", split="validation")


def test_glob_of_shards_reads_the_right_rows(tmp_path: Path) -> None:
    shards = [
        make_pickapic_parquet(
            tmp_path / f"train-0000{k}-of-00003.parquet",
            5,
            with_ties=False,
            row_group_size=2,
            seed=k,
            caption_prefix=f"s{k} ",
        )
        for k in range(3)
    ]
    make_pickapic_parquet(tmp_path / "validation-00000-of-00001.parquet", 5, seed=9)
    rows = [row for info in shards for row in info.rows]
    source = load_preference_source(str(tmp_path / "train-*.parquet"))
    assert len(source) == 15
    for i in reversed(range(15)):  # out of order on purpose
        record = source.get(i)
        assert (record.prompt, record.key) == (rows[i].caption, rows[i].key)
        assert close_rgb(record.chosen.getpixel((3, 3)), rows[i].winner_rgb)
    assert len(load_preference_source(tmp_path, split="train")) == 15
    assert len(load_preference_source(tmp_path, split="validation")) == 4  # 1 tie dropped
    with pytest.raises(DataSourceError, match="several splits"):
        load_preference_source(tmp_path)
    with pytest.raises(DataSourceError, match="no parquet shards of split 'test'"):
        load_preference_source(tmp_path, split="test")
    # shards whose names say nothing about a split are all used, whatever split is asked for
    plain = tmp_path / "plain"
    make_pickapic_parquet(plain / "a.parquet", 5, with_ties=False)
    make_pickapic_parquet(plain / "b.parquet", 5, with_ties=False, caption_prefix="b ")
    assert len(load_preference_source(plain, split="train")) == 10


def test_parquet_is_read_lazily_by_row_group(tmp_path: Path, read_log: list) -> None:
    info = make_pickapic_parquet(tmp_path / "train.parquet", 12, with_ties=False, row_group_size=4)
    source = load_preference_source(info.path)
    source.scan()
    assert [rg for rg, _ in read_log] == [0, 1, 2]  # one pass over the small columns
    assert all("jpg_0" not in cols for _, cols in read_log)
    read_log.clear()
    assert source.get(5).prompt == info.rows[5].caption
    assert [(rg, "jpg_0" in cols) for rg, cols in read_log] == [(1, True)]
    source.get(6)  # same row group: served from the cache
    assert len(read_log) == 1
    source.get(0)
    source.get(11)
    source.get(4)  # row group 1 was evicted (cache of 2): read again
    assert [rg for rg, _ in read_log] == [1, 0, 2, 1]


# -- datasets, workers, reports ---------------------------------------------------------------
def test_skips_reach_the_main_process_from_workers(tmp_path: Path) -> None:
    info = make_pickapic_parquet(
        tmp_path / "train.parquet", 16, with_ties=False, bad_rows={"unreadable_image": 2}
    )
    dataset = PreferencePairDataset(load_preference_source(info.path), PairedTransform(R))
    batches = run_epoch(dataset, num_workers=2)
    assert sum(b["size"] for b in batches) == 14
    assert dataset.report["unreadable_image"] == 2 and dataset.report.kept == 14
    skipped_keys = {s.key for b in batches for s in b["skipped"]}
    assert skipped_keys == {r.key for r in info.rows if r.kind == "unreadable_image"}


def test_substitute_mode_keeps_batches_full(tmp_path: Path) -> None:
    info = make_pickapic_parquet(
        tmp_path / "train.parquet", 12, with_ties=False, bad_rows={"unreadable_image": 3}
    )
    source = load_preference_source(info.path)
    dataset = PreferencePairDataset(source, PairedTransform(R), on_unreadable="substitute")
    batches = run_epoch(dataset)
    assert [b["size"] for b in batches] == [4, 4, 4]
    # carried in the batches for workers too (a bad pair may be met twice: as itself and as
    # the substitute tried for a bad neighbour)
    assert len({s.key for b in batches for s in b["skipped"]}) == 3
    assert dataset.report["unreadable_image"] == 3 and dataset.report.kept == 9


def test_collate_of_only_skipped_items() -> None:
    batch = collate_pairs([SkippedItem("unreadable_image", "a:1"), None])
    assert batch["size"] == 0 and batch["prompt"] == [] and "chosen_pixels" not in batch
    report = SkipReport(total_seen=3)
    assert report.record_batch(batch) == 1 and report.record_batch(batch) == 0
    assert report.summary() == "kept 2 of 3 pairs; skipped: unreadable_image 1"


def test_skip_report_merges_and_counts_keys_once() -> None:
    a = SkipReport(total_seen=10, counts={"tie": 2, "empty_caption": 1})
    b = SkipReport(total_seen=5)
    b.add("bad_label")
    assert a.add("unreadable_image", key="x:1") and not a.add("unreadable_image", key="x:1")
    b.add("unreadable_image", key="x:1")
    b.add("unreadable_image", key="y:2")
    a += b
    assert a.counts == {"tie": 2, "empty_caption": 1, "bad_label": 1, "unreadable_image": 2}
    assert a.as_dict() == {
        "total_seen": 15,
        "kept": 9,
        "skipped": 6,
        "errors": 4,
        "counts": {"tie": 2, "empty_caption": 1, "bad_label": 1, "unreadable_image": 2},
    }
    assert SkipReport(total_seen=4).summary() == "kept 4 of 4 pairs; skipped: none"


def test_grouped_shuffle_sampler(tmp_path: Path) -> None:
    info = make_pickapic_parquet(tmp_path / "train.parquet", 24, with_ties=False, row_group_size=4)
    source = load_preference_source(info.path)
    sampler = GroupedShuffleSampler(source, seed=1, groups_per_window=2)
    order = list(sampler)
    assert sorted(order) == list(range(24)) and order != list(range(24))
    assert order == list(GroupedShuffleSampler(source, seed=1, groups_per_window=2))
    assert len({i // 4 for i in order[:8]}) == 2  # the first window holds two row groups
    sampler.set_epoch(1)
    assert list(sampler) != order


# -- resolution errors ------------------------------------------------------------------------
def test_hub_snapshot_parquet_shards_of_the_split(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = pytest.importorskip("huggingface_hub")
    snapshot = tmp_path / "snapshot"
    make_pickapic_parquet(snapshot / "data" / "train-00000-of-00001.parquet", 5)
    make_pickapic_parquet(snapshot / "data" / "test-00000-of-00001.parquet", 10)  # cached
    calls = []

    def fake_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(snapshot)

    monkeypatch.setattr(hub, "snapshot_download", fake_download)
    source = load_preference_source("someone/pickapic_v2")
    assert len(source) == 4 and source.name == "someone/pickapic_v2"
    assert calls[0][1]["repo_type"] == "dataset"
    assert "*/train-*.parquet" in calls[0][1]["allow_patterns"]


def test_hub_id_offline_gives_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    hub = pytest.importorskip("huggingface_hub")

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co'.\nCheck your connection.")

    monkeypatch.setattr(hub, "snapshot_download", offline)
    with pytest.raises(DataSourceError) as err:
        load_preference_source("someone/pickapic_v2", split="train")
    assert "\n" not in str(err.value) and "someone/pickapic_v2" in str(err.value)


def test_missing_local_path_never_tries_the_hub(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    hub = pytest.importorskip("huggingface_hub")
    monkeypatch.setattr(hub, "snapshot_download", lambda *a, **k: pytest.fail("hub called"))
    with pytest.raises(DataSourceError, match="no such file"):
        load_preference_source(tmp_path / "nope.parquet")
    with pytest.raises(DataSourceError, match="no parquet files"):
        load_preference_source(str(tmp_path / "none-*.parquet"))
