"""`snpo sample`, `snpo score` and `snpo report` end to end on tiny models (no downloads).

What is checked against what:
* prompt sets: each format parsed from fixtures written here, against the prompts written;
* sampling: the images of a tiny SD1.5 folder against what the diffusers pipeline itself draws
  for the same prompt and seed; LoRA / full fine-tune / Diff-NPO / CHATS specs against the same
  networks built in memory (peft adapters, perturbed weights, merge_denoisers, the guides);
* resume: an interrupted run (an exception in-process, and a SIGKILLed subprocess), resumed with
  the same command, against an uninterrupted run, byte for byte, with no image rewritten;
* scoring: the CLI's per-image scores against the scorer factories called directly;
* report: results.csv against a hand computation on synthetic scores.
"""

from __future__ import annotations

import csv
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from PIL import Image

from conftest import TINY, WORDS
from snpo.backbones import load_backbone
from snpo.backbones.toy import ToyBackbone
from snpo.cli import main
from snpo.evaluate import manifest as mf
from snpo.evaluate.prompts import load_prompts
from snpo.evaluate.sample import latent_geometry
from snpo.sampling import SamplerSettings, sample_images, single_network_guide
from snpo.toy.tokenizer import build_toy_tokenizer
from tiny_pipelines import RESOLUTION, make_sd15, make_sdxl

PROMPTS = ["a red cat", "prompt 3", "a cat"]


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("evaluate")


@pytest.fixture(scope="module")
def sd_path(root) -> Path:
    return make_sd15(root / "sd15")


@pytest.fixture(scope="module")
def prompts_txt(root) -> Path:
    path = root / "prompts.txt"
    path.write_text("\n".join(PROMPTS) + "\n")
    return path


@pytest.fixture(scope="module")
def toy_path(root) -> Path:
    tokenizer = build_toy_tokenizer(WORDS, root / "toy-tok", max_length=TINY.max_prompt_tokens)
    ToyBackbone.create(tokenizer, TINY, seed=0).save_pretrained(root / "toy")
    return root / "toy"


def sample_args(model: Path, prompts: Path, out: Path, *extra: str) -> list[str]:
    return [
        "sample",
        "--model_name_or_path",
        str(model),
        "--prompts",
        str(prompts),
        "--output_dir",
        str(out),
        "--show_progress",
        "false",
        *extra,
    ]


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int64)


def folder_bytes(out: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted((out / mf.IMAGES).iterdir())}


