"""``snpo report``: several scored sample folders (runs) side by side, in the paper's layout.

    snpo report --runs samples/base,samples/dpo,samples/snpo --names base,dpo,snpo \\
        --baseline base --output_dir report

Writes ``report.md`` and ``results.csv`` (one row per run: mean and spread of each metric,
win rate against the baseline), ``per_seed.csv`` (each seed's mean) and ``samples.png`` (one
row per run, the same prompts and seeds in every column).

The numbers, computed by the same functions as the toy demo's report (``snpo.evaluate.aggregate``):

- runs are compared on the same images only: the seeds every run has, and the prompts every
  run has for all of those seeds under every metric (what is left out is listed);
- a run's score for a metric is the mean over prompts for each seed, then the mean of those
  per-seed means, with their (population) standard deviation as the spread: the paper's
  "mean of 4 seeds";
- the win rate of a run against the baseline is the fraction of (prompt, seed) images where
  its score is higher than the baseline's on the same prompt and seed; ties count one half.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from snpo.errors import ConfigError
from snpo.evaluate import manifest as mf
from snpo.evaluate.score import scored_images

#: metric order of the paper's Table 1, then the others; names as printed
METRIC_ORDER = ("hpsv2", "pickscore", "aesthetic", "image_reward", "hpsv2.1", "clip_score")
METRIC_NAMES = {
    "hpsv2": "HPSv2",
    "hpsv2.1": "HPSv2.1",
    "pickscore": "PickScore",
    "aesthetic": "Aesthetic",
    "image_reward": "ImageReward",
    "clip_score": "CLIP score",
}
#: decimals as the paper prints them (HPSv2 27.23, PickScore 22.24, Aesthetic 5.626, IR 0.694)
METRIC_DIGITS = {
    "hpsv2": 2,
    "hpsv2.1": 2,
    "pickscore": 2,
    "aesthetic": 3,
    "image_reward": 3,
    "clip_score": 2,
}

#: sampling settings that should agree between compared runs (CHATS' guidance scale differs
#: on purpose, so guidance is not among them)
COMPARABLE_SETTINGS = ("num_inference_steps", "scheduler", "resolution", "dtype")


@dataclass
class ReportConfig:
    """Settings of ``snpo report``."""

    runs: list[str] = field(default_factory=list)  # scored `snpo sample` folders
    names: list[str] | None = None  # one per run; default: the folders' names
    baseline: str | None = None  # a run's name (or folder); default: the first run
    metrics: list[str] | None = None  # default: every scorer all runs have, paper order first
    output_dir: str = "snpo-report"  # report.md, results.csv, samples.png
    grid_prompts: int = 6  # prompts (rows) in samples.png
    grid_seeds: int = 1  # seeds per prompt in samples.png
    grid_cell: int = 128  # pixels per image in samples.png

    def validate(self) -> None:
        if not self.runs:
            raise ConfigError("runs: required (one or more scored `snpo sample` folders)")
        for folder in self.runs:
            if not (Path(folder) / mf.MANIFEST).is_file():
                raise ConfigError(
                    f"runs: {folder} has no {mf.MANIFEST} (not a `snpo sample` folder)"
                )
        if self.names is not None and len(self.names) != len(self.runs):
            raise ConfigError(
                f"names: expected one per run ({len(self.runs)}), got {len(self.names)}"
            )
        names = self.run_names()
        if len(set(names)) != len(names):
            raise ConfigError(f"names: runs need distinct names, got {names}; pass names")
        if self.baseline is not None:
            self.baseline_index()
        for key in ("grid_prompts", "grid_seeds"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: expected an integer >= 0, got {getattr(self, key)!r}")
        if self.grid_cell < 8:
            raise ConfigError(f"grid_cell: expected at least 8 pixels, got {self.grid_cell!r}")

    def run_names(self) -> list[str]:
        return list(self.names) if self.names else [Path(r).resolve().name for r in self.runs]

    def baseline_index(self) -> int:
        if self.baseline is None:
            return 0
        names = self.run_names()
        if self.baseline in names:
            return names.index(self.baseline)
        folders = [Path(r).resolve() for r in self.runs]
        if Path(self.baseline).resolve() in folders:
            return folders.index(Path(self.baseline).resolve())
        raise ConfigError(f"baseline: {self.baseline!r} is none of the runs ({', '.join(names)})")


@dataclass
class Run:
    """One run's scores on the common (seed, prompt) grid."""

    name: str
    folder: Path
    scores: dict[str, np.ndarray]  # metric -> (seeds, prompts)
    files: np.ndarray  # (seeds, prompts) image paths relative to the folder
    settings: dict[str, Any]
    dropped: int  # scored images left out of the comparison


