"""``snpo train`` end to end on tiny SD1.5-like and SDXL-like pipelines saved to disk and a
generated Pick-a-Pic parquet with ties, both label orders and bad rows: the result loads into
the diffusers pipeline and changes its output; bad data stops before any model loads."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from conftest import colour_pairs
from fixtures_data import make_pickapic_parquet
from snpo.cli import main
from snpo.configuration import load_config
from snpo.methods import get_method
from snpo.methods.single import SingleNetworkMethod
from snpo.toy.data import stack_batch
from snpo.training.config import TrainConfig
from snpo.training.trainer import Trainer
from tiny_pipelines import RESOLUTION, make_sd15, make_sdxl

ROOT = Path(__file__).resolve().parents[1]

METRICS = (
    "loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies",
    "branch/negative_fraction", "logratio/chosen", "logratio/rejected", "grad_norm", "lr",
    "pairs_per_second", "peak_memory_gb",
)


@pytest.fixture(scope="module")
def pickapic(tmp_path_factory):
    """10 rows: 2 ties, winners in both columns, one unreadable image (found only when
    decoded), one bad label, one empty caption -> 6 pairs pass the scan, 5 are readable."""
    path = tmp_path_factory.mktemp("data") / "train-00000.parquet"
    info = make_pickapic_parquet(path, 10, bad_rows={"unreadable_image": 1, "bad_label": 1, "empty_caption": 1})
    assert {r.winner_index for r in info.rows if r.kind == "ok"} == {0, 1}
    assert info.expected_counts["tie"] == 2
    return path


def common_args(model, data, out, **overrides) -> list[str]:
    values = dict(model_name_or_path=model, dataset_name=data, output_dir=out, resolution=RESOLUTION,
                  per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", beta=500,
                  checkpointing_steps=2, seed=0)
    values.update(overrides)
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


def images(pipe, **kwargs) -> np.ndarray:
    generator = torch.Generator().manual_seed(0)
    return pipe("a red cat", num_inference_steps=2, height=RESOLUTION, width=RESOLUTION,
                generator=generator, output_type="np", **kwargs).images


def test_sd15_lora_end_to_end_loads_into_the_pipeline(tmp_path, pickapic, capsys):
    model = make_sd15(tmp_path / "sd")
    out = tmp_path / "out"
    config = tmp_path / "sd15.yaml"  # YAML file + command-line overrides
    config.write_text(yaml.safe_dump({"objective": "snpo", "mix_lambda": 0.9, "cfg_dropout": 0.5,
                                      "lora_rank": 4, "max_steps": 3}))
    assert main(["train", "--config", str(config), *common_args(model, pickapic, out)]) == 0
    assert "kept 6 of 10 pairs; skipped: tie 2, empty_caption 1, bad_label 1" in capsys.readouterr().out

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]
    assert all(k in lines[-1] for k in METRICS)
    assert list((out / "snpo").rglob("events.out.tfevents*"))  # tensorboard
    assert (out / "checkpoints" / "latest").read_text() == "checkpoint-3"
    card = (out / "README.md").read_text()
    assert "load_lora_weights" in card and "method: snpo" in card and "rewards/accuracies" in card
    # the 3 steps x 2 pairs visit all 6 scanned pairs: the unreadable one was met and counted
    assert "unreadable_image 1" in card

    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert lora and all(v.dtype == torch.float32 for v in lora.values())
    pipe = StableDiffusionPipeline.from_pretrained(model, safety_checker=None)
    before = images(pipe)
    pipe.load_lora_weights(out)
    after = images(pipe)
    assert np.abs(after - before).max() > 1e-3

    # resume: 3 -> 4 steps continues from the checkpoint, one more line in the log
    assert main(["train", "--config", str(config), *common_args(model, pickapic, out),
                 "--max_steps", "4", "--resume_from_checkpoint", "latest"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]


def test_sdxl_full_finetune_v_prediction_end_to_end(tmp_path, pickapic):
    model = make_sdxl(tmp_path / "sdxl", prediction_type="v_prediction")
    out = tmp_path / "out"
    args = common_args(model, pickapic, out, method="dpo", lora_rank=0, max_steps=2, cfg_dropout=0.5,
                       learning_rate=1e-3, checkpointing_steps=0)
    assert main(["train", *args]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert sum(m["branch/negative_fraction"] for m in lines) > 0  # the null branch was trained
    assert not (out / "checkpoints").exists()  # checkpointing_steps 0: the model only

    trained = UNet2DConditionModel.from_pretrained(out, subfolder="unet")
    original = UNet2DConditionModel.from_pretrained(model, subfolder="unet")
    changed = [k for k, v in original.state_dict().items() if not torch.equal(v, trained.state_dict()[k])]
    assert len(changed) > 0.5 * len(original.state_dict())
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    before = images(pipe)
    after = images(StableDiffusionXLPipeline.from_pretrained(model, unet=trained))
    assert np.abs(after - before).max() > 1e-3
    assert "UNet2DConditionModel.from_pretrained" in (out / "README.md").read_text()


def test_sdxl_lora_loads_into_the_sdxl_pipeline(tmp_path, pickapic):
    model = make_sdxl(tmp_path / "sdxl")
    out = tmp_path / "out"
    args = common_args(model, pickapic, out, lora_rank=4, max_steps=2, checkpointing_steps=0, report_to="none")
    assert main(["train", *args]) == 0
    pipe = StableDiffusionXLPipeline.from_pretrained(model)
    before = images(pipe)
    pipe.load_lora_weights(out)
    assert np.abs(images(pipe) - before).max() > 1e-3


def test_bf16_lora_with_accumulation_and_checkpointing(tmp_path, pickapic):
    """Mixed precision: frozen weights in bf16, trainable LoRA weights (and the file) float32."""
    model = make_sd15(tmp_path / "sd")
    out = tmp_path / "out"
    args = common_args(model, pickapic, out, lora_rank=2, max_steps=1, mixed_precision="bf16",
                       gradient_checkpointing="true", gradient_accumulation_steps=2,
                       per_device_train_batch_size=1, checkpointing_steps=0, report_to="none")
    assert main(["train", *args]) == 0
    lora = load_file(out / "pytorch_lora_weights.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in lora.values())
    assert any("lora_B" in k or "lora.up" in k for k in lora)
    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["loss"] is not None and np.isfinite(logged["grad_norm"])


@pytest.fixture
def no_model_load(monkeypatch):
    import snpo.training.job as job

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the data was checked")

    monkeypatch.setattr(job, "load_backbone", forbidden)


def test_no_usable_rows_stops_before_the_model_loads(tmp_path, capsys, no_model_load):
    model = make_sd15(tmp_path / "sd")
    data = tmp_path / "bad.parquet"
    make_pickapic_parquet(data, 5, with_ties=False, bad_rows={"bad_label": 2, "empty_caption": 3})
    capsys.readouterr()  # drop the model builder's progress output
    assert main(["train", *common_args(model, data, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no usable preference pairs" in err and "bad_label 2" in err and "empty_caption 3" in err
    assert not (tmp_path / "out").exists()


def test_missing_column_and_bad_config_are_one_line_errors(tmp_path, capsys, no_model_load):
    model = make_sd15(tmp_path / "sd")
    data = tmp_path / "nolabel.parquet"
    make_pickapic_parquet(data, 4, drop_columns=("label_1",))
    capsys.readouterr()
    assert main(["train", *common_args(model, data, tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "label_1" in err

    assert main(["train", *common_args(model, data, tmp_path / "out"), "--learning_rat", "1"]) == 2
    assert "did you mean 'learning_rate'" in capsys.readouterr().err
    assert main(["train", *common_args(tmp_path / "nowhere", data, tmp_path / "out")]) == 2
    assert "model_name_or_path" in capsys.readouterr().err
    if importlib.util.find_spec("wandb") is None:
        assert main(["train", *common_args(model, data, tmp_path / "out"), "--report_to", "wandb"]) == 2
        assert "wandb is not installed" in capsys.readouterr().err


@pytest.mark.parametrize("preset", sorted(p.name for p in (ROOT / "configs").glob("*.yaml")))
def test_presets_are_valid_configs(preset):
    config = load_config(TrainConfig, ROOT / "configs" / preset)
    assert config.model_name_or_path and config.dataset_name and config.method in ("snpo", "dpo", "npo-negative", "chats")
    # Diffusion-DPO's betas (SD1.5 2000, SDXL 5000); flow models (velocity targets): flow_grpo's
    # SD3.5 Medium beta 100, the same convention (docs/method.md, "Flow-matching models")
    expected = {"sdxl": 5000.0, "sd35": 100.0, "flux": 100.0}.get(preset.split("-")[0], 2000.0)
    if preset == "sd15-npo-negative.yaml":  # the public Diff-NPO run's beta_dpo 500, with no 1/2
        expected = 1000.0
    assert config.beta == expected
    if preset.startswith(("sd35", "flux")):
        assert config.mixed_precision == "bf16" and config.lora_rank > 0
    if preset.startswith("flux") and not config.true_cfg:  # FLUX.1-dev samples with no null branch
        assert config.cfg_dropout == 0 and not get_method(config.method).trains_null_branch


def test_empty_micro_batch_is_skipped_in_one_process(tiny_toy, tmp_path):
    """A batch whose every pair was unreadable adds no gradient and does not break the step."""
    data = colour_pairs(8)
    calls = []

    def collate(items):
        calls.append(len(items))
        if len(calls) == 1:
            return {"size": 0, "prompt": [], "skipped": []}
        return {**stack_batch(items), "size": len(items)}

    config = TrainConfig(output_dir=str(tmp_path / "o"), max_steps=2, per_device_train_batch_size=2,
                         gradient_accumulation_steps=2, learning_rate=1e-3, beta=500.0,
                         report_to="none", checkpointing_steps=0)
    method = SingleNetworkMethod(tiny_toy, config.objective_config, config.cfg_dropout)
    result = Trainer(config, tiny_toy, data, method, collate_fn=collate, show_progress=False,
                     save_model=False, write_logs=False).train()
    assert result.global_step == 2 and len(calls) == 4
    assert all(np.isfinite(h["loss"]) for h in result.history)


def test_diff_npo_negative_run_is_dpo_on_reversed_labels(tmp_path, pickapic):
    """One step from LoRA B = 0: policy = reference, so z = 0 and reversing the labels flips
    the sign of the gradient of every lora_B exactly; AdamW's first step is odd in the gradient
    (lr g / (|g| + eps)), and lora_A gets no gradient while B = 0. So the negative model's B is
    minus dpo's, and the A factors are equal."""
    model = make_sd15(tmp_path / "sd")
    runs = {}
    for method in ("dpo", "npo-negative"):
        out = tmp_path / method
        args = common_args(model, pickapic, out, method=method, lora_rank=4, max_steps=1,
                           cfg_dropout=0.0, checkpointing_steps=0, report_to="none")
        assert main(["train", *args]) == 0
        runs[method] = load_file(out / "pytorch_lora_weights.safetensors")
    dpo, negative = runs["dpo"], runs["npo-negative"]
    b_keys = [k for k in dpo if "lora_B" in k or "lora.up" in k]
    a_keys = [k for k in dpo if k not in b_keys]
    assert b_keys and a_keys and dpo.keys() == negative.keys()
    assert max(dpo[k].abs().max() for k in b_keys) > 1e-3  # the step did move B
    for k in b_keys:
        torch.testing.assert_close(negative[k], -dpo[k], atol=1e-6, rtol=1e-4)
    for k in a_keys:
        torch.testing.assert_close(negative[k], dpo[k])
    card = (tmp_path / "npo-negative" / "README.md").read_text()
    assert "Diff-NPO's negative model" in card and "--npo_negative" in card


