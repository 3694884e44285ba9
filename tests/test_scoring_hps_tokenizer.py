"""HPSv2's tokenizer against ids made by the ORIGINAL code (no open_clip needed here).

``tests/data/hps_tokenizer/token_ids.json`` was written by ``tools/hps_tokenizer_ids.py``, which
runs hpsv2 1.2.0's bundled open_clip tokenizer (what ``hpsv2.score`` uses) and open_clip_torch
3.3.0's ``get_tokenizer('ViT-H-14')`` on hard prompts: curly quotes and apostrophes, HTML
entities, ligatures, full-width letters, mojibake, emoji, control characters, over-long prompts.
The vocabulary they used (CLIP's ``bpe_simple_vocab_16e6.txt.gz``, MIT) sits next to it.
"""

from __future__ import annotations

import gzip
import json
import math
from pathlib import Path

import pytest
import torch

from snpo.scoring.hpsv2 import make_hpsv2
from snpo.scoring.open_clip_tokenizer import OpenClipTokenizer, bytes_to_unicode, clean_text
from snpo.scoring.preprocess import hps_preprocess

DATA = Path(__file__).parent / "data" / "hps_tokenizer"
FIXTURE = json.loads((DATA / "token_ids.json").read_text())
GZ = DATA / FIXTURE["vocabulary"]["file"]
PROMPTS = [c["prompt"] for c in FIXTURE["cases"]]
WANT = torch.tensor([c["ids"] for c in FIXTURE["cases"]])


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory) -> Path:
    """The same vocabulary as a Hugging Face CLIP tokenizer folder (vocab.json + merges.txt),
    the layout of ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``."""
    folder = tmp_path_factory.mktemp("clip-tokenizer")
    with gzip.open(GZ) as f:
        merges = f.read().decode("utf-8").split("\n")[1 : 49152 - 256 - 2 + 1]
    symbols = list(bytes_to_unicode().values())
    vocab = symbols + [s + "</w>" for s in symbols] + ["".join(m.split()) for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    (folder / "vocab.json").write_text(json.dumps({s: i for i, s in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    (folder / "tokenizer_config.json").write_text(json.dumps({"model_max_length": 77}))
    return folder


def test_fixture_is_from_the_original_and_hard():
    assert FIXTURE["versions"]["hpsv2"] == "1.2.0" and FIXTURE["context_length"] == 77
    assert all(c["open_clip_3_3_agrees"] for c in FIXTURE["cases"])
    # the prompts exercise the cleaning: for most of them it changes more than the case
    changed = [p for p in PROMPTS if clean_text(p) != " ".join(p.split()).lower()]
    assert len(changed) >= 12, changed
    assert WANT.shape == (len(PROMPTS), 77)


def _mismatches(got: torch.Tensor) -> list[str]:
    return [p for p, g, w in zip(PROMPTS, got, WANT) if not torch.equal(g, w)]


def test_ids_from_the_bpe_file_equal_the_original():
    enc = OpenClipTokenizer.from_folder(GZ)(PROMPTS)
    assert _mismatches(enc["input_ids"]) == []
    # the mask covers start ... end-of-text; 0-padding (also the id of "!") is masked out
    lengths = enc["attention_mask"].sum(-1)
    for row, n in zip(enc["input_ids"], lengths.tolist()):
        assert row[n - 1] == 49407 and row[n:].eq(0).all()


def test_ids_from_a_hugging_face_folder_equal_the_original(hf_folder, tmp_path):
    assert _mismatches(OpenClipTokenizer.from_folder(hf_folder)(PROMPTS)["input_ids"]) == []
    # tokenizer.json alone (what transformers writes) gives the same vocabulary
    from transformers import CLIPTokenizerFast

    only_json = tmp_path / "tokenizer-json"
    CLIPTokenizerFast.from_pretrained(str(hf_folder)).save_pretrained(str(only_json))
    for name in ("vocab.json", "merges.txt"):
        (only_json / name).unlink(missing_ok=True)
    assert (only_json / "tokenizer.json").is_file()
    assert _mismatches(OpenClipTokenizer.from_folder(only_json)(PROMPTS)["input_ids"]) == []


def test_truncation_puts_end_of_text_last():
    by_prompt = dict(zip(PROMPTS, WANT))
    fits, cut = by_prompt["a " * 75], by_prompt["a " * 76]
    assert fits[0] == 49406 and fits[76] == 49407 and (fits[1:76] == 320).all()
    assert torch.equal(cut, fits)  # 76 words: cut to 77 tokens, end-of-text replaces the last


def test_the_hps_scorer_tokenises_and_scores_with_the_original_ids(hf_folder, tmp_path):
    from test_scoring import make_open_clip_sd, rand_images, ref_encode_image, ref_encode_text, unit

    sd = make_open_clip_sd(3, 49408)
    torch.save({"state_dict": sd}, tmp_path / "HPS_v2_compressed.pt")
    kw = {"vision_heads": 4, "text_heads": 2, "dtype": torch.float64}
    scorer = make_hpsv2(tmp_path, tokenizer=hf_folder, **kw)
    assert _mismatches(scorer.tokenizer(PROMPTS)["input_ids"]) == []
    # the BPE file itself also works as --hps-tokenizer
    from_gz = make_hpsv2(tmp_path, tokenizer=GZ, **kw)
    assert _mismatches(from_gz.tokenizer(PROMPTS)["input_ids"]) == []

    picks = [2, 5, 11, 12, 29]  # curly quotes, an entity, ligatures, full width, over-long
    images = rand_images(4, sizes=((40, 48),) * len(picks))
    prompts = [PROMPTS[i] for i in picks]
    got = scorer(images, prompts)
    img = unit(ref_encode_image(sd, hps_preprocess(images, 32).double(), 4))
    txt = unit(ref_encode_text(sd, WANT[picks], 2))
    torch.testing.assert_close(got.double(), 100 * (img * txt).sum(-1), atol=1e-4, rtol=0)
    assert all(math.isfinite(v) for v in got.tolist())
