"""Issue 17, what a user watches during a run: validation images (the same images `snpo
sample` draws from the weights of that step; no training randomness taken, so the final
weights are bitwise those of a run without them, across a resume too), the live collapse
signal (a pure rule on checkpoint values, and the plot), and push_to_hub (what would be
uploaded, exactly; no hub is reachable here)."""

from __future__ import annotations

import importlib.util
import json
import random
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from fixtures_data import make_pickapic_parquet
from snpo.configuration import config_to_dict, load_config
from snpo.errors import ConfigError
from snpo.evaluate.sample import SampleConfig, run_sample
from snpo.training.collapse import (
    CURVES_FILE,
    CollapseWatch,
    checkpoint_values,
    collapse_note,
    falling_streak,
)
from snpo.training.config import TrainConfig
from snpo.training.hub import upload_plan
from snpo.training.job import build_job
from snpo.training.trainer import Callback
from tiny_pipelines import RESOLUTION, make_sd15

PROMPTS = ["a red cat, 8k", "a cat"]  # the first one has a comma: validation_prompt keeps it whole
SEEDS = [0, 3]
STEPS = (0, 2, 4)
TOKEN = "hf_SECRET_do_not_leak_0123456789"


# ---- a tiny SD1.5 run with validation every 2 steps, one without, and one resumed ----------
@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("validation")
    model = make_sd15(root / "sd")
    data = root / "train.parquet"
    make_pickapic_parquet(data, 6, with_ties=False)
    return root, model, data


def train_config(world, out: str, **overrides) -> TrainConfig:
    root, model, data = world
    values = dict(model_name_or_path=str(model), dataset_name=str(data), output_dir=str(root / out),
                  resolution=RESOLUTION, per_device_train_batch_size=2, learning_rate=1e-2,
                  lr_scheduler="constant", beta=500, lora_rank=4, cfg_dropout=0.5, max_steps=4,
                  checkpointing_steps=2, seed=0, report_to="none")
    values.update(overrides)
    return TrainConfig(**values)


WATCHING = dict(validation_prompt=PROMPTS[0], validation_prompts=PROMPTS[1:], validation_seeds=SEEDS,
                validation_steps=2, validation_num_inference_steps=2, validation_null_branch=True)


class RepoUrl(str):
    """What create_repo returns: the URL, with ``repo_id``."""

    repo_id: str


