"""``snpo score``: per-image scores of sample folders with the paper's scorers.

    snpo score --samples samples/base,samples/snpo \\
        --scorers hpsv2,pickscore,aesthetic,image_reward \\
        --hpsv2 ckpt/HPS_v2_compressed.pt --hps-tokenizer ckpt/CLIP-ViT-H-14 \\
        --pickscore ckpt/PickScore_v1 --pickscore-processor ckpt/CLIP-ViT-H-14 \\
        --aesthetic ckpt/sac+logos+ava1-l14-linearMSE.pth \\
        --aesthetic-clip ckpt/clip-vit-large-patch14 \\
        --image-reward ckpt/ImageReward --image-reward-tokenizer ckpt/bert-base-uncased

Each scorer is the factory of ``snpo.scoring`` (``fn(images, prompts) -> scores``, at the
papers' scales: HPSv2 x 100, PickScore logit-scaled, ImageReward normalised). A weight flag
left out means the factory's default hub id, which must already be in the local Hugging Face
cache; nothing is downloaded, and missing weights stop with one line naming what to download
and which flag to point at it. Every scorer is built before any image is scored, so a missing
file stops the run at once.

Scores go to each sample folder's ``scores.jsonl`` (one line per image per scorer, with the
image's sha256) and ``scores.csv`` (one row per image, one column per scorer). A rerun scores
only what is missing: a new scorer, new images, or an image redrawn since (its sha256 changed).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from snpo.dtypes import DTYPE_SPELLINGS, DTYPES, torch_dtype
from snpo.errors import ConfigError
from snpo.evaluate import manifest as mf

#: the paper's four metrics (Table 1 order), the default of ``--scorers``
PAPER_SCORERS = ("hpsv2", "pickscore", "aesthetic", "image_reward")

#: scorer name -> {factory keyword: config key}; the first entry is the weights path (the
#: factory's positional argument). Config keys are the scorer modules' FLAG names with dashes
#: and dots as underscores (``--hpsv2.1`` -> ``hpsv2_1``).
SCORER_PATHS: dict[str, dict[str, str]] = {
    "pickscore": {"path": "pickscore", "processor": "pickscore_processor"},
    "hpsv2": {"path": "hpsv2", "tokenizer": "hps_tokenizer"},
    "hpsv2.1": {"path": "hpsv2_1", "tokenizer": "hps_tokenizer"},
    "aesthetic": {"path": "aesthetic", "clip": "aesthetic_clip"},
    "clip_score": {"path": "clip_score"},
    "image_reward": {"path": "image_reward", "tokenizer_path": "image_reward_tokenizer"},
}


def config_key(flag: str) -> str:
    """A command-line flag or YAML key as a config key: ``--hpsv2.1`` -> ``hpsv2_1``."""
    return flag.lstrip("-").replace("-", "_").replace(".", "_")


@dataclass
class ScoreConfig:
    """Settings of ``snpo score``; weight paths are local files/folders or cached hub ids."""

    samples: list[str] = field(default_factory=list)  # `snpo sample` folders to score
    scorers: list[str] = field(default_factory=lambda: list(PAPER_SCORERS))  # hpsv2, hpsv2.1, pickscore, aesthetic, image_reward, clip_score
    pickscore: str | None = None  # PickScore_v1 model folder or hub id
    pickscore_processor: str | None = None  # CLIP-ViT-H-14 processor folder (its tokenizer and image processor)
    hpsv2: str | None = None  # HPS_v2_compressed.pt (or .safetensors)
    hpsv2_1: str | None = None  # HPS_v2.1_compressed.pt (or .safetensors)
    hps_tokenizer: str | None = None  # CLIP BPE vocabulary: bpe_simple_vocab_16e6.txt.gz or a CLIP tokenizer folder
    aesthetic: str | None = None  # sac+logos+ava1-l14-linearMSE.pth (the LAION aesthetic MLP)
    aesthetic_clip: str | None = None  # clip-vit-large-patch14 folder (the embedding the MLP reads)
    clip_score: str | None = None  # CLIP model folder for CLIP score (default clip-vit-large-patch14)
    image_reward: str | None = None  # ImageReward.pt (and med_config.json beside it)
    image_reward_tokenizer: str | None = None  # bert-base-uncased tokenizer folder
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    dtype: str = "fp32"  # fp32 | fp16 | bf16 (float32 / float16 / bfloat16 accepted)
    batch_size: int = 16  # images per scorer forward
    show_progress: bool = True  # progress bars

    def __post_init__(self) -> None:
        if isinstance(self.dtype, str):
            self.dtype = DTYPE_SPELLINGS.get(self.dtype, self.dtype)

    def validate(self) -> None:
        from snpo.evaluate.sample import resolve_device
        from snpo.scoring import scorer_names

        if not self.samples:
            raise ConfigError("samples: required (one or more `snpo sample` output folders)")
        for folder in self.samples:
            if not (Path(folder) / mf.MANIFEST).is_file():
                raise ConfigError(
                    f"samples: {folder} has no {mf.MANIFEST} (not a `snpo sample` folder)"
                )
        if not self.scorers:
            raise ConfigError(f"scorers: expected one or more of {', '.join(scorer_names())}")
        for name in self.scorers:
            if name not in SCORER_PATHS:
                raise ConfigError(
                    f"scorers: unknown scorer {name!r}; choose from {', '.join(scorer_names())}"
                )
        if len(set(self.scorers)) != len(self.scorers):
            raise ConfigError(f"scorers: each scorer once, got {list(self.scorers)}")
        if self.batch_size < 1:
            raise ConfigError(f"batch_size: expected an integer >= 1, got {self.batch_size!r}")
        if self.dtype not in DTYPES:
            raise ConfigError(f"dtype: expected one of {', '.join(DTYPES)}, got {self.dtype!r}")
        resolve_device(self.device)

    def scorer_kwargs(self, name: str) -> tuple[Any, dict[str, Any]]:
        """(weights path or None for the factory default, other keyword arguments)."""
        path = None
        kwargs: dict[str, Any] = {}
        for keyword, key in SCORER_PATHS[name].items():
            value = getattr(self, key)
            if keyword == "path":
                path = value
            elif value is not None:
                kwargs[keyword] = value
        return path, kwargs


Scorer = Callable[..., Any]


def build_scorers(config: ScoreConfig) -> dict[str, Scorer]:
    """Every scorer ``config`` names, on its device and dtype (missing weights: one line)."""
    from snpo.evaluate.sample import resolve_device
    from snpo.scoring import make_scorer

    device, dtype = resolve_device(config.device), torch_dtype(config.dtype)
    scorers = {}
    for name in config.scorers:
        path, kwargs = config.scorer_kwargs(name)
        scorers[name] = make_scorer(
            name, path, device=device, dtype=dtype, batch_size=config.batch_size, **kwargs
        )
    return scorers


def read_scores(folder: str | Path) -> dict[tuple[str, str], dict[str, float]]:
    """``{(file, sha256): {scorer: score}}`` from a sample folder's ``scores.jsonl``."""
    records, _ = mf.read_jsonl(Path(folder) / mf.SCORES)
    scores: dict[tuple[str, str], dict[str, float]] = {}
    for r in records:
        try:
            scores.setdefault((r["file"], r["sha256"]), {})[r["scorer"]] = float(r["score"])
        except (KeyError, TypeError, ValueError):
            continue  # a record from another version or a torn line: ignored
    return scores


