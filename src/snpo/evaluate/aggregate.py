"""Report building blocks: tables (markdown + CSV), training curves, image grids.

They know nothing of how the numbers were made; the toy demo and ``snpo report`` both
write through them.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from snpo.errors import ConfigError


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and (population) standard deviation; std 0 for one value."""
    arr = np.asarray(values, dtype=np.float64)
    return float(arr.mean()), float(arr.std()) if len(arr) > 1 else 0.0


def fmt_mean_std(values: Sequence[float], digits: int = 3) -> str:
    m, s = mean_std(values)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def seed_means(scores: np.ndarray) -> np.ndarray:
    """Per-seed means of a ``(seeds, prompts)`` score table: the mean over prompts of each seed.

    The paper reports "the mean of 4 seeds": each seed's mean over the prompt set, then the
    mean (and spread) of those per-seed means.
    """
    arr = np.asarray(scores)  # no upcast: the toy report's numbers stay bit-identical
    if arr.ndim != 2:
        raise ConfigError(f"scores: expected a (seeds, prompts) table, got shape {arr.shape}")
    return arr.mean(axis=1)


def seed_mean_std(scores: np.ndarray) -> tuple[float, float]:
    """Mean and (population) std over seeds of the per-seed means (:func:`seed_means`)."""
    return mean_std(seed_means(scores))


def fmt_seed_mean_std(scores: np.ndarray, digits: int = 3) -> str:
    """``"mean ± std"`` over seeds of a ``(seeds, prompts)`` table, as the tables print it."""
    return fmt_mean_std(seed_means(scores), digits)


def win_rate(scores: np.ndarray, baseline: np.ndarray) -> float:
    """Fraction of paired cells (e.g. (seed, prompt)) where ``scores`` beats ``baseline``;
    ties count one half. Both arrays hold the same cells in the same order."""
    scores, baseline = np.asarray(scores), np.asarray(baseline)
    if scores.shape != baseline.shape:
        raise ConfigError(f"win_rate: shapes differ ({scores.shape} vs {baseline.shape})")
    return float(((scores > baseline) + 0.5 * (scores == baseline)).mean())


def fmt(value: float | None, digits: int = 3, percent: bool = False) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{100 * value:.1f}%" if percent else f"{value:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_csv(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def smooth(values: Sequence[float], window: int) -> np.ndarray:
    """Trailing moving average that ignores NaN (an empty branch in a step)."""
    arr = np.asarray(values, dtype=np.float64)
    out = np.full_like(arr, np.nan)
    for i in range(len(arr)):
        chunk = arr[max(0, i - window + 1) : i + 1]
        chunk = chunk[np.isfinite(chunk)]
        if len(chunk):
            out[i] = chunk.mean()
    return out


def plot_curves(
    histories: Mapping[str, Sequence[Mapping[str, float]]],
    keys: Sequence[str],
    path: Path,
    *,
    window: int = 10,
    title: str = "",
) -> None:
    """One panel per metric key, one line per run, smoothed with a moving average."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for name, history in histories.items():
            steps = [h["step"] for h in history if key in h]
            values = [h[key] for h in history if key in h]
            if steps:
                ax.plot(steps, smooth(values, window), label=name, linewidth=1.4)
        ax.set_title(key, fontsize=10)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if key.startswith("logratio") or key.startswith("rewards/margins"):
            ax.axhline(0, color="black", linewidth=0.6)
    axes[0][0].legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_xy(
    series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
    path: Path,
    *,
    xlabel: str,
    ylabel: str,
    title: str = "",
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(4.8, 3.4))
    for name, (x, y) in series.items():
        ax.plot(x, y, marker="o", label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    if title:
        ax.set_title(title, fontsize=10)
    if len(series) > 1:
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def image_grid(
    rows: Mapping[str, torch.Tensor | np.ndarray],
    path: Path,
    *,
    scale: int = 4,
    label_width: int = 110,
    column_labels: Sequence[str] | None = None,
) -> None:
    """A PNG with one labelled row per run; each row is (N, 3, H, W) images in [0, 1].

    Every row must hold the same prompts and seeds in the same order, so a column compares
    runs on one (prompt, seed).
    """
    from PIL import Image, ImageDraw

    arrays = {name: np.asarray(torch.as_tensor(images).float().clamp(0, 1)) for name, images in rows.items()}
    n, _, h, w = next(iter(arrays.values())).shape
    cell_h, cell_w, pad = h * scale, w * scale, 2
    header = 14 if column_labels else 0
    canvas = Image.new("RGB", (label_width + n * (cell_w + pad), header + len(arrays) * (cell_h + pad)), "white")
    draw = ImageDraw.Draw(canvas)
    if column_labels:
        for j, label in enumerate(column_labels):
            draw.text((label_width + j * (cell_w + pad), 1), str(label)[: cell_w // 6], fill="black")
    for i, (name, images) in enumerate(arrays.items()):
        y = header + i * (cell_h + pad)
        draw.text((3, y + cell_h // 2 - 5), name[: label_width // 6], fill="black")
        for j in range(n):
            tile = (images[j].transpose(1, 2, 0) * 255).round().astype(np.uint8)
            tile_img = Image.fromarray(tile).resize((cell_w, cell_h), Image.NEAREST)
            canvas.paste(tile_img, (label_width + j * (cell_w + pad), y))
    canvas.save(path)
