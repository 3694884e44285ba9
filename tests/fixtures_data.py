"""Builders of small preference datasets on disk, for tests (of the data layer and others).

Every image is a solid colour, so a test can tell which image it got back from the pixels
alone: winners are dark (channels in [0, 100]), losers light (channels in [155, 255]). Each
builder returns a ``FixtureInfo`` describing what it wrote (per row: the caption, its kind,
the expected winner and loser colours), derived from the construction plan only, never from
the code under test.

Usable from any test module in ``tests/``: ``from fixtures_data import make_pickapic_parquet``.
"""

from __future__ import annotations

import csv
import io
import json
import math
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

RGB = tuple[int, int, int]

PICKAPIC_BAD_KINDS = ("unreadable_image", "empty_caption", "bad_label", "duplicate_pair", "overlong_caption")
LOCAL_BAD_KINDS = ("unreadable_image", "empty_caption", "duplicate_pair", "malformed_row", "overlong_caption")
# An over-long caption: longer than TrainConfig.max_caption_chars (2000) by default.
OVERLONG_CAPTION_CHARS = 3000
# Injected defects cycle through these variants, so that every variant gets exercised.
EMPTY_CAPTIONS = ("", "   ", None)
BAD_LABELS = ((2.0, -1.0), (math.nan, math.nan), (1.0, 1.0), (0.3, 0.7), (None, None))
BAD_BYTES = ("garbage", "truncated", "empty")
BAD_FILES = ("missing", "empty", "garbage")


@dataclass
class FixtureRow:
    """One written row: ``kind`` is "ok", "tie" or the injected defect."""

    caption: str | None
    kind: str
    winner_rgb: RGB | None  # the colour the chosen image must have (image 0 for a kept tie)
    loser_rgb: RGB | None
    winner_index: int | None = None  # Pick-a-Pic: which column won (None for ties)
    key: str = ""


@dataclass
class FixtureInfo:
    """What a builder wrote: the file and the rows in file order."""

    path: Path
    rows: list[FixtureRow] = field(default_factory=list)

    @property
    def expected_counts(self) -> dict[str, int]:
        """Rows per non-ok kind, e.g. ``{"tie": 4, "bad_label": 1}``."""
        return dict(Counter(r.kind for r in self.rows if r.kind != "ok"))

    @property
    def ok_rows(self) -> list[FixtureRow]:
        return [r for r in self.rows if r.kind == "ok"]

    def by_caption(self, caption: str) -> FixtureRow:
        """The first row with this caption (duplicates share the caption of their original)."""
        return next(r for r in self.rows if r.caption == caption)


def overlong_caption(row: int) -> str:
    """A caption of ``OVERLONG_CAPTION_CHARS`` characters (distinct per row)."""
    head = f"prompt {row} "
    return head + "x" * (OVERLONG_CAPTION_CHARS - len(head))


