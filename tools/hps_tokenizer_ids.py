"""Token ids of hard prompts from the ORIGINAL HPSv2 / open_clip tokenizers (one-off fixture maker).

snpo re-implements HPSv2's tokenizer (``snpo.scoring.open_clip_tokenizer``); the test
``tests/test_scoring_hps_tokenizer.py`` checks it against the ids this script writes, which come
from the original code, not from snpo. Run it in a side environment that has the originals:

    python3 -m venv /tmp/oc-env
    /tmp/oc-env/bin/pip install torch==2.13.0 ftfy regex numpy
    /tmp/oc-env/bin/pip install --no-deps open_clip_torch==3.3.0 hpsv2==1.2.0
    /tmp/oc-env/bin/python tools/hps_tokenizer_ids.py

What it runs (no snpo code is imported):

* ``hpsv2`` 1.2.0 -- what ``hpsv2.score`` tokenises with: ``get_tokenizer('ViT-H-14')`` of its
  bundled ``hpsv2/src/open_clip`` returns the module function ``tokenize`` of
  ``hpsv2/src/open_clip/tokenizer.py`` (context length 77). hpsv2's wheel does not ship the
  vocabulary file that module loads at import, so the module is loaded from a temporary copy next
  to open_clip_torch's ``bpe_simple_vocab_16e6.txt.gz`` (byte-identical to openai/CLIP's);
* ``open_clip_torch`` 3.3.0 -- ``open_clip.get_tokenizer('ViT-H-14')``, which for that config
  (no ``hf_tokenizer_name``, no ``tokenizer_kwargs``) is ``SimpleTokenizer(context_length=77)``
  with the default ``clean='lower'``. Built here the same way from ``open_clip/tokenizer.py``
  loaded by file path, because the package's ``__init__`` imports torchvision, which has no
  working CPU build next to this torch.

The fixture keeps hpsv2's ids (what the published HPSv2 numbers were computed with) and records,
per prompt, whether open_clip_torch 3.3.0 agrees. It also copies the BPE vocabulary (MIT,
Copyright (c) 2021 OpenAI) next to the fixture so the test can build snpo's tokenizer from it.
"""

from __future__ import annotations

import hashlib
import importlib.metadata as md
import importlib.util
import json
import platform
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "tests" / "data" / "hps_tokenizer"
CONTEXT = 77

