"""HPSv2's tokenizer: open_clip's ``SimpleTokenizer``, re-implemented id for id.

``hpsv2.score`` tokenises with ``get_tokenizer('ViT-H-14')`` of the open_clip copy it bundles
(``hpsv2/src/open_clip/tokenizer.py``; open_clip_torch 3.3's ``SimpleTokenizer`` with its default
``clean='lower'`` gives the same ids). transformers' ``CLIPTokenizer`` does not: it skips the
text cleaning below, so curly quotes, HTML entities, ligatures and full-width letters -- common
in user-typed prompts such as Pick-a-Pic's -- get other ids. This module reproduces the original:

1. clean: ``ftfy.fix_text`` (ftfy's defaults), ``html.unescape`` twice, strip, collapse every run
   of whitespace (``regex``'s ``\\s+``) to one space, strip, lower-case;
2. split with ``<start_of_text>|<end_of_text>|'s|'t|'re|'ve|'m|'ll|'d|[\\p{L}]+|[\\p{N}]|[^\\s\\p{L}\\p{N}]+``
   (``regex``, case-insensitive); the two special names typed in a prompt become the special ids;
3. each piece: UTF-8 bytes -> the GPT-2 byte-to-unicode alphabet -> BPE with the merge ranks,
   ``</w>`` marking the end of the piece;
4. ``[sot] + ids + [eot]``; longer than the context (77): cut to 77 and put ``eot`` in the last
   place; pad with 0 (which is also the id of ``!``, so the mask comes from the length).

The vocabulary is CLIP's BPE (``bpe_simple_vocab_16e6.txt.gz``, MIT, (c) 2021 OpenAI): read from
that file as open_clip does, or from a Hugging Face CLIP tokenizer folder (``vocab.json`` +
``merges.txt``, or ``tokenizer.json``), e.g. ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``, whose
``<|startoftext|>``/``<|endoftext|>`` are open_clip's ``<start_of_text>``/``<end_of_text>``.

Checked against the original code by ``tests/test_scoring_hps_tokenizer.py``, whose expected
ids ``tools/hps_tokenizer_ids.py`` made with hpsv2 1.2.0 and open_clip_torch 3.3.0.
"""

from __future__ import annotations

import gzip
import html
import json
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path

import torch

from snpo.errors import UserError

from .base import missing

__all__ = [
    "VOCAB_GZ",
    "OpenClipTokenizer",
    "clean_text",
    "load_open_clip_tokenizer",
]

VOCAB_GZ = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<start_of_text>", "<end_of_text>"  # open_clip's names of the special tokens
HF_SOT, HF_EOT = "<|startoftext|>", "<|endoftext|>"  # the same tokens in Hugging Face files
_N_MERGES = 49152 - 256 - 2  # open_clip reads lines 1 .. 48894 of the gz file
_SPLIT = (
    r"""|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"""  # after the special names
)


@lru_cache
def _regex():
    import regex  # a dependency of transformers; `re` has no \p{L}

    return regex