def zero_byte_shard(path: str | Path) -> Path:
    """An empty file with a parquet name: what a cut-off upload or a full disk leaves."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"")
    return path


def solid_image(rgb: RGB, size: tuple[int, int] = (24, 32)) -> Image.Image:
    """A solid RGB image of ``size = (height, width)``."""
    return Image.new("RGB", (size[1], size[0]), rgb)


def encode(image: Image.Image, fmt: str = "JPEG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **({"quality": 95} if fmt == "JPEG" else {}))
    return buf.getvalue()


def _colours(rng: np.random.Generator) -> tuple[RGB, RGB]:
    winner = tuple(int(v) for v in rng.integers(0, 101, size=3))
    loser = tuple(int(v) for v in rng.integers(155, 256, size=3))
    return winner, loser  # type: ignore[return-value]


def _plan(n_rows: int, n_ties: int, bad: dict[str, int], allowed: tuple[str, ...], rng) -> list:
    unknown = set(bad) - set(allowed)
    if unknown:
        raise ValueError(f"unknown bad row kinds {sorted(unknown)}; allowed: {allowed}")
    n_ok = n_rows - n_ties - sum(bad.values())
    if n_ok < 0:
        raise ValueError("more ties and bad rows than rows")
    if bad.get("duplicate_pair") and n_ok == 0:
        raise ValueError("duplicate_pair rows need at least one ok row to duplicate")
    rest = ["tie"] * n_ties + [k for k, n in bad.items() for _ in range(n)] + ["ok"] * n_ok
    if n_ok:  # the first row is ok, so every duplicate has an earlier original
        rest.remove("ok")
        return ["ok"] + [rest[i] for i in rng.permutation(len(rest))]
    return [rest[i] for i in rng.permutation(len(rest))]


def make_pickapic_parquet(
    path: str | Path,
    n_rows: int,
    *,
    with_ties: bool = True,
    both_orders: bool = True,
    bad_rows: dict[str, int] | None = None,
    image_size: tuple[int, int] = (24, 32),
    seed: int = 0,
    row_group_size: int | None = None,
    drop_columns: tuple[str, ...] = (),
    caption_prefix: str = "",
) -> FixtureInfo:
    """Write a Pick-a-Pic v2 style parquet file with real JPEG bytes.

    Args:
        n_rows: rows written, ties and bad rows included.
        with_ties: make ``n_rows // 5`` rows ties (labels 0.5/0.5).
        both_orders: alternate the winner between ``jpg_0`` and ``jpg_1`` (else always 0).
        bad_rows: defects to inject, e.g. ``{"unreadable_image": 2, "bad_label": 1}``; kinds
            in ``PICKAPIC_BAD_KINDS``. Each bad row has exactly one defect.
        image_size: ``(height, width)`` of every image.
        row_group_size: rows per parquet row group (None: pyarrow's default, one group).
        drop_columns: columns to leave out (to test missing-column errors).
        caption_prefix: prefix of the captions ``"prompt <row>"`` (keep shards distinct).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    bad = dict(bad_rows or {})
    kinds = _plan(n_rows, n_rows // 5 if with_ties else 0, bad, PICKAPIC_BAD_KINDS, rng)
    info = FixtureInfo(path)
    cols: dict[str, list[Any]] = {
        k: []
        for k in (
            "caption",
            "jpg_0",
            "jpg_1",
            "label_0",
            "label_1",
            "image_0_uid",
            "image_1_uid",
            "ranking_id",
            "best_image_uid",
        )
    }
    variant = Counter()
    for r, kind in enumerate(kinds):
        caption = f"{caption_prefix}prompt {r}"
        winner_rgb, loser_rgb = _colours(rng)
        win = (r % 2) if both_orders else 0
        label_0, label_1 = (1.0, 0.0) if win == 0 else (0.0, 1.0)
        winner_bytes = encode(solid_image(winner_rgb, image_size))
        loser_bytes = encode(solid_image(loser_rgb, image_size))
        uids = [f"{seed}-{r}-0", f"{seed}-{r}-1"]
        if kind == "tie":
            label_0 = label_1 = 0.5
            win = None
        elif kind == "empty_caption":
            caption = EMPTY_CAPTIONS[variant[kind] % len(EMPTY_CAPTIONS)]
        elif kind == "overlong_caption":
            caption = overlong_caption(r)
        elif kind == "bad_label":
            label_0, label_1 = BAD_LABELS[variant[kind] % len(BAD_LABELS)]
        elif kind == "unreadable_image":
            mode = BAD_BYTES[variant[kind] % len(BAD_BYTES)]
            if mode == "garbage":
                winner_bytes = f"not an image {r}".encode()
            elif mode == "truncated":
                # headers intact, end of the scan cut: opens fine, fails only when decoded
                winner_bytes = winner_bytes[:-10]
            else:
                winner_bytes = b""
        variant[kind] += 1
        images = [winner_bytes, loser_bytes] if win in (0, None) else [loser_bytes, winner_bytes]
        row = FixtureRow(caption, kind, winner_rgb, loser_rgb, win, key=f"{path.name}:{r}")
        if kind == "duplicate_pair":  # an exact copy of a random earlier ok row
            ok_before = [i for i, k in enumerate(kinds[:r]) if k == "ok"]
            src = ok_before[int(rng.integers(len(ok_before)))]
            orig = info.rows[src]
            row = FixtureRow(orig.caption, kind, orig.winner_rgb, orig.loser_rgb, orig.winner_index)
            row.key = f"{path.name}:{r}"
            caption = cols["caption"][src]
            images = [cols["jpg_0"][src], cols["jpg_1"][src]]
            label_0, label_1 = cols["label_0"][src], cols["label_1"][src]
            uids = [cols["image_0_uid"][src], cols["image_1_uid"][src]]
        info.rows.append(row)
        cols["caption"].append(caption)
        cols["jpg_0"].append(images[0])
        cols["jpg_1"].append(images[1])
        cols["label_0"].append(label_0)
        cols["label_1"].append(label_1)
        cols["image_0_uid"].append(uids[0])
        cols["image_1_uid"].append(uids[1])
        cols["ranking_id"].append(r)
        cols["best_image_uid"].append("" if win is None else uids[win])
    schema = pa.schema(
        [
            ("caption", pa.string()),
            ("jpg_0", pa.binary()),
            ("jpg_1", pa.binary()),
            ("label_0", pa.float64()),
            ("label_1", pa.float64()),
            ("image_0_uid", pa.string()),
            ("image_1_uid", pa.string()),
            ("ranking_id", pa.int64()),
            ("best_image_uid", pa.string()),
        ]
    )
    table = pa.table(cols, schema=schema)
    table = table.drop_columns([c for c in drop_columns if c in table.column_names])
    pq.write_table(table, path, row_group_size=row_group_size)
    return info


def _pair_rows(n_rows: int, bad: dict[str, int], seed: int, allowed: tuple[str, ...]):
    """Plan of prompt/chosen/rejected rows: (kind, prompt, winner_rgb, loser_rgb, variant)."""
    rng = np.random.default_rng(seed)
    kinds = _plan(n_rows, 0, bad, allowed, rng)
    variant: Counter[str] = Counter()
    rows = []
    for r, kind in enumerate(kinds):
        winner, loser = _colours(rng)
        rows.append((kind, f"prompt {r}", winner, loser, variant[kind]))
        variant[kind] += 1
    return rows, rng


def make_local_pairs(
    folder: str | Path,
    n_rows: int,
    *,
    fmt: str = "jsonl",
    bad_rows: dict[str, int] | None = None,
    image_size: tuple[int, int] = (24, 32),
    seed: int = 0,
    image_dir: str = "images",
) -> FixtureInfo:
    """Write ``folder/pairs.{jsonl,csv}`` with paths relative to ``folder`` and PNG images.

    ``bad_rows`` kinds: ``LOCAL_BAD_KINDS`` (``malformed_row``: a non-JSON line, JSONL only;
    ``unreadable_image`` cycles through a missing, an empty and a garbage file).
    """
    if fmt not in ("jsonl", "csv"):
        raise ValueError("fmt must be 'jsonl' or 'csv'")
    folder = Path(folder)
    (folder / image_dir).mkdir(parents=True, exist_ok=True)
    path = folder / f"pairs.{fmt}"
    rows, _ = _pair_rows(n_rows, dict(bad_rows or {}), seed, LOCAL_BAD_KINDS)
    info = FixtureInfo(path)
    records: list[dict[str, str] | str] = []
    for r, (kind, prompt, winner, loser, var) in enumerate(rows):
        chosen, rejected = f"{image_dir}/{r}_chosen.png", f"{image_dir}/{r}_rejected.png"
        solid_image(winner, image_size).save(folder / chosen)
        solid_image(loser, image_size).save(folder / rejected)
        if kind == "empty_caption":
            prompt = EMPTY_CAPTIONS[var % 2]  # None cannot be told from "" in a CSV
        elif kind == "overlong_caption":
            prompt = overlong_caption(r)
        elif kind == "unreadable_image":
            mode = BAD_FILES[var % len(BAD_FILES)]
            target = folder / chosen
            if mode == "missing":
                target.unlink()
            else:
                target.write_bytes(b"" if mode == "empty" else b"garbage, not a png")
        elif kind == "duplicate_pair":
            src = next(i for i, row in enumerate(rows) if row[0] == "ok")
            prev = records[src]
            assert isinstance(prev, dict)
            records.append(dict(prev))
            info.rows.append(FixtureRow(prev["prompt"], kind, rows[src][2], rows[src][3]))
            continue
        elif kind == "malformed_row":
            if fmt == "csv":
                raise ValueError("malformed_row is for JSONL fixtures only")
            records.append("{this is not json")
            info.rows.append(FixtureRow(None, kind, None, None))
            continue
        records.append({"prompt": prompt, "chosen": chosen, "rejected": rejected, "extra": r})
        info.rows.append(FixtureRow(prompt, kind, winner, loser))
    if fmt == "jsonl":
        lines = [rec if isinstance(rec, str) else json.dumps(rec) for rec in records]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        for i, row in enumerate(info.rows):
            row.key = f"{path.name}:{i + 1}"
    else:
        with path.open("w", newline="", encoding="utf-8") as fh:
            writer = csv.DictWriter(fh, fieldnames=["prompt", "chosen", "rejected", "extra"])
            writer.writeheader()
            writer.writerows(rec for rec in records if isinstance(rec, dict))
        for i, row in enumerate(info.rows):
            row.key = f"{path.name}:{i + 2}"
    return info


def hf_pair_columns(
    n_rows: int, *, image_size: tuple[int, int] = (24, 32), seed: int = 0, as_pil: bool = True
) -> tuple[dict[str, list], FixtureInfo]:
    """Columns ``prompt, chosen, rejected`` for ``datasets.Dataset.from_dict`` (PIL images),
    or, with ``as_pil=False``, ``{"bytes", "path"}`` dicts of PNG bytes as datasets stores."""
    rows, _ = _pair_rows(n_rows, {}, seed, ())
    info = FixtureInfo(Path("<memory>"))
    cols: dict[str, list] = {"prompt": [], "chosen": [], "rejected": []}
    for r, (_, prompt, winner, loser, _) in enumerate(rows):
        images = [solid_image(winner, image_size), solid_image(loser, image_size)]
        if not as_pil:
            images = [
                {"bytes": encode(im, "PNG"), "path": f"{r}_{i}.png"} for i, im in enumerate(images)
            ]
        cols["prompt"].append(prompt)
        cols["chosen"].append(images[0])
        cols["rejected"].append(images[1])
        info.rows.append(FixtureRow(prompt, "ok", winner, loser))
    return cols, info


def make_hf_pairs_parquet(
    path: str | Path,
    n_rows: int,
    *,
    image_size: tuple[int, int] = (24, 32),
    seed: int = 0,
    row_group_size: int | None = None,
) -> FixtureInfo:
    """Write a parquet with ``prompt`` and ``chosen``/``rejected`` stored the way ``datasets``
    stores an ``Image`` column: ``struct<bytes: binary, path: string>``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    cols, info = hf_pair_columns(n_rows, image_size=image_size, seed=seed, as_pil=False)
    image_type = pa.struct([("bytes", pa.binary()), ("path", pa.string())])
    schema = pa.schema([("prompt", pa.string()), ("chosen", image_type), ("rejected", image_type)])
    pq.write_table(pa.table(cols, schema=schema), path, row_group_size=row_group_size)
    info.path = path
    for r, row in enumerate(info.rows):
        row.key = f"{path.name}:{r}"
    return info


def mean_rgb(pixels: Any) -> RGB:
    """Mean colour (0..255) of a (3, H, W) tensor in [-1, 1]."""
    values = ((pixels.float().mean(dim=(1, 2)) + 1.0) * 127.5).tolist()
    return tuple(round(v) for v in values)  # type: ignore[return-value]


def close_rgb(a: RGB, b: RGB, tol: int = 6) -> bool:
    """True when two colours differ by at most ``tol`` in every channel (JPEG is lossy)."""
    return all(abs(x - y) <= tol for x, y in zip(a, b))