def check_one_line_error(capsys, code: int, *needles: str) -> str:
    assert code == 2
    err = capsys.readouterr().err
    # (libraries' progress bars may precede it on stderr)
    lines = [line for line in err.splitlines() if line.startswith("snpo ")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(
        ("snpo sample: error: ", "snpo score: error: ", "snpo report: error: ")
    )
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


# ---------------------------------------------------------------------------------- prompt sets
def write_parquet(path: Path, captions: list[str]) -> None:
    table = pa.table(
        {
            "caption": captions,
            "jpg_0": [b"\xff\xd8 not read" for _ in captions],
            "label_0": [1.0 for _ in captions],
        }
    )
    pq.write_table(table, path, row_group_size=2)


def test_prompt_set_formats(tmp_path, monkeypatch):
    # text: one per line, blank lines skipped, CRLF and surrounding text kept as written
    txt = tmp_path / "p.txt"
    txt.write_bytes(b"a red cat\r\n\r\n  two birds \nlast line without newline")
    assert load_prompts(txt).prompts == ["a red cat", "  two birds ", "last line without newline"]

    # Pick-a-Pic: unique captions of one split, first appearance first, caption column only
    data = tmp_path / "pickapic"
    data.mkdir()
    write_parquet(data / "test-00000-of-00002.parquet", ["b", "a", "b", "", "c"])
    write_parquet(data / "test-00001-of-00002.parquet", ["c", "d", "a"])
    write_parquet(data / "train-00000-of-00001.parquet", ["train only"])
    read_columns = []
    real_iter = pq.ParquetFile.iter_batches

    def spy(self, *args, **kwargs):
        read_columns.append(kwargs.get("columns"))
        return real_iter(self, *args, **kwargs)

    monkeypatch.setattr(pq.ParquetFile, "iter_batches", spy)
    test_set = load_prompts(data, split="test")
    assert test_set.prompts == ["b", "a", "c", "d"]
    assert read_columns and all(c == ["caption"] for c in read_columns)
    assert load_prompts(str(data / "train-*.parquet")).prompts == ["train only"]
    assert load_prompts(data, split="test", limit=2).prompts == ["b", "a"]

    # HPDv2: the benchmark folder (style order), a {style: [prompts]} file, test.json records
    bench = tmp_path / "benchmark"
    bench.mkdir()
    (bench / "photo.json").write_text(json.dumps(["p1", "p2"]))
    (bench / "anime.json").write_text(json.dumps(["a1"]))
    hpd = load_prompts(bench)
    assert hpd.prompts == ["a1", "p1", "p2"] and hpd.categories == ["anime", "photo", "photo"]
    assert load_prompts(bench / "photo.json").categories == ["photo", "photo"]
    styles = tmp_path / "all.json"
    styles.write_text(json.dumps({"paintings": ["x", "y"], "photo": ["z"]}))
    assert load_prompts(styles).categories == ["paintings", "paintings", "photo"]
    records = tmp_path / "test.json"
    records.write_text(
        json.dumps(
            [
                {"prompt": "q1", "image_path": ["1.jpg", "2.jpg"], "rank": [1, 2]},
                {"prompt": "q2", "image_path": ["3.jpg"], "rank": [1]},
                {"prompt": "q1", "image_path": ["4.jpg"], "rank": [1]},
            ]
        )
    )
    assert load_prompts(records).prompts == ["q1", "q2"]

    # PartiPrompts: tab-separated, the Prompt column, Category as the category
    parti = tmp_path / "PartiPrompts.tsv"
    parti.write_text(
        "Prompt\tCategory\tChallenge\tNote\n"
        "bond, with a comma\tPeople\tBasic\t\n"
        'a "quoted" word\tAnimals\tImagination\tnote\n'
    )
    parti_set = load_prompts(parti)
    assert parti_set.prompts == ["bond, with a comma", 'a "quoted" word']
    assert parti_set.categories == ["People", "Animals"]

    # errors are one line starting with the key
    bad_tsv = tmp_path / "bad.tsv"
    bad_tsv.write_text("Text\tCategory\nx\ty\n")
    for spec, kwargs, needle in [
        (tmp_path / "p.csv", {}, "cannot tell the format"),
        (bad_tsv, {}, "no 'Prompt' column"),
        (tmp_path / "missing.txt", {}, "no such file"),
        (txt, {"split": "test"}, "prompts_split"),
    ]:
        if spec.suffix == ".csv":
            spec.write_text("x\n")
        with pytest.raises(ValueError) as err:
            load_prompts(spec, **kwargs)
        assert "\n" not in str(err.value) and needle in str(err.value)


# ------------------------------------------------------------------------------------- sampling
def test_sd15_samples_are_the_pipelines_images(sd_path, prompts_txt, root, capsys):
    from diffusers import StableDiffusionPipeline

    out = root / "pipe-check"
    code = main(
        sample_args(
            sd_path,
            prompts_txt,
            out,
            "--seeds",
            "0,5",
            "--num_inference_steps",
            "10",
            "--batch_size",
            "1",
        )
    )
    assert code == 0
    assert "6 images drawn" in capsys.readouterr().out
    pipe = StableDiffusionPipeline.from_pretrained(sd_path)
    pipe.set_progress_bar_config(disable=True)
    records, bad = mf.read_jsonl(out / mf.MANIFEST)
    assert bad == 0 and len(records) == 6
    for record in records:
        prompt, seed = record["prompt"], record["seed"]
        assert prompt == PROMPTS[record["prompt_index"]]
        assert record["sha256"] == mf.sha256_file(out / record["file"])
        assert record["file"] == mf.image_name(record["prompt_index"], seed)
        assert record["sampling"] == {
            "num_inference_steps": 10,
            "guidance_scale": 7.5,
            "scheduler": "ddim",
            "resolution": None,
            "dtype": "float32",
        }
        assert record["model"]["model_name_or_path"] == str(sd_path.resolve())
        assert (record["height"], record["width"]) == (RESOLUTION, RESOLUTION)
        expected = pipe(
            prompt,
            num_inference_steps=10,
            guidance_scale=7.5,
            height=RESOLUTION,
            width=RESOLUTION,
            generator=torch.Generator().manual_seed(seed),
        ).images[0]
        diff = np.abs(np.asarray(expected).astype(np.int64) - pixels(out / record["file"]))
        assert diff.max() <= 1, (record["file"], diff.max())  # 8-bit rounding at most


@pytest.mark.parametrize("zeros", [True, False], ids=["zeros-null", "empty-prompt-null"])
def test_sdxl_samples_are_the_pipelines_images(zeros, prompts_txt, root):
    from diffusers import StableDiffusionXLPipeline

    model = make_sdxl(root / f"sdxl-{zeros}", force_zeros_for_empty_prompt=zeros)
    out = root / f"sdxl-samples-{zeros}"
    args = ["--seeds", "4", "--num_inference_steps", "5", "--resolution", "24", "--batch_size", "1"]
    assert main(sample_args(model, prompts_txt, out, *args)) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    pipe.set_progress_bar_config(disable=True)
    for i, prompt in enumerate(PROMPTS):
        expected = pipe(
            prompt,
            num_inference_steps=5,
            guidance_scale=7.5,
            height=24,
            width=24,
            generator=torch.Generator().manual_seed(4),
        ).images[0]
        got = pixels(out / mf.image_name(i, 4))
        assert got.shape == (24, 24, 3)
        assert np.abs(np.asarray(expected).astype(np.int64) - got).max() <= 1


def test_same_seed_same_image(sd_path, prompts_txt, root):
    args = ["--num_inference_steps", "6", "--batch_size", "2"]
    assert main(sample_args(sd_path, prompts_txt, root / "seeds-a", "--seeds", "0,1,2", *args)) == 0
    assert main(sample_args(sd_path, prompts_txt, root / "seeds-b", "--seeds", "2,7", *args)) == 0
    a, b = folder_bytes(root / "seeds-a"), folder_bytes(root / "seeds-b")
    for i in range(len(PROMPTS)):  # seed 2 alone or among others: the same bytes
        assert a[f"p{i:05d}_s2.png"] == b[f"p{i:05d}_s2.png"]
    assert a["p00000_s0.png"] != a["p00000_s1.png"]  # another seed, another image
    assert a["p00000_s0.png"] != a["p00001_s0.png"]  # another prompt, another image
    # another batch size may round differently on some hardware, but only in the last bit
    assert (
        main(
            sample_args(
                sd_path,
                prompts_txt,
                root / "seeds-c",
                "--seeds",
                "2",
                "--num_inference_steps",
                "6",
                "--batch_size",
                "3",
            )
        )
        == 0
    )
    for name in folder_bytes(root / "seeds-c"):
        assert (
            np.abs(
                pixels(root / "seeds-c/images" / name) - pixels(root / "seeds-b/images" / name)
            ).max()
            <= 1
        )


def test_resume_after_an_interruption_is_byte_identical(
    sd_path, prompts_txt, root, monkeypatch, capsys
):
    extra = ["--seeds", "0,1,3", "--num_inference_steps", "6", "--batch_size", "2"]
    assert main(sample_args(sd_path, prompts_txt, root / "whole", *extra)) == 0
    reference = folder_bytes(root / "whole")
    assert len(reference) == 9

    # interrupt the third batch after its PNGs are written but before its manifest line
    out = root / "interrupted"
    calls = {"n": 0}
    real_append = mf.append_jsonl

    def append_then_die(path, records):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed")
        real_append(path, records)

    monkeypatch.setattr(mf, "append_jsonl", append_then_die)
    with pytest.raises(KeyboardInterrupt):
        main(sample_args(sd_path, prompts_txt, out, *extra))
    monkeypatch.setattr(mf, "append_jsonl", real_append)
    recorded = {r["file"] for r in mf.read_manifest(out)}
    assert len(recorded) == 3  # batches: seed 0 prompts 0-1, seed 0 prompt 2, seed 1 prompts 0-1
    # what a kill can leave besides: a torn manifest line and a half-written PNG
    with open(out / mf.MANIFEST, "ab") as f:
        f.write(b'{"file": "images/p00000_s1.png", "sha2')
    (out / mf.IMAGES / "p00002_s3.png.tmp").write_bytes(b"\x89PNG half")
    # and an image lost after it was recorded: its batch is redrawn, its batch-mate kept
    (out / mf.image_name(1, 0)).unlink()
    recorded.remove(mf.image_name(1, 0))
    before = {name: os.stat(out / name) for name in recorded}

    capsys.readouterr()
    assert main(sample_args(sd_path, prompts_txt, out, *extra)) == 0
    assert "7 images drawn, 2 already there" in capsys.readouterr().out
    assert folder_bytes(out) == reference
    for name, stat in before.items():  # recorded images were neither redrawn nor rewritten
        after = os.stat(out / name)
        assert (after.st_ino, after.st_mtime_ns) == (stat.st_ino, stat.st_mtime_ns)
    records, bad = mf.read_jsonl(out / mf.MANIFEST)
    assert bad == 0 and sorted(r["file"] for r in records) == sorted(
        f"images/{n}" for n in reference
    )
    assert not list((out / mf.IMAGES).glob("*.tmp"))
    # once complete, a rerun draws nothing
    assert main(sample_args(sd_path, prompts_txt, out, *extra)) == 0
    assert "0 images drawn, 9 already there" in capsys.readouterr().out


def test_killed_subprocess_resumes_to_the_same_images(toy_path, root):
    prompts = root / "toy-prompts.txt"
    prompts.write_text("a red square\na blue circle\n")
    args = sample_args(
        toy_path,
        prompts,
        root / "toy-killed",
        "--seeds",
        ",".join(map(str, range(12))),
        "--num_inference_steps",
        "10",
        "--batch_size",
        "1",
    )
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PYTHONPATH": str(Path(__file__).parents[1] / "src"),
    }
    proc = subprocess.Popen(
        [sys.executable, "-m", "snpo.cli", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    manifest = root / "toy-killed" / mf.MANIFEST
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        if manifest.is_file() and manifest.read_bytes().count(b"\n") >= 3:
            break
        time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]  # still running: kill it
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    done_before = len(mf.read_manifest(root / "toy-killed"))
    assert 3 <= done_before < 24

    assert main(args) == 0  # the same command, resumed
    whole = sample_args(toy_path, prompts, root / "toy-whole", *args[args.index("--seeds") :])
    assert main(whole) == 0
    assert folder_bytes(root / "toy-killed") == folder_bytes(root / "toy-whole")
    assert len(mf.read_manifest(root / "toy-killed")) == 24


def test_changed_settings_and_bad_keys_stop_before_loading(
    sd_path, prompts_txt, root, monkeypatch, capsys
):
    import snpo.evaluate.sample as sample_module

    def no_loading(config):
        raise AssertionError("the model must not load")

    out = root / "pipe-check"  # made with 10 steps by the pipeline test
    if not (out / mf.SETTINGS).is_file():
        assert (
            main(
                sample_args(
                    sd_path, prompts_txt, out, "--seeds", "0", "--num_inference_steps", "10"
                )
            )
            == 0
        )
    monkeypatch.setattr(sample_module, "load_sampler", no_loading)
    capsys.readouterr()
    cases = [
        (
            ["--num_inference_steps", "11"],
            ["output_dir:", "num_inference_steps=10", "another output_dir"],
        ),
        (["--num_inference_steps", "10", "--guidance_scale", "5"], ["guidance_scale=7.5"]),
        (["--seeds", "0,0"], ["seeds:"]),
        (["--lora", str(root / "nowhere")], ["lora:", "no such file"]),
        (["--lora", str(sd_path)], ["lora:", "holds full weights"]),
        (["--chats", str(root), "--lora", str(root)], ["chats:"]),
        (["--scheduler", "nope"], ["scheduler:"]),
        (["--dtype", "float8"], ["dtype:"]),
        (["--prompts_format", "csv"], ["prompts_format:"]),
        (["--seed", "1"], ["unknown key 'seed'", "seeds"]),
    ]
    for extra, needles in cases:
        check_one_line_error(capsys, main(sample_args(sd_path, prompts_txt, out, *extra)), *needles)


# ------------------------------------------------------------------------- LoRA, full, NPO, CHATS
@torch.no_grad()
def perturb(module: torch.nn.Module, seed: int, scale: float = 0.02) -> torch.nn.Module:
    g = torch.Generator().manual_seed(seed)
    for p in module.parameters():
        p.add_(scale * torch.randn(p.shape, generator=g))
    return module


def in_memory_images(backbone, guide, prompts, seeds, steps) -> np.ndarray:
    shape, _ = latent_geometry(backbone, None)
    images = sample_images(
        backbone, guide, prompts, seeds, shape, SamplerSettings(steps, 7.5, "ddim", 8)
    )
    return (
        (images.clamp(0, 1) * 255)
        .round()
        .to(torch.uint8)
        .permute(0, 2, 3, 1)
        .numpy()
        .astype(np.int64)
    )


def cli_images(out: Path, n_prompts: int, seed: int) -> np.ndarray:
    return np.stack([pixels(out / mf.image_name(i, seed)) for i in range(n_prompts)])


def test_model_specs_load_the_networks_they_name(sd_path, prompts_txt, root):
    import copy

    from peft.tuners.lora import LoraLayer

    from snpo.merging import merge_denoisers
    from snpo.methods.chats import DualDenoiser, chats_guide, save_chats
    from snpo.methods.npo import npo_guide

    steps, seed = 4, 3
    common = ["--seeds", str(seed), "--num_inference_steps", str(steps), "--batch_size", "4"]
    assert main(sample_args(sd_path, prompts_txt, root / "spec-base", *common)) == 0
    base_images = cli_images(root / "spec-base", 3, seed)

    # LoRA: peft adapters with random factors, saved as `snpo train` saves them
    lora_backbone = load_backbone(sd_path)
    lora_backbone.prepare_for_training(lora_rank=4)
    with torch.no_grad():
        for module in lora_backbone.denoiser.modules():
            if isinstance(module, LoraLayer):
                module.lora_B["default"].weight.normal_(0, 0.2)
    lora_backbone.denoiser.eval()
    lora_backbone.save_trained(root / "lora")
    expected = in_memory_images(
        lora_backbone,
        single_network_guide(lora_backbone, lora_backbone.denoiser, 7.5),
        PROMPTS,
        [seed] * 3,
        steps,
    )
    assert (
        main(
            sample_args(
                sd_path, prompts_txt, root / "spec-lora", "--lora", str(root / "lora"), *common
            )
        )
        == 0
    )
    got = cli_images(root / "spec-lora", 3, seed)
    assert np.abs(got - expected).max() <= 2  # fused weights vs peft's unfused forward
    assert np.abs(got - base_images).mean() > 2  # and the LoRA does change the images

    # full fine-tune: perturbed weights saved as unet/
    full = load_backbone(sd_path)
    full.prepare_for_training(lora_rank=0)
    perturb(full.denoiser, seed=1).eval()
    full.save_trained(root / "full")
    expected = in_memory_images(
        full, single_network_guide(full, full.denoiser, 7.5), PROMPTS, [seed] * 3, steps
    )
    assert (
        main(
            sample_args(
                sd_path, prompts_txt, root / "spec-full", "--unet", str(root / "full"), *common
            )
        )
        == 0
    )
    got = cli_images(root / "spec-full", 3, seed)
    assert np.abs(got - expected).max() <= 1 and np.abs(got - base_images).mean() > 2

    # Diff-NPO: positive = the full fine-tune, negative = another one, merged (a = 1, b = 1) or not
    npo = load_backbone(sd_path)
    npo.prepare_for_training(lora_rank=0)
    perturb(npo.denoiser, seed=2).eval()
    npo.save_trained(root / "npo")
    reference = load_backbone(sd_path).denoiser.eval()
    merged = merge_denoisers(reference, full.denoiser, npo.denoiser, 1.0, 1.0)
    for merge, negative, name in [
        ("true", merged, "spec-npo-merged"),
        ("false", npo.denoiser, "spec-npo"),
    ]:
        expected = in_memory_images(
            full, npo_guide(full, full.denoiser, negative, 7.5), PROMPTS, [seed] * 3, steps
        )
        assert (
            main(
                sample_args(
                    sd_path,
                    prompts_txt,
                    root / name,
                    "--unet",
                    str(root / "full"),
                    "--npo_negative",
                    str(root / "npo"),
                    "--npo_merge",
                    merge,
                    *common,
                )
            )
            == 0
        )
        got = cli_images(root / name, 3, seed)
        assert np.abs(got - expected).max() <= 1, name
    assert (
        np.abs(
            cli_images(root / "spec-npo", 3, seed) - cli_images(root / "spec-full", 3, seed)
        ).mean()
        > 2
    )

    # CHATS: win and lose saved with save_chats; guidance_scale - 1 by default
    win, lose = copy.deepcopy(full.denoiser), copy.deepcopy(npo.denoiser)
    save_chats(full, DualDenoiser(win, lose), str(root / "chats"))
    expected = in_memory_images(full, chats_guide(full, win, lose, 6.5), PROMPTS, [seed] * 3, steps)
    assert (
        main(
            sample_args(
                sd_path, prompts_txt, root / "spec-chats", "--chats", str(root / "chats"), *common
            )
        )
        == 0
    )
    got = cli_images(root / "spec-chats", 3, seed)
    assert np.abs(got - expected).max() <= 1 and np.abs(got - base_images).mean() > 2
    records, _ = mf.read_jsonl(root / "spec-chats" / mf.MANIFEST)
    assert (
        records[0]["model"]["guide"] == "chats" and records[0]["sampling"]["guidance_scale"] == 6.5
    )


# -------------------------------------------------------------------------------------- scoring
@pytest.fixture(scope="module")
def scorer_assets(root) -> dict[str, Path]:
    """Tiny random scorers of the real classes, saved in the real checkpoints' layouts (the
    builders of test_scoring.py and test_image_reward.py)."""
    from snpo.scoring.aesthetic import AestheticMLP
    from test_image_reward import MED_CONFIG, VOCAB, _tiny_state_dict
    from test_scoring import OLD_STYLE_PREPROC, make_open_clip_sd, save_clip, write_tokenizer

    base = root / "scorers"
    out = {
        "clip": base / "clip",
        "pick": base / "pickscore",
        "proc": base / "laion-proc",
        "tok": base / "tok",
        "hps": base / "hps",
        "ir": base / "image_reward",
    }
    save_clip(out["clip"], seed=1)
    save_clip(out["pick"], seed=2, logit_scale=math.log(80.0), with_processor=False)
    write_tokenizer(out["proc"])
    (out["proc"] / "preprocessor_config.json").write_text(json.dumps(OLD_STYLE_PREPROC))
    vocab = write_tokenizer(out["tok"])
    out["hps"].mkdir(parents=True)
    # 64-wide towers: the head counts follow from the widths as they do for the real ViT-H-14
    for seed, name in [(10, "HPS_v2_compressed.pt"), (11, "HPS_v2.1_compressed.pt")]:
        sd = make_open_clip_sd(seed, vocab, vw=64, tw=64)
        torch.save({"state_dict": {k: v.float() for k, v in sd.items()}}, out["hps"] / name)
    torch.manual_seed(0)
    out["mlp"] = base / "sac+logos+ava1-l14-linearMSE.pth"
    torch.save(AestheticMLP(16).state_dict(), out["mlp"])
    out["ir"].mkdir(parents=True)
    torch.save(_tiny_state_dict(), out["ir"] / "ImageReward.pt")
    (out["ir"] / "med_config.json").write_text(json.dumps(MED_CONFIG))
    (out["ir"] / "tokenizer").mkdir()
    (out["ir"] / "tokenizer" / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    return out


def score_flags(a: dict[str, Path]) -> list[str]:
    """Every weight flag, spelled as the scorer modules' errors name them."""
    return [
        "--pickscore",
        str(a["pick"]),
        "--pickscore-processor",
        str(a["proc"]),
        "--hpsv2",
        str(a["hps"]),
        "--hpsv2.1",
        str(a["hps"]),
        "--hps-tokenizer",
        str(a["tok"]),
        "--aesthetic",
        str(a["mlp"]),
        "--aesthetic-clip",
        str(a["clip"]),
        "--clip-score",
        str(a["clip"]),
        "--image-reward",
        str(a["ir"] / "ImageReward.pt"),
        "--image-reward-tokenizer",
        str(a["ir"] / "tokenizer"),
    ]


ALL_SCORERS = "pickscore,hpsv2,hpsv2.1,aesthetic,clip_score,image_reward"


def test_score_cli_equals_the_scorer_factories(sd_path, prompts_txt, root, scorer_assets, capsys):
    from snpo.scoring import make_scorer

    samples = root / "to-score"
    assert (
        main(
            sample_args(
                sd_path, prompts_txt, samples, "--seeds", "0,1", "--num_inference_steps", "4"
            )
        )
        == 0
    )
    flags = score_flags(scorer_assets)
    code = main(
        [
            "score",
            "--samples",
            str(samples),
            "--scorers",
            ALL_SCORERS,
            "--batch_size",
            "4",
            "--show_progress",
            "false",
            *flags,
        ]
    )
    assert code == 0 and "36 scores computed, 0 already there" in capsys.readouterr().out

    a = scorer_assets
    factories = {
        "pickscore": make_scorer("pickscore", a["pick"], processor=a["proc"]),
        "hpsv2": make_scorer("hpsv2", a["hps"], tokenizer=a["tok"]),
        "hpsv2.1": make_scorer("hpsv2.1", a["hps"], tokenizer=a["tok"]),
        "aesthetic": make_scorer("aesthetic", a["mlp"], clip=a["clip"]),
        "clip_score": make_scorer("clip_score", a["clip"]),
        "image_reward": make_scorer(
            "image_reward", a["ir"] / "ImageReward.pt", tokenizer_path=a["ir"] / "tokenizer"
        ),
    }
    records = mf.read_manifest(samples)
    images = [Image.open(samples / r["file"]).convert("RGB") for r in records]
    prompts = [r["prompt"] for r in records]
    with open(samples / mf.SCORES_CSV) as f:
        table = {row["file"]: row for row in csv.DictReader(f)}
    assert len(table) == 6
    for name, scorer in factories.items():
        want = scorer(images, prompts).tolist()
        got = [float(table[r["file"]][name]) for r in records]
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6, err_msg=name)
        assert len({round(v, 6) for v in got}) > 1, name  # scores respond to the image
    assert table[records[0]["file"]]["prompt"] == records[0]["prompt"]

    # resumable: nothing is scored twice; a redrawn image (new sha256) is scored again
    code = main(
        [
            "score",
            "--samples",
            str(samples),
            "--scorers",
            "hpsv2,aesthetic",
            "--show_progress",
            "false",
            *flags,
        ]
    )
    assert code == 0 and "0 scores computed, 12 already there" in capsys.readouterr().out
    record = next(r for r in records if r["file"] == mf.image_name(0, 0))
    Image.new("RGB", (RESOLUTION, RESOLUTION), (200, 30, 30)).save(samples / record["file"])
    mf.append_jsonl(
        samples / mf.MANIFEST, [{**record, "sha256": mf.sha256_file(samples / record["file"])}]
    )
    code = main(
        [
            "score",
            "--samples",
            str(samples),
            "--scorers",
            "hpsv2",
            "--show_progress",
            "false",
            *flags,
        ]
    )
    assert code == 0 and "1 scores computed, 5 already there" in capsys.readouterr().out


def test_missing_weights_stop_with_one_line_naming_the_flag(
    sd_path, prompts_txt, root, scorer_assets, capsys
):
    samples = root / "to-score-missing"
    assert (
        main(
            sample_args(sd_path, prompts_txt, samples, "--seeds", "0", "--num_inference_steps", "2")
        )
        == 0
    )
    nowhere = str(root / "nowhere")
    for scorer, flag in [
        ("pickscore", "--pickscore"),
        ("hpsv2.1", "--hpsv2.1"),
        ("image_reward", "--image-reward"),
        ("aesthetic", "--aesthetic"),
    ]:
        capsys.readouterr()
        # a scorer that loads fine comes first: nothing may be scored before the failure
        code = main(
            [
                "score",
                "--samples",
                str(samples),
                "--scorers",
                f"clip_score,{scorer}",
                "--clip-score",
                str(scorer_assets["clip"]),
                flag,
                nowhere,
                "--show_progress",
                "false",
            ]
        )
        check_one_line_error(capsys, code, f"{flag} PATH", nowhere)
        assert not (samples / mf.SCORES).exists()
    code = main(
        ["score", "--samples", str(samples), "--scorers", "clip_score", "--clip-score", nowhere]
    )
    check_one_line_error(capsys, code, "--clip-score PATH", nowhere)
    # no flag: the factory's hub id, which is not in the (empty) cache of this machine
    code = main(["score", "--samples", str(samples), "--scorers", "hpsv2"])
    check_one_line_error(capsys, code, "--hpsv2 PATH", "HPS_v2_compressed.pt")
    code = main(["score", "--samples", str(samples), "--scorers", "pickscore,nope"])
    check_one_line_error(capsys, code, "scorers:", "nope")
    code = main(["score", "--samples", str(root), "--scorers", "pickscore"])
    check_one_line_error(capsys, code, "samples:", "manifest.jsonl")


# -------------------------------------------------------------------------------------- report
def fake_run(
    folder: Path, scores: dict[str, np.ndarray], seeds: list[int], prompts: list[str], colour: int
) -> None:
    """A scored sample folder with the given (seeds, prompts) score tables."""
    (folder / mf.IMAGES).mkdir(parents=True)
    manifest, lines = [], []
    for si, seed in enumerate(seeds):
        for pi, prompt in enumerate(prompts):
            name = mf.image_name(pi, seed)
            Image.new("RGB", (12, 12), (colour, 10 * pi, 20 * si)).save(folder / name)
            sha = mf.sha256_file(folder / name)
            manifest.append(
                {
                    "file": name,
                    "prompt_index": pi,
                    "prompt": prompt,
                    "category": "",
                    "seed": seed,
                    "sha256": sha,
                    "model": {"model_name_or_path": folder.name},
                    "sampling": {"guidance_scale": 7.5},
                }
            )
            for metric, table in scores.items():
                if not np.isnan(table[si, pi]):
                    lines.append(
                        {
                            "file": name,
                            "sha256": sha,
                            "scorer": metric,
                            "score": float(table[si, pi]),
                        }
                    )
    mf.append_jsonl(folder / mf.MANIFEST, manifest)
    mf.append_jsonl(folder / mf.SCORES, lines)


def hand_mean_std(table: np.ndarray) -> tuple[float, float]:
    per_seed = [sum(row) / len(row) for row in table.tolist()]
    mean = sum(per_seed) / len(per_seed)
    return mean, math.sqrt(sum((v - mean) ** 2 for v in per_seed) / len(per_seed))


def hand_win_rate(a: np.ndarray, b: np.ndarray) -> float:
    cells = list(zip(a.ravel().tolist(), b.ravel().tolist()))
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x, y in cells) / len(cells)


