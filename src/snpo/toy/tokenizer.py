"""A word-level CLIP tokenizer for the toy world, built offline.

The real ``transformers.CLIPTokenizer`` class is used, with a vocabulary and BPE merges
learned here from the toy caption words, so every known word is one token and any other
word falls back to characters (nothing is out of vocabulary). The toy text encoder is then
a real ``CLIPTextModel``: the toy goes through the same code path as Stable Diffusion.
"""

from __future__ import annotations

import json
import string
from collections.abc import Iterable
from pathlib import Path

from transformers import CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"


def learn_bpe_merges(words: Iterable[str]) -> list[tuple[str, str]]:
    """Greedy BPE over the word list until every word is a single token.

    Encoding a training word with merges applied lowest rank first reproduces the
    training segmentation, so each word in ``words`` becomes exactly one token.
    """
    pieces = {w: [*w[:-1], w[-1] + "</w>"] for w in sorted(set(words))}
    merges: list[tuple[str, str]] = []
    while True:
        counts: dict[tuple[str, str], int] = {}
        for seq in pieces.values():
            for pair in zip(seq, seq[1:]):
                counts[pair] = counts.get(pair, 0) + 1
        if not counts:
            return merges
        best = max(sorted(counts), key=lambda p: counts[p])
        merges.append(best)
        for word, seq in pieces.items():
            merged, i = [], 0
            while i < len(seq):
                if i + 1 < len(seq) and (seq[i], seq[i + 1]) == best:
                    merged.append(seq[i] + seq[i + 1])
                    i += 2
                else:
                    merged.append(seq[i])
                    i += 1
            pieces[word] = merged


def build_toy_tokenizer(words: Iterable[str], folder: str | Path, *, max_length: int = 16) -> CLIPTokenizer:
    """Write vocab.json + merges.txt for ``words`` to ``folder`` and return the tokenizer."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    merges = learn_bpe_merges(words)
    vocab: dict[str, int] = {BOS: 0, EOS: 1}
    for char in string.ascii_lowercase + string.digits:
        vocab.setdefault(char, len(vocab))
        vocab.setdefault(char + "</w>", len(vocab))
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer(
        str(folder / "vocab.json"), str(folder / "merges.txt"),
        model_max_length=max_length, pad_token=EOS,
    )
    tokenizer.save_pretrained(folder)
    return tokenizer