# Prompts chosen to exercise every step of the original cleaning (ftfy.fix_text, html.unescape
# twice, whitespace collapsing, lower-casing) and of BPE/truncation.
PROMPTS: list[str] = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF An Astronaut, Riding A HORSE",
    "the cat\u2019s toy on the dog\u2019s bed",  # curly apostrophes
    "\u201ca red car\u201d on a \u2018wet\u2019 road",  # curly double and single quotes
    "l\u2019\u00e9t\u00e9 d\u2019un chat \u00ab fran\u00e7ais \u00bb",  # French, guillemets
    "salt &amp; pepper",  # HTML entity
    "x &lt; y &gt; z and 5 &lt; 6",
    "double &amp;amp; escaped &amp;lt;b&amp;gt;bold&amp;lt;/b&amp;gt;",  # needs both unescapes
    "&#39;quoted&#39; and &quot;double quoted&quot; and &#x27;hex&#x27;",
    "AT&T and R&D at <b>bold</b> &amp; co",  # '<' present: ftfy leaves entities, html does not
    "i <3 salt &amp; pepper",  # '<' present: only html.unescape decodes the entity
    "<3 &amp;amp; kisses, &amp;amp;lt;3 stays escaped once",  # exactly two unescapes
    "&nbsp;non&nbsp;breaking&nbsp;spaces",
    "\ufb01ne \ufb02owers in a \ufb00ord",  # ligatures fi, fl, ff
    "\uff26\uff35\uff2c\uff2c\uff0d\uff37\uff29\uff24\uff34\uff28 \uff4c\uff45\uff54\uff54\uff45\uff52\uff53 \uff11\uff12\uff13",  # full width
    "a dog \U0001f436 with a party hat \U0001f389\U0001f389",  # emoji
    "rainbow \U0001f3f3\ufe0f\u200d\U0001f308 flag and \U0001f469\U0001f3fd\u200d\U0001f52c",  # ZWJ
    "caf\u00c3\u00a9 and na\u00c3\u00afve",  # mojibake (UTF-8 read as Latin-1)
    "cafe\u0301 and nai\u0308ve re\u0301sume\u0301",  # decomposed accents (NFD)
    "  lots\tof\n\nwhite   space\u3000ideographic\u00a0nbsp\u2003em  ",
    "bell\x07 and\x1c separators\x7f and \u200bzero width",  # control / invisible characters
    "\u0130stanbul stra\u00dfe \u03a3\u039f\u03a6\u0399\u0391 \u0394\u03ac\u03c6\u03bd\u03b7",  # special lower-casing
    "\u4e00\u53ea\u732b\u5728\u5c4b\u9876\u4e0a, \u732b\u306e\u5199\u771f, \uace0\uc591\uc774",  # CJK
    "it's don't we're I'm you'll he'd they've IT'S",  # contractions
    "1234567890 3.14159 1e-10 \u00bd \u00b2 \u2122 \u00a9",
    "em\u2014dash \u2013 en dash \u2026 ellipsis \u2022 bullet",
    "<start_of_text> and <|endoftext|> typed literally",
    "",
    "a " * 75,  # exactly fills the 77-token context
    "a " * 76,  # one token too many: the end-of-text token replaces the last word
    "portrait of a woman, highly detailed, 8k, trending on artstation, by greg rutkowski "
    "and alphonse mucha, sharp focus, " * 4,  # over-long
    "\u201cIt\u2019s a trap!\u201d \u2014 an over-long caption &amp; more " * 8,  # over-long, curly
]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)  # locates the package without running its __init__
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit(f"{name} is not installed in this environment; see the module docstring")
    return Path(next(iter(spec.submodule_search_locations)))


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def main() -> None:
    oc_dir = _package_dir("open_clip")
    hps_dir = _package_dir("hpsv2")
    bpe = oc_dir / "bpe_simple_vocab_16e6.txt.gz"
    oc_tok_file = oc_dir / "tokenizer.py"
    hps_tok_file = hps_dir / "src" / "open_clip" / "tokenizer.py"

    oc = _load(oc_tok_file, "open_clip_tokenizer_original")
    open_clip_tokenize = oc.SimpleTokenizer(context_length=CONTEXT)  # = get_tokenizer('ViT-H-14')
    with tempfile.TemporaryDirectory() as tmp:
        shutil.copy(hps_tok_file, Path(tmp) / "tokenizer.py")
        shutil.copy(bpe, Path(tmp) / bpe.name)
        hps = _load(Path(tmp) / "tokenizer.py", "hpsv2_tokenizer_original")
        hps_ids = hps.tokenize(PROMPTS, context_length=CONTEXT).tolist()
    oc_ids = open_clip_tokenize(PROMPTS).tolist()

    cases = [
        {"prompt": p, "ids": h, "open_clip_3_3_agrees": h == o}
        for p, h, o in zip(PROMPTS, hps_ids, oc_ids)
    ]
    OUT.mkdir(parents=True, exist_ok=True)
    shutil.copy(bpe, OUT / bpe.name)
    fixture = {
        "about": "token ids of the original HPSv2 tokenizer; written by tools/hps_tokenizer_ids.py",
        "context_length": CONTEXT,
        "source": "hpsv2 1.2.0 hpsv2/src/open_clip/tokenizer.py: tokenize(prompts, 77)",
        "vocabulary": {"file": bpe.name, "sha256": _sha256(bpe)},
        "versions": {
            "python": platform.python_version(),
            **{pkg: md.version(pkg) for pkg in ("hpsv2", "open_clip_torch", "ftfy", "regex")},
        },
        "tokenizer_sha256": {
            "hpsv2/src/open_clip/tokenizer.py": _sha256(hps_tok_file),
            "open_clip/tokenizer.py": _sha256(oc_tok_file),
        },
        "cases": cases,
    }
    text = json.dumps(fixture, indent=1, ensure_ascii=True)
    # one line per id row keeps the file short and diffable
    text = text.replace("\n    ", " ").replace("\n   ]", " ]")
    (OUT / "token_ids.json").write_text(text + "\n")
    n_diff = sum(not c["open_clip_3_3_agrees"] for c in cases)
    print(
        f"wrote {len(cases)} prompts to {OUT / 'token_ids.json'}; open_clip 3.3 differs on {n_diff}"
    )


if __name__ == "__main__":
    main()