def test_chats_trains_two_networks_that_snpo_sample_loads(tmp_path, pickapic):
    model = make_sd15(tmp_path / "sd")
    out = tmp_path / "chats"
    args = common_args(model, pickapic, out, method="chats", lora_rank=4, max_steps=2,
                       checkpointing_steps=1, report_to="none")
    assert main(["train", *args]) == 0
    win = load_file(out / "win" / "pytorch_lora_weights.safetensors")
    lose = load_file(out / "lose" / "pytorch_lora_weights.safetensors")
    assert win.keys() == lose.keys()
    assert any(not torch.equal(win[k], lose[k]) for k in win)  # trained apart, on different images
    assert "CHATS" in (out / "README.md").read_text()
    # the checkpoint holds both networks: resuming continues from it
    assert main(["train", *args, "--max_steps", "3", "--resume_from_checkpoint", "latest"]) == 0
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3]

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    samples = tmp_path / "samples"
    assert main(["sample", "--model_name_or_path", str(model), "--chats", str(out), "--prompts", str(prompts),
                 "--output_dir", str(samples), "--num_inference_steps", "2", "--seeds", "0",
                 "--show_progress", "false"]) == 0
    assert len(list(samples.rglob("*.png"))) == 1


def test_dual_model_settings_are_checked_before_loading(tmp_path, capsys, no_model_load):
    for extra, field in [(["--method", "npo-negative", "--objective", "snpo"], "objective"),
                         (["--method", "chats", "--precompute_reference", "true",
                           "--cache_dir", str(tmp_path)], "precompute_reference"),
                         (["--method", "npo"], "method")]:
        assert main(["train", "--model_name_or_path", str(tmp_path), "--dataset_name", str(tmp_path), *extra]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and f"{field}:" in err, err
