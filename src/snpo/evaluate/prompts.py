"""Prompt sets for evaluation: the unique captions of a Pick-a-Pic split, a text file, the
HPDv2 benchmark JSON and PartiPrompts TSV.

    prompt_set = load_prompts("pickapic_v2/data", split="test_unique")   # the paper's 500

Formats (``prompts_format``; ``auto`` tells them apart by the path):

- ``pickapic``: parquet shards (a file, a folder or a glob) with a ``caption`` column. Only
  that column is read (column projection: the JPEG bytes are never touched); captions are
  deduplicated in order of first appearance. The paper's prompts are the 500 unique ones of
  the test split, which Pick-a-Pic v2 ships as its own split ``test_unique``.
- ``txt``: one prompt per line; blank lines are skipped, nothing else is changed.
- ``hpdv2``: the HPSv2 benchmark: a style file (``anime.json``: a JSON list of prompts), the
  folder holding the four style files (``anime``, ``concept-art``, ``paintings``, ``photo``:
  read in that order), the ``{style: [prompts]}`` mapping ``hpsv2.benchmark_prompts("all")``
  returns, or HPDv2's ``test.json`` (a list of ``{"prompt": ..., ...}`` records; prompts are
  deduplicated). The style is kept as each prompt's category.
- ``partiprompts``: ``PartiPrompts.tsv`` (tab-separated, columns ``Prompt`` and ``Category``).

A prompt's index in its set names its images, so the order of a set is part of its identity.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from snpo.errors import ConfigError

PROMPT_FORMATS = ("auto", "pickapic", "txt", "hpdv2", "partiprompts")
#: the HPSv2 benchmark's styles, in the order ``hpsv2.benchmark_prompts("all")`` lists them
HPD_STYLES = ("anime", "concept-art", "paintings", "photo")
CAPTION_COLUMN = "caption"
PARTI_PROMPT_COLUMN = "Prompt"
PARTI_CATEGORY_COLUMN = "Category"


@dataclass(frozen=True)
class PromptSet:
    """Prompts in a fixed order, each with a category ("" when the format has none)."""

    prompts: list[str]
    categories: list[str]
    source: str  # where the prompts came from, for manifests and reports

    def __len__(self) -> int:
        return len(self.prompts)

    def head(self, limit: int | None) -> PromptSet:
        """The first ``limit`` prompts (all of them for None)."""
        if limit is None:
            return self
        return PromptSet(self.prompts[:limit], self.categories[:limit], self.source)


def _error(message: str) -> ValueError:
    # a one-line message starting with the config field: the CLI prints it without a traceback
    return ValueError(f"prompts: {message}")


def _unique(items: Iterable[tuple[str, str]]) -> tuple[list[str], list[str]]:
    """(prompt, category) pairs deduplicated on the prompt, in order of first appearance."""
    seen: set[str] = set()
    prompts, categories = [], []
    for prompt, category in items:
        if prompt in seen:
            continue
        seen.add(prompt)
        prompts.append(prompt)
        categories.append(category)
    return prompts, categories


def read_txt(path: str | Path) -> PromptSet:
    """One prompt per line; blank lines skipped; a trailing newline or CRLF is not part of it."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    prompts = [line for line in lines if line.strip()]
    return PromptSet(prompts, [""] * len(prompts), f"txt:{path}")


def read_pickapic(spec: str | Path, split: str | None = None) -> PromptSet:
    """Unique captions of Pick-a-Pic parquet shards, reading the ``caption`` column only."""
    import pyarrow.parquet as pq

    from snpo.data.parquet import list_parquet_files

    files = list_parquet_files(spec, split)

    def captions() -> Iterable[tuple[str, str]]:
        for file in files:
            handle = pq.ParquetFile(file)
            if CAPTION_COLUMN not in handle.schema_arrow.names:
                raise _error(f"{file} has no {CAPTION_COLUMN!r} column (not Pick-a-Pic)")
            for batch in handle.iter_batches(columns=[CAPTION_COLUMN]):
                for caption in batch.column(0).to_pylist():
                    if caption and caption.strip():
                        yield caption, ""

    prompts, categories = _unique(captions())
    where = f"pickapic:{spec}" + (f" (split {split})" if split else "")
    return PromptSet(prompts, categories, where)