class FakeHub:
    """Stands in for huggingface_hub's create_repo / upload_folder and records the calls."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, tuple, dict]] = []

    def create_repo(self, repo_id, **kwargs):
        self.calls.append(("create_repo", (repo_id,), kwargs))
        url = RepoUrl(f"https://hub.test/{repo_id}")
        url.repo_id = repo_id
        return url

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", (), kwargs))
        return None


class RngProbe(Callback):
    """The global RNG states (python, numpy, torch) just before ``on_step_end`` (where the
    validation images are drawn) and just after it: they must be the same."""

    def __init__(self) -> None:
        self.before: tuple = ()
        self.same: dict[int, bool] = {}

    @staticmethod
    def states() -> tuple:
        kind, keys, *rest = np.random.get_state()
        return random.getstate(), (kind, keys.tobytes(), *rest), torch.get_rng_state()

    def after_optimizer(self) -> None:
        self.before = self.states()

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        after = self.states()
        self.same[step] = after[:2] == self.before[:2] and torch.equal(after[2], self.before[2])


@pytest.fixture(scope="module")
def runs(world):
    """``watched``: validation + tensorboard + push_to_hub (to a fake hub); ``plain``: the same
    run without any of it; ``resumed``: validation, 2 steps, then resumed to 4."""
    import huggingface_hub

    hub, probe = FakeHub(), RngProbe()
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(huggingface_hub, "create_repo", hub.create_repo)
        mp.setattr(huggingface_hub, "upload_folder", hub.upload_folder)
        watched = build_job(train_config(world, "watched", report_to="tensorboard", push_to_hub=True,
                                         hub_model_id="me/tiny-snpo", hub_token=TOKEN, hub_private_repo=True,
                                         **WATCHING), show_progress=False, callbacks=[probe])
        watched.trainer.train()
    plain = build_job(train_config(world, "plain"), show_progress=False)
    plain.trainer.train()
    root = world[0]
    build_job(train_config(world, "resumed", max_steps=2, **WATCHING), show_progress=False).trainer.train()
    shutil.copytree(root / "resumed", root / "resumed-step-2", ignore=shutil.ignore_patterns("checkpoints"))
    resumed = build_job(train_config(world, "resumed", resume_from_checkpoint="latest", **WATCHING),
                        show_progress=False)
    resumed.trainer.train()
    return SimpleNamespace(watched=root / "watched", plain=root / "plain", resumed=root / "resumed",
                           step2=root / "resumed-step-2", hub=hub, plain_job=plain, probe=probe,
                           resumed_from=resumed.trainer.start_step)


def pixels(path: Path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"), dtype=np.int16)


def assert_same_image(a: Path, b: Path) -> None:
    """Equal to uint8 rounding: snpo sample FUSES the LoRA (theta + B A) while validation runs
    the adapters (theta x + B A x); the two differ by float32 rounding (~1e-7 relative), which
    can move a pixel that sits on a rounding boundary by one level and nothing more."""
    x, y = pixels(a), pixels(b)
    assert x.shape == y.shape
    diff = np.abs(x - y)
    assert diff.max() <= 1, (a, b, diff.max())
    assert (diff > 0).mean() <= 0.01, (a, b, (diff > 0).mean())


def sample_with(world, folder: Path, prompts: list[str], **overrides) -> Path:
    root, model, _ = world
    folder.mkdir(parents=True, exist_ok=True)
    prompt_file = folder / "prompts.txt"
    prompt_file.write_text("".join(f"{p}\n" for p in prompts))
    config = SampleConfig(model_name_or_path=str(model), prompts=str(prompt_file), seeds=list(SEEDS),
                          num_inference_steps=2, resolution=RESOLUTION, output_dir=str(folder / "out"),
                          show_progress=False, **overrides)
    run_sample(config)
    return folder / "out" / "images"


def test_grids_exist_differ_and_are_the_images_snpo_sample_draws(world, runs, tmp_path):
    folder = runs.watched / "validation"
    grids = {step: (folder / f"step-{step:06d}.png").read_bytes() for step in STEPS}
    assert len(set(grids.values())) == len(STEPS), "the grids must change as the model trains"
    grid = Image.open(folder / "step-000000.png")  # rows = prompts, columns = seeds, 2 px apart
    assert grid.size == (len(SEEDS) * (RESOLUTION + 2) - 2, len(PROMPTS) * (RESOLUTION + 2) - 2)
    index = json.loads((folder / "index.json").read_text())
    assert index["prompts"] == PROMPTS and index["seeds"] == SEEDS

    # the weights of each step, sampled by snpo sample: the base (step 0), the 2-step run's
    # LoRA (the first two steps of the 4-step run, replayed exactly), the final LoRA
    weights = {0: None, 2: runs.step2, 4: runs.watched}
    for step, lora in weights.items():
        extra = {"lora": str(lora)} if lora else {}
        images = sample_with(world, tmp_path / f"cfg-{step}", PROMPTS, **extra)
        for i in range(len(PROMPTS)):
            for seed in SEEDS:
                assert_same_image(folder / f"step-{step:06d}" / f"p{i:05d}_s{seed}.png", images / f"p{i:05d}_s{seed}.png")
        # the null branch alone = snpo sample at guidance 0 (the prompt does not matter)
        nulls = sample_with(world, tmp_path / f"null-{step}", PROMPTS[:1], guidance_scale=0.0, **extra)
        for seed in SEEDS:
            assert_same_image(folder / f"step-{step:06d}" / f"null_s{seed}.png", nulls / f"p00000_s{seed}.png")
    # the tolerance is far below what two training steps change (a third of the pixels or more)
    moved = np.abs(pixels(folder / "step-000002" / "p00000_s0.png") - pixels(folder / "step-000004" / "p00000_s0.png"))
    assert moved.max() > 1 and (moved > 0).mean() > 0.1
    # at step 0 the adapters are zero: exactly the base model's images, byte for byte
    base = tmp_path / "cfg-0" / "out" / "images"
    assert (folder / "step-000000" / "p00001_s3.png").read_bytes() == (base / "p00001_s3.png").read_bytes()


@pytest.mark.parametrize("method", ["npo-negative", "chats"])
def test_dual_model_methods_validate_with_their_own_guide(world, tmp_path, method):
    """Diff-NPO's NPO model is drawn with the reference as the positive network (= `snpo sample
    --npo_negative OUT`), its null branch too; CHATS with its two networks (= `--chats OUT`)."""
    watching = dict(validation_prompts=PROMPTS[:1], validation_seeds=SEEDS, validation_steps=1,
                    validation_num_inference_steps=2, validation_null_branch=method == "npo-negative")
    config = train_config(world, f"dual-{method}", method=method, max_steps=1, checkpointing_steps=0,
                          cfg_dropout=0.0 if method == "npo-negative" else 0.5, **watching)
    build_job(config, show_progress=False).trainer.train()
    out = Path(config.output_dir)
    weights = {"npo_negative": str(out)} if method == "npo-negative" else {"chats": str(out)}
    images = sample_with(world, tmp_path / "cfg", PROMPTS[:1], method=method, **weights)
    for seed in SEEDS:
        assert_same_image(out / "validation" / "step-000001" / f"p00000_s{seed}.png", images / f"p00000_s{seed}.png")
    if method == "npo-negative":
        nulls = sample_with(world, tmp_path / "null", PROMPTS[:1], method=method, guidance_scale=0.0, **weights)
        for seed in SEEDS:
            assert_same_image(out / "validation" / "step-000001" / f"null_s{seed}.png", nulls / f"p00000_s{seed}.png")
    before = (out / "validation" / "step-000000.png").read_bytes()
    assert before != (out / "validation" / "step-000001.png").read_bytes()


def test_validation_takes_no_training_randomness_even_across_a_resume(runs):
    # the global RNGs come out of each validation as they went in (steps 2 and 4 draw; the
    # probe's callback runs after the validation one)
    assert runs.probe.same == {1: True, 2: True, 3: True, 4: True}
    assert runs.resumed_from == 2  # the second half really resumed from checkpoint-2
    plain = load_file(runs.plain / "pytorch_lora_weights.safetensors")
    for run in (runs.watched, runs.resumed):
        other = load_file(run / "pytorch_lora_weights.safetensors")
        assert plain.keys() == other.keys() and plain
        for key in plain:
            assert torch.equal(plain[key], other[key]), (run.name, key)
    # the resumed run draws the same images at steps 2 and 4 (step 0 was drawn before the stop)
    for step in (2, 4):
        name = f"step-{step:06d}.png"
        assert (runs.resumed / "validation" / name).read_bytes() == (runs.watched / "validation" / name).read_bytes()
    # with the keys off, nothing but the curves is added to the run
    kinds = {type(c).__name__ for c in runs.plain_job.trainer.callbacks}
    assert "CollapseWatch" in kinds and not {"ValidationImages", "HubRepo"} & kinds
    assert not (runs.plain / "validation").exists() and (runs.plain / CURVES_FILE).is_file()


def test_grids_are_logged_to_tensorboard(runs):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    steps: dict[str, list[int]] = {}
    for events in (runs.watched / "snpo").rglob("events.out.tfevents*"):
        acc = EventAccumulator(str(events), size_guidance={"images": 0})
        acc.Reload()
        for tag in acc.Tags()["images"]:
            steps.setdefault(tag, []).extend(e.step for e in acc.Images(tag))
    assert sorted(steps["validation/images"]) == list(STEPS)
    assert sorted(steps["validation/null_branch"]) == list(STEPS)


def test_push_to_hub_uploads_exactly_the_model_card_weights_grids_and_curves(runs):
    from huggingface_hub.utils import filter_repo_objects

    (name, args, create), (upload_name, _, upload) = runs.hub.calls
    assert (name, args, upload_name) == ("create_repo", ("me/tiny-snpo",), "upload_folder")
    assert create == {"token": TOKEN, "private": True, "exist_ok": True}
    assert upload["repo_id"] == "me/tiny-snpo" and upload["token"] == TOKEN
    assert upload["folder_path"] == str(runs.watched)
    expected = ["README.md", "pytorch_lora_weights.safetensors", CURVES_FILE, "validation/index.json",
                *[f"validation/step-{s:06d}{n}.png" for s in STEPS for n in ("", "-null")]]
    assert upload["allow_patterns"] == sorted(expected)
    # what huggingface_hub's own filter keeps of the whole folder: exactly those files
    everything = [p.relative_to(runs.watched).as_posix() for p in runs.watched.rglob("*") if p.is_file()]
    assert any(p.startswith("checkpoints/") for p in everything) and "metrics.jsonl" in everything
    kept = filter_repo_objects(everything, allow_patterns=upload["allow_patterns"],
                               ignore_patterns=upload["ignore_patterns"])
    assert sorted(kept) == sorted(expected)
    assert upload_plan(runs.watched, ["pytorch_lora_weights.safetensors"]) == sorted(expected)

    card = (runs.watched / "README.md").read_text()
    front = card.split("---")[1]
    assert "library_name: diffusers" in front and f"base_model: {runs.watched.parent / 'sd'}" in front
    assert "- lora" in front and "- snpo" in front
    assert "pipe.load_lora_weights('me/tiny-snpo')" in card  # the card points at the hub repo
    assert "![validation images, step 0](validation/step-000000.png)" in card
    assert "![validation images, step 4](validation/step-000004.png)" in card
    assert f"![training curves]({CURVES_FILE})" in card and "## Final metrics" in card
    # the token is nowhere: card, config dumps, tensorboard events and hparams, metrics
    for path in runs.watched.rglob("*"):
        if path.is_file():
            assert TOKEN.encode() not in path.read_bytes(), path


# ---- the collapse signal ----------------------------------------------------------------
def points(values):
    return [(i * 10, v) for i, v in enumerate(values)]


def test_collapse_note_fires_once_per_streak_and_is_silent_on_flat_or_noisy_histories():
    falling = [0.0, -0.1, -0.2, -0.3, -0.4, -0.5]
    fired = [collapse_note(points(falling[: n + 1]), 3) for n in range(len(falling))]
    assert [f is not None for f in fired] == [False, False, False, True, False, False]  # once, at the 3rd fall
    assert "logratio/chosen has fallen for 3 checkpoints in a row (0 -> -0.3, steps 0-30)" in fired[3]
    assert "watch the validation images" in fired[3]
    for quiet in ([0.0] * 8, [0.0, 0.1, -0.1, 0.2, -0.2, 0.1, 0.0, 0.05], [0.0, -0.1, -0.2, -0.2, -0.3]):
        assert all(collapse_note(points(quiet[: n + 1]), 3) is None for n in range(len(quiet)))
    # a recovery ends the streak; a new streak of 3 falls is noted again
    again = [0.0, -0.1, -0.2, -0.3, 0.5, 0.4, 0.3, 0.2]
    fired = [n for n in range(len(again)) if collapse_note(points(again[: n + 1]), 3)]
    assert fired == [3, 7]
    assert collapse_note(points(falling), 0) is None  # 0 = never
    assert falling_streak([1, 2, 1, 0]) == 2 and falling_streak([1]) == 0


def test_checkpoint_values_are_window_means_from_zero():
    history = [{"step": s, "logratio/chosen": v} for s, v in [(1, 1.0), (2, 3.0), (3, -1.0), (4, None), (5, 2.0)]]
    assert checkpoint_values(history, [2, 4, 5]) == [(0, 0.0), (2, 2.0), (4, -1.0), (5, 2.0)]


def test_the_note_and_the_plot_from_a_constructed_run(tmp_path):
    printed: list[str] = []
    accelerator = SimpleNamespace(is_main_process=True, print=printed.append)
    config = SimpleNamespace(output_dir=str(tmp_path), checkpointing_steps=2, collapse_patience=2,
                             method="snpo", model_name_or_path="tiny")
    watch = CollapseWatch(config)
    watch.on_loop_begin(SimpleNamespace(accelerator=accelerator, start_step=0))
    for step in range(1, 9):
        value = -0.01 * step if step <= 6 else 0.5  # falls for 3 checkpoints, then recovers
        watch.on_step_end(step, {"step": step, "logratio/chosen": value, "logratio/rejected": 2 * value,
                                 "rewards/margins": 0.1, "branch/conditional/accuracy": 0.5})
        if step % 2 == 0:
            watch.on_checkpoint(step, tmp_path / f"checkpoint-{step}")
    assert len(printed) == 1 and "fallen for 2 checkpoints in a row" in printed[0] and "steps 0-4" in printed[0]
    png = (tmp_path / CURVES_FILE).read_bytes()
    assert png.startswith(b"\x89PNG")
    watch.on_train_end(accelerator)  # nothing new since the last checkpoint: not redrawn
    assert (tmp_path / CURVES_FILE).read_bytes() == png


# ---- the keys, checked before anything loads ----------------------------------------------
@pytest.mark.parametrize("key, value", [
    ("validation_steps", "0"), ("validation_seeds", "[]"), ("validation_seeds", "1,1"),
    ("validation_num_inference_steps", "0"), ("validation_guidance_scale", "-1"),
    ("validation_scheduler", "nonsense"), ("validation_prompts_file", "/no/such/prompts.txt"),
    ("validation_prompts", "['a', '']"), ("validation_prompt", " "), ("collapse_patience", "-1"),
    ("hub_model_id", "a/b/c"), ("hub_token", ""),
])
def test_each_new_key_is_checked_with_an_error_naming_it(key, value):
    with pytest.raises(ConfigError, match=f"^{key}: "):
        load_config(TrainConfig, overrides=["--model_name_or_path", "nowhere", "--dataset_name", "nothing",
                                            "--validation_prompt", "a cat", f"--{key}", value])


def test_settings_that_cannot_work_stop_before_anything_loads(tmp_path, monkeypatch):
    base = ["--model_name_or_path", "nowhere", "--dataset_name", "nothing"]
    cases = {
        "validation_prompts": ["--validation_prompt", "a", "--cache_dir", str(tmp_path)],
        "validation_null_branch": ["--validation_null_branch", "--validation_prompt", "a", "--method", "chats"],
    }
    for key, args in cases.items():
        with pytest.raises(ConfigError, match=f"^{key}: "):
            load_config(TrainConfig, overrides=[*base, *args])
    with pytest.raises(ConfigError, match="^validation_null_branch: .*give validation_prompt"):
        load_config(TrainConfig, overrides=[*base, "--validation_null_branch"])
    with pytest.raises(ConfigError, match="^hub_model_id: null, and the output folder's name"):
        load_config(TrainConfig, overrides=[*base, "--push_to_hub", "--output_dir", str(tmp_path / "bad name!")])
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "huggingface_hub" else real(name, *a))
    with pytest.raises(ConfigError, match="^push_to_hub: huggingface_hub is not installed"):
        load_config(TrainConfig, overrides=[*base, "--push_to_hub"])


def test_the_token_is_a_secret_and_prompts_keep_their_commas():
    config = load_config(TrainConfig, overrides=["--model_name_or_path", "m", "--dataset_name", "d",
                                                 "--hub_token", TOKEN, "--validation_prompt", "a cat, 8k, photo"])
    assert config.hub_token == TOKEN and "hub_token" not in config_to_dict(config) and TOKEN not in repr(config)
    with pytest.raises(ConfigError, match="^hub_token: not with report_to wandb"):  # as diffusers refuses it
        load_config(TrainConfig, overrides=["--model_name_or_path", "m", "--dataset_name", "d",
                                            "--hub_token", TOKEN, "--report_to", "wandb"])
    assert config.validation_prompt == "a cat, 8k, photo"


def test_the_card_keeps_the_front_matter_hub_users_expect(tmp_path):
    from snpo.training.model_card import render_model_card

    base = tmp_path / "base"
    base.mkdir()
    (base / "README.md").write_text("---\nlicense: creativeml-openrail-m\ntags: [x]\n---\n# a base model\n")
    config = TrainConfig(model_name_or_path=str(base), dataset_name="yuvalkirstain/pickapic_v2", lora_rank=4,
                         output_dir=str(tmp_path / "out"), hub_token=TOKEN)
    card = render_model_card(config, {"family": "sd", "pipeline_class": "StableDiffusionPipeline"},
                             {"files": ["pytorch_lora_weights.safetensors"], "hub_model_id": "me/run"})
    front = card.split("---")[1]
    assert "license: creativeml-openrail-m" in front and "- yuvalkirstain/pickapic_v2" in front
    assert "pipe.load_lora_weights('me/run')" in card and TOKEN not in card