def scored_images(folder: str | Path) -> list[dict[str, Any]]:
    """The folder's valid manifest records, each with ``scores``: {scorer: score} for its
    current PNG (scores of an image since redrawn are not carried over)."""
    scores = read_scores(folder)
    records = mf.read_manifest(folder)
    for record in records:
        record["scores"] = scores.get((record["file"], record["sha256"]), {})
    return sorted(records, key=lambda r: (int(r["seed"]), int(r["prompt_index"])))


def write_scores_csv(folder: str | Path, scorer_order: list[str] | None = None) -> Path:
    """``scores.csv``: one row per image (seed, then prompt order), one column per scorer."""
    from snpo.evaluate.aggregate import write_csv

    folder = Path(folder)
    records = scored_images(folder)
    names = list(scorer_order or [])
    for record in records:
        names += [n for n in record["scores"] if n not in names]
    rows = [
        [
            r["file"],
            r["prompt_index"],
            r["seed"],
            r.get("category", ""),
            r["prompt"],
            *[r["scores"].get(n, "") for n in names],
        ]
        for r in records
    ]
    path = folder / mf.SCORES_CSV
    write_csv(path, ["file", "prompt_index", "seed", "category", "prompt", *names], rows)
    return path


@dataclass
class ScoreResult:
    folder: Path
    scored: int  # (image, scorer) scores computed by this call
    skipped: int  # (image, scorer) scores already present


def score_folder(
    folder: str | Path,
    scorers: dict[str, Scorer],
    *,
    batch_size: int = 16,
    show_progress: bool = False,
) -> ScoreResult:
    """Score every image of ``folder`` that a scorer has not scored yet (resumable)."""
    from PIL import Image
    from tqdm.auto import tqdm

    folder = Path(folder)
    records = scored_images(folder)
    todo = [r for r in records if any(name not in r["scores"] for name in scorers)]
    skipped = sum(name in r["scores"] for r in records for name in scorers)
    scored = 0
    batches = [todo[i : i + batch_size] for i in range(0, len(todo), batch_size)]
    for batch in tqdm(
        batches, desc=f"score {folder.name}", unit="batch", disable=not show_progress
    ):
        images = []
        for r in batch:
            with Image.open(folder / r["file"]) as im:
                images.append(im.convert("RGB"))
        prompts = [r["prompt"] for r in batch]
        lines = []
        for name, scorer in scorers.items():
            rows = [i for i, r in enumerate(batch) if name not in r["scores"]]
            if not rows:
                continue
            values = scorer([images[i] for i in rows], [prompts[i] for i in rows])
            for i, value in zip(rows, values.tolist()):
                lines.append(
                    {
                        "file": batch[i]["file"],
                        "sha256": batch[i]["sha256"],
                        "scorer": name,
                        "score": float(value),
                    }
                )
        mf.append_jsonl(folder / mf.SCORES, lines)  # a batch's scores land in one write
        scored += len(lines)
    write_scores_csv(folder, list(scorers))
    return ScoreResult(folder, scored, skipped)


def run_score(config: ScoreConfig) -> list[ScoreResult]:
    """Build every scorer, then score each sample folder in turn."""
    config.validate()
    scorers = build_scorers(config)
    return [
        score_folder(
            folder, scorers, batch_size=config.batch_size, show_progress=config.show_progress
        )
        for folder in config.samples
    ]