def _hpd_records(data: object, style: str, where: str) -> Iterable[tuple[str, str]]:
    if isinstance(data, dict):
        for key, value in data.items():
            yield from _hpd_records(value, str(key), where)
        return
    if not isinstance(data, list):
        raise _error(f"{where}: expected a list of prompts or {{style: [prompts]}}")
    for item in data:
        if isinstance(item, str):
            yield item, style
        elif isinstance(item, dict) and isinstance(item.get("prompt"), str):
            yield item["prompt"], str(item.get("style", style))
        else:
            raise _error(
                f"{where}: expected prompt strings or records with 'prompt', got {item!r:.60}"
            )


def read_hpdv2(path: str | Path) -> PromptSet:
    """The HPSv2 benchmark prompts (see the module docstring for the accepted layouts)."""
    path = Path(path)
    if path.is_dir():
        files = [
            path / f"{style}.json" for style in HPD_STYLES if (path / f"{style}.json").is_file()
        ]
        if not files:
            raise _error(f"{path} holds none of {', '.join(s + '.json' for s in HPD_STYLES)}")
    else:
        files = [path]
    items: list[tuple[str, str]] = []
    for file in files:
        try:
            data = json.loads(file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise _error(f"{file} is not valid JSON (line {err.lineno})") from None
        style = file.stem if file.stem in HPD_STYLES else ""
        items.extend(_hpd_records(data, style, str(file)))
    prompts, categories = _unique(items)
    return PromptSet(prompts, categories, f"hpdv2:{path}")


def read_partiprompts(path: str | Path) -> PromptSet:
    """PartiPrompts' TSV: the ``Prompt`` column, ``Category`` as the category."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f, delimiter="\t")
        columns = reader.fieldnames or []
        if PARTI_PROMPT_COLUMN not in columns:
            raise _error(
                f"{path} has no {PARTI_PROMPT_COLUMN!r} column (columns: {', '.join(columns)})"
            )
        rows = [
            (row[PARTI_PROMPT_COLUMN] or "", row.get(PARTI_CATEGORY_COLUMN) or "") for row in reader
        ]
    rows = [(prompt, category) for prompt, category in rows if prompt.strip()]
    return PromptSet([p for p, _ in rows], [c for _, c in rows], f"partiprompts:{path}")


def detect_format(spec: str | Path) -> str:
    """The prompt format of a path, from its suffix or (for a folder) what it holds."""
    text = str(spec)
    if set("*?[") & set(text) or text.endswith(".parquet"):
        return "pickapic"
    path = Path(text).expanduser()
    if path.is_dir():
        if any((path / f"{style}.json").is_file() for style in HPD_STYLES):
            return "hpdv2"
        if next(path.rglob("*.parquet"), None) is not None:
            return "pickapic"
        raise _error(f"{path}: a folder with neither parquet shards nor HPDv2 style files")
    formats = {".txt": "txt", ".json": "hpdv2", ".tsv": "partiprompts"}
    if path.suffix.lower() in formats:
        return formats[path.suffix.lower()]
    choices = ", ".join(PROMPT_FORMATS[1:])
    raise _error(f"cannot tell the format of {text!r}; pass prompts_format (one of {choices})")


def load_prompts(
    spec: str | Path,
    prompts_format: str = "auto",
    *,
    split: str | None = None,
    limit: int | None = None,
) -> PromptSet:
    """Read a prompt set; ``limit`` keeps the first prompts. Errors are one line."""
    if prompts_format not in PROMPT_FORMATS:
        raise ConfigError(
            f"prompts_format: expected one of {', '.join(PROMPT_FORMATS)}, got {prompts_format!r}"
        )
    kind = detect_format(spec) if prompts_format == "auto" else prompts_format
    if kind != "pickapic" and not Path(spec).expanduser().exists():
        raise _error(f"no such file or folder {str(spec)!r}")
    if split is not None and kind != "pickapic":
        raise ConfigError(
            f"prompts_split: only Pick-a-Pic parquet has splits, {str(spec)!r} is {kind}"
        )
    path = Path(spec).expanduser() if kind != "pickapic" else spec
    readers = {"txt": read_txt, "hpdv2": read_hpdv2, "partiprompts": read_partiprompts}
    prompt_set = read_pickapic(path, split) if kind == "pickapic" else readers[kind](path)
    if not prompt_set.prompts:
        raise _error(f"{spec} holds no prompts")
    return prompt_set.head(limit)