@dataclass
class Comparison:
    runs: list[Run]
    metrics: list[str]
    seeds: list[int]
    prompts: list[tuple[int, str]]  # (prompt index, prompt)
    baseline: int

    def row(self, run: Run) -> dict[str, Any]:
        """The numbers of one run: ``{metric}_mean``, ``_std``, ``_win`` (None for the baseline)."""
        from snpo.evaluate.aggregate import seed_mean_std, win_rate

        base = self.runs[self.baseline]
        out: dict[str, Any] = {}
        for metric in self.metrics:
            out[f"{metric}_mean"], out[f"{metric}_std"] = seed_mean_std(run.scores[metric])
            out[f"{metric}_win"] = (
                None if run is base else win_rate(run.scores[metric], base.scores[metric])
            )
        return out


def compare(config: ReportConfig) -> Comparison:
    """Read every run and put their scores on the common (seed, prompt) grid."""
    names = config.run_names()
    per_run = [scored_images(folder) for folder in config.runs]
    for name, records in zip(names, per_run):
        if not any(r["scores"] for r in records):
            raise ConfigError(f"runs: {name} has no scores; run `snpo score` on it first")
    available = [{m for r in records for m in r["scores"]} for records in per_run]
    if config.metrics:
        metrics = list(config.metrics)
        for name, have in zip(names, available):
            missing = [m for m in metrics if m not in have]
            if missing:
                raise ConfigError(f"metrics: run {name} has no {', '.join(missing)} scores")
    else:
        common = set.intersection(*available)
        metrics = [m for m in METRIC_ORDER if m in common] + sorted(common - set(METRIC_ORDER))
        if not metrics:
            raise ConfigError("metrics: the runs share no scorer; score them with the same scorers")

    # cell -> record, keeping only images scored under every metric
    cells = [
        {
            (int(r["seed"]), int(r["prompt_index"]), r["prompt"]): r
            for r in records
            if all(m in r["scores"] for m in metrics)
        }
        for records in per_run
    ]
    seeds = sorted(set.intersection(*({s for s, _, _ in c} for c in cells)))
    prompt_keys = set.intersection(
        *({(i, p) for (_, i, p) in c if all((s, i, p) in c for s in seeds)} for c in cells)
    )
    prompts = sorted(prompt_keys)
    if not seeds or not prompts:
        raise ConfigError(
            "runs: no (prompt, seed) image is scored in every run; were they sampled "
            "from the same prompt set and seeds?"
        )
    runs = []
    for name, folder, c, records in zip(names, config.runs, cells, per_run):
        grid = [[c[(s, i, p)] for i, p in prompts] for s in seeds]
        scores = {
            m: np.array([[r["scores"][m] for r in row] for row in grid], dtype=np.float64)
            for m in metrics
        }
        files = np.array([[r["file"] for r in row] for row in grid], dtype=object)
        settings_path = Path(folder) / mf.SETTINGS
        settings = json.loads(settings_path.read_text()) if settings_path.is_file() else {}
        dropped = sum(bool(r["scores"]) for r in records) - len(seeds) * len(prompts)
        runs.append(Run(name, Path(folder), scores, files, settings, dropped))
    return Comparison(runs, metrics, seeds, prompts, config.baseline_index())


def _thumbnail(path: Path, cell: int) -> np.ndarray:
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        if im.size != (cell, cell):
            im = im.resize(
                (cell, cell),
                Image.Resampling.LANCZOS if im.width > cell else Image.Resampling.NEAREST,
            )
        return np.asarray(im, dtype=np.float32).transpose(2, 0, 1) / 255.0


def write_grid(
    comparison: Comparison, path: Path, *, prompts: int, seeds: int, cell: int
) -> list[tuple[int, str]]:
    """``samples.png``: one row per run, columns the first prompts x the first seeds; returns
    the (prompt index, prompt) of its columns."""
    from snpo.evaluate.aggregate import image_grid

    columns = [
        (si, pi)
        for si in range(min(seeds, len(comparison.seeds)))
        for pi in range(min(prompts, len(comparison.prompts)))
    ]
    if not columns:
        return []
    rows = {
        run.name: np.stack([_thumbnail(run.folder / run.files[si, pi], cell) for si, pi in columns])
        for run in comparison.runs
    }
    labels = [f"p{comparison.prompts[pi][0]} s{comparison.seeds[si]}" for si, pi in columns]
    image_grid(rows, path, scale=1, column_labels=labels)
    shown = sorted({pi for _, pi in columns})
    return [comparison.prompts[pi] for pi in shown]