@lru_cache
def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible map of the 256 byte values to printable unicode characters."""
    bs = [
        *range(ord("!"), ord("~") + 1),
        *range(ord("¡"), ord("¬") + 1),
        *range(ord("®"), ord("ÿ") + 1),
    ]
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, (chr(c) for c in cs)))


def _fix_text(text: str) -> str:
    try:
        import ftfy
    except ImportError as err:  # a dependency of snpo; only a stale environment lacks it
        raise UserError(
            "HPSv2 tokenizer: the `ftfy` package is missing (pip install ftfy); HPSv2 cleans every "
            "prompt with ftfy.fix_text"
        ) from err
    return ftfy.fix_text(text)


def clean_text(text: str) -> str:
    """open_clip's ``whitespace_clean(basic_clean(text)).lower()`` (HPSv2's cleaning)."""
    text = html.unescape(html.unescape(_fix_text(text))).strip()
    return _regex().sub(r"\s+", " ", text).strip().lower()


class OpenClipTokenizer:
    """open_clip's ``SimpleTokenizer`` (``clean='lower'``): ``tok(prompts) -> (B, context) ids``.

    ``encoder`` maps BPE symbols to ids and must hold ``<start_of_text>`` and ``<end_of_text>``;
    ``merges`` are the BPE merges, highest priority first.
    """

    def __init__(
        self,
        encoder: dict[str, int],
        merges: Sequence[tuple[str, str]],
        *,
        context_length: int = 77,
    ) -> None:
        for name in (SOT, EOT):
            if name not in encoder:
                raise UserError(f"HPSv2 tokenizer: the vocabulary has no {name!r} token")
        self.encoder = dict(encoder)
        self.bpe_ranks = {tuple(m): i for i, m in enumerate(merges)}
        self.sot_id = self.encoder[SOT]
        self.eot_id = self.encoder[EOT]
        self.context_length = context_length
        self.byte_encoder = bytes_to_unicode()
        self._cache: dict[str, str] = {SOT: SOT, EOT: EOT}
        self._pat = _regex().compile(f"{SOT}|{EOT}" + _SPLIT, _regex().IGNORECASE)

    # ------------------------------------------------------------------------------ loading

    @classmethod
    def from_bpe_gz(cls, path: str | Path, **kwargs) -> OpenClipTokenizer:
        """From open_clip's / openai-CLIP's ``bpe_simple_vocab_16e6.txt.gz``, as open_clip builds it."""
        with gzip.open(path) as f:
            lines = f.read().decode("utf-8").split("\n")
        merges = [tuple(m.split()) for m in lines[1 : _N_MERGES + 1]]
        symbols = list(bytes_to_unicode().values())
        vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges]
        vocab += [SOT, EOT]
        return cls({s: i for i, s in enumerate(vocab)}, merges, **kwargs)

    @classmethod
    def from_hf_vocab(
        cls, vocab: dict[str, int], merges: Sequence[tuple[str, str]], **kwargs
    ) -> OpenClipTokenizer:
        """From a Hugging Face CLIP vocabulary (special tokens named ``<|startoftext|>`` ...)."""
        encoder = {s: i for s, i in vocab.items() if s not in (HF_SOT, HF_EOT)}
        for hf_name, name in ((HF_SOT, SOT), (HF_EOT, EOT)):
            if hf_name not in vocab:
                raise UserError(f"HPSv2 tokenizer: vocab.json has no {hf_name!r} token")
            encoder[name] = vocab[hf_name]
        return cls(encoder, merges, **kwargs)

    @classmethod
    def from_folder(cls, folder: str | Path, **kwargs) -> OpenClipTokenizer:
        """From a folder with ``bpe_simple_vocab_16e6.txt.gz``, ``vocab.json`` + ``merges.txt``
        or ``tokenizer.json`` (looked for in that order), or from the ``.txt.gz`` file itself."""
        p = Path(folder)
        if p.is_file():
            return cls.from_bpe_gz(p, **kwargs)
        if (p / VOCAB_GZ).is_file():
            return cls.from_bpe_gz(p / VOCAB_GZ, **kwargs)
        if (p / "vocab.json").is_file() and (p / "merges.txt").is_file():
            vocab = json.loads((p / "vocab.json").read_text(encoding="utf-8"))
            lines = (p / "merges.txt").read_text(encoding="utf-8").split("\n")
            merges = [tuple(m.split()) for m in lines if m.strip() and not m.startswith("#version")]
            return cls.from_hf_vocab(vocab, merges, **kwargs)
        if (p / "tokenizer.json").is_file():
            model = json.loads((p / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
            if model.get("type") != "BPE" or "vocab" not in model:
                raise UserError(
                    f"HPSv2 tokenizer: {str(p / 'tokenizer.json')!r} is not a BPE tokenizer"
                )
            merges = [
                tuple(m.split(" ")) if isinstance(m, str) else tuple(m)
                for m in model.get("merges", [])
            ]
            return cls.from_hf_vocab(model["vocab"], merges, **kwargs)
        raise FileNotFoundError(
            f"no {VOCAB_GZ}, vocab.json + merges.txt or tokenizer.json in {str(p)!r}"
        )

    # ------------------------------------------------------------------------------ encoding

    def bpe(self, token: str) -> str:
        """Space-separated BPE symbols of one piece (already in the byte alphabet)."""
        if token in self._cache:
            return self._cache[token]
        word = (*token[:-1], token[-1] + "</w>")
        pairs = _pairs(word)
        if not pairs:
            return token + "</w>"
        while True:
            bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
            if bigram not in self.bpe_ranks:
                break
            first, second = bigram
            new_word: list[str] = []
            i = 0
            while i < len(word):
                try:
                    j = word.index(first, i)
                except ValueError:
                    new_word.extend(word[i:])
                    break
                new_word.extend(word[i:j])
                i = j
                if word[i] == first and i < len(word) - 1 and word[i + 1] == second:
                    new_word.append(first + second)
                    i += 2
                else:
                    new_word.append(word[i])
                    i += 1
            word = tuple(new_word)
            if len(word) == 1:
                break
            pairs = _pairs(word)
        out = " ".join(word)
        self._cache[token] = out
        return out

    def encode(self, text: str) -> list[int]:
        """Ids of ``text`` after cleaning, without the start/end tokens."""
        ids: list[int] = []
        for piece in self._pat.findall(clean_text(text)):
            piece = "".join(self.byte_encoder[b] for b in piece.encode("utf-8"))
            for symbol in self.bpe(piece).split(" "):
                try:
                    ids.append(self.encoder[symbol])
                except KeyError:
                    raise UserError(
                        f"HPSv2 tokenizer: {symbol!r} is not in the vocabulary; "
                        "is it the CLIP BPE vocabulary?"
                    ) from None
        return ids

    def __call__(
        self, texts: str | Sequence[str], context_length: int | None = None
    ) -> dict[str, torch.Tensor]:
        """``{"input_ids", "attention_mask"}``, each ``(B, context)``, as open_clip's ``tokenize``.

        ``input_ids`` equal open_clip's tensor; ``attention_mask`` is 1 up to and including the
        end-of-text token (open_clip uses none: its text tower is causal and pools there).
        """
        if isinstance(texts, str):
            texts = [texts]
        ctx = context_length or self.context_length
        ids = torch.zeros(len(texts), ctx, dtype=torch.long)
        mask = torch.zeros(len(texts), ctx, dtype=torch.long)
        for row, text in enumerate(texts):
            tokens = [self.sot_id, *self.encode(text), self.eot_id]
            if len(tokens) > ctx:
                tokens = tokens[:ctx]
                tokens[-1] = self.eot_id
            ids[row, : len(tokens)] = torch.tensor(tokens)
            mask[row, : len(tokens)] = 1
        return {"input_ids": ids, "attention_mask": mask}

    def __len__(self) -> int:
        return len(self.encoder)


def _pairs(word: tuple[str, ...]) -> set[tuple[str, str]]:
    return set(zip(word[:-1], word[1:]))


def load_open_clip_tokenizer(
    path: Path, *, what: str, download: str, flag: str, context_length: int = 77
) -> OpenClipTokenizer:
    """:meth:`OpenClipTokenizer.from_folder` with the scorers' one-line missing-file error."""
    try:
        return OpenClipTokenizer.from_folder(path, context_length=context_length)
    except FileNotFoundError:
        raise missing(
            what, path, download, flag, f"no {VOCAB_GZ}, tokenizer.json or vocab.json + merges.txt"
        ) from None
    except (OSError, ValueError, UnicodeDecodeError) as err:
        if isinstance(err, UserError):
            raise
        raise missing(what, path, download, flag, str(err)) from err