def test_report_numbers_equal_a_hand_computation(root, capsys):
    rng = np.random.default_rng(0)
    seeds, prompts = [0, 1, 2], ["p zero", "p one", "p two", "p three"]
    tables = {}
    for name in ("base", "dpo", "snpo"):
        tables[name] = {
            "hpsv2": rng.normal(27, 1, (3, 4)).round(1),
            "pickscore": rng.normal(21, 1, (3, 4)).round(1),
        }
    tables["dpo"]["hpsv2"][0, :2] = tables["base"]["hpsv2"][0, :2]  # ties count one half
    # an extra seed in one run and an unscored image in another: left out of every run
    extra = {m: np.vstack([t, rng.normal(20, 1, (1, 4))]) for m, t in tables["snpo"].items()}
    base = {m: t.copy() for m, t in tables["base"].items()}
    base["pickscore"] = np.hstack([base["pickscore"], [[np.nan]] * 3])
    base["hpsv2"] = np.hstack([base["hpsv2"], [[25.0]] * 3])
    folders = root / "report-runs"
    fake_run(folders / "base", base, seeds, prompts + ["p four"], 50)
    fake_run(folders / "dpo", tables["dpo"], seeds, prompts, 120)
    fake_run(folders / "snpo", extra, seeds + [9], prompts, 200)
    out = root / "report"
    code = main(
        [
            "report",
            "--runs",
            ",".join(str(folders / n) for n in ("base", "dpo", "snpo")),
            "--baseline",
            "base",
            "--output_dir",
            str(out),
            "--grid_prompts",
            "3",
            "--grid_seeds",
            "2",
            "--grid_cell",
            "16",
        ]
    )
    assert code == 0 and "report written" in capsys.readouterr().out

    with open(out / "results.csv") as f:
        rows = {row["run"]: row for row in csv.DictReader(f)}
    report = (out / "report.md").read_text()
    for name in ("base", "dpo", "snpo"):
        assert rows[name]["seeds"] == "3" and rows[name]["prompts"] == "4"
        for metric in ("hpsv2", "pickscore"):
            mean, std = hand_mean_std(tables[name][metric])
            assert float(rows[name][f"{metric}_mean"]) == pytest.approx(mean, abs=1e-12)
            assert float(rows[name][f"{metric}_std"]) == pytest.approx(std, abs=1e-12)
            assert f"{mean:.2f} ± {std:.2f}" in report
            if name == "base":
                assert rows[name][f"{metric}_win"] == ""
            else:
                win = hand_win_rate(tables[name][metric], tables["base"][metric])
                assert float(rows[name][f"{metric}_win"]) == pytest.approx(win, abs=1e-12)
                assert f"{100 * win:.1f}%" in report
    assert 0 < float(rows["dpo"]["hpsv2_win"]) < 1
    assert "| method | HPSv2 | PickScore |" in report  # the paper's column order
    assert "base 3, snpo 4" in report  # left-out images: base's prompt 4, snpo's seed 9
    with open(out / "per_seed.csv") as f:
        per_seed = [
            row for row in csv.DictReader(f) if row["run"] == "dpo" and row["metric"] == "pickscore"
        ]
    assert [float(r["mean"]) for r in per_seed] == pytest.approx(
        tables["dpo"]["pickscore"].mean(axis=1)
    )
    # the grid: one row per run, 3 prompts x 2 seeds, each cell the run's own image
    grid = np.asarray(Image.open(out / "samples.png").convert("RGB"))
    assert grid.shape == (14 + 3 * 18, 110 + 6 * 18, 3)
    for row, colour in enumerate((50, 120, 200)):
        for col in range(6):
            y, x = 14 + row * 18 + 8, 110 + col * 18 + 8
            assert grid[y, x, 0] == colour


def test_report_validates_before_reading(root, capsys):
    folders = root / "report-runs"
    runs = ",".join(str(folders / n) for n in ("base", "dpo"))
    for extra, needles in [
        (["--baseline", "nope"], ["baseline:", "nope"]),
        (["--names", "a"], ["names:", "one per run"]),
        (["--metrics", "image_reward"], ["metrics:", "image_reward"]),
    ]:
        code = main(["report", "--runs", runs, "--output_dir", str(root / "bad-report"), *extra])
        check_one_line_error(capsys, code, *needles)


def test_the_toy_demo_aggregates_with_the_shared_report_code():
    import snpo.evaluate.aggregate as shared
    import snpo.toy.demo_report as toy

    assert toy.markdown_table is shared.markdown_table and toy.image_grid is shared.image_grid
    scores = np.random.default_rng(0).normal(size=(4, 7)).astype(np.float32)
    # bit-identical to the toy report's own arithmetic before it moved here
    assert shared.seed_mean_std(scores) == shared.mean_std(scores.mean(axis=1))
    assert shared.fmt_seed_mean_std(scores) == shared.fmt_mean_std(scores.mean(axis=1))