def _describe(run: Run) -> str:
    """One line per run: its model spec and sampling settings (``sample_settings.json``)."""
    model = run.settings.get("model", {})
    sampling = run.settings.get("sampling", {})
    parts = "; ".join(f"{k}={v}" for k, v in model.items() if v is not None) or "settings unknown"
    setting = ", ".join(f"{k} {v}" for k, v in sampling.items() if v is not None)
    return f"- **{run.name}** (`{run.folder}`): {parts}" + (f" ({setting})" if setting else "")


def run_report(config: ReportConfig) -> Path:
    """Write ``report.md``, ``results.csv``, ``per_seed.csv`` and ``samples.png``."""
    from snpo.evaluate.aggregate import (
        fmt,
        fmt_seed_mean_std,
        markdown_table,
        seed_means,
        write_csv,
    )

    config.validate()
    comparison = compare(config)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    metrics, base = comparison.metrics, comparison.runs[comparison.baseline]
    rows = {run.name: comparison.row(run) for run in comparison.runs}

    header = ["run", "folder", "seeds", "prompts"]
    for m in metrics:
        header += [f"{m}_mean", f"{m}_std", f"{m}_win"]
    write_csv(
        out / "results.csv",
        header,
        [
            [
                run.name,
                str(run.folder),
                len(comparison.seeds),
                len(comparison.prompts),
                *[
                    rows[run.name][f"{m}_{part}"]
                    for m in metrics
                    for part in ("mean", "std", "win")
                ],
            ]
            for run in comparison.runs
        ],
    )
    write_csv(
        out / "per_seed.csv",
        ["run", "metric", "seed", "mean"],
        [
            [run.name, m, seed, value]
            for run in comparison.runs
            for m in metrics
            for seed, value in zip(comparison.seeds, seed_means(run.scores[m]))
        ],
    )
    grid_prompts = write_grid(
        comparison,
        out / "samples.png",
        prompts=config.grid_prompts,
        seeds=config.grid_seeds,
        cell=config.grid_cell,
    )

    titles = [METRIC_NAMES.get(m, m) for m in metrics]
    score_table = markdown_table(
        ["method", *titles],
        [
            [
                run.name,
                *[fmt_seed_mean_std(run.scores[m], METRIC_DIGITS.get(m, 3)) for m in metrics],
            ]
            for run in comparison.runs
        ],
    )
    win_table = markdown_table(
        ["method", *titles],
        [
            [run.name, *[fmt(rows[run.name][f"{m}_win"], percent=True) for m in metrics]]
            for run in comparison.runs
            if run is not base
        ],
    )
    md = [
        "# Evaluation report\n",
        f"{len(comparison.runs)} runs on the same {len(comparison.prompts)} prompts x "
        f"{len(comparison.seeds)} seeds ({', '.join(map(str, comparison.seeds))}). Each cell is "
        "the mean over seeds of each seed's mean over prompts, ± the standard deviation over "
        "seeds (population).\n",
        "## Scores\n",
        score_table,
        "",
        f"## Win rate against {base.name}\n",
        f"Share of (prompt, seed) images where the run scores higher than {base.name} on the same "
        "prompt and seed; ties count one half.\n",
        win_table if len(comparison.runs) > 1 else "(one run: nothing to compare)",
        "",
        "## Runs\n",
        *[_describe(run) for run in comparison.runs],
        "",
    ]
    differing = [
        key
        for key in COMPARABLE_SETTINGS
        if len({json.dumps(r.settings.get("sampling", {}).get(key)) for r in comparison.runs}) > 1
    ]
    if differing:
        md += [f"Note: the runs were sampled with different {', '.join(differing)}.\n"]
    dropped = [(run.name, run.dropped) for run in comparison.runs if run.dropped]
    if dropped:
        md += [
            "Left out (scored images without a counterpart in every run): "
            + ", ".join(f"{name} {n}" for name, n in dropped)
            + ".\n"
        ]
    if grid_prompts:
        md += [
            "## Samples (same prompts and seeds in every row)\n",
            "![samples](samples.png)\n",
            "Prompts: " + "; ".join(f"p{i}: {p}" for i, p in grid_prompts) + "\n",
        ]
    (out / "report.md").write_text("\n".join(md) + "\n")
    return out
