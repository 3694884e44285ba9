"""The launcher's engine against the snpo config: a DeepSpeed or FSDP launch whose
accumulation, clipping or batch disagrees with the snpo config (or that snpo does not support)
stops with ONE line naming the snpo field, before the data is scanned or any model loads, and
without the deepspeed package. The environment is what ``accelerate launch`` sets in every
rank (``snpo.training.engines``' docstring), set here directly.

The real launches (two FSDP / DeepSpeed ranks training) are in ``test_fsdp.py`` and
``test_deepspeed.py``."""

from __future__ import annotations

import json

import pytest

import snpo.training.data as training_data
import snpo.training.job as job
import snpo.training.run as run
from fixtures_data import make_pickapic_parquet
from snpo.cli import main
from snpo.training.config import TrainConfig
from snpo.training.engines import check_engine, fill_engine_env, launch_engine
from tiny_pipelines import RESOLUTION, make_sd15

ENGINE_VARS = ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_FSDP", "FSDP_VERSION", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS",
               "ACCELERATE_GRADIENT_CLIPPING", "ACCELERATE_DEEPSPEED_CONFIG_FILE", "ACCELERATE_DEEPSPEED_ZERO_STAGE")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("engines")
    data = root / "train-00000.parquet"
    make_pickapic_parquet(data, 6, with_ties=False)
    return root, make_sd15(root / "sd"), data


@pytest.fixture
def clean_env(monkeypatch):
    for name in ENGINE_VARS:
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.fixture
def nothing_loads(monkeypatch):
    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the engine was checked")

    def no_scan(*args, **kwargs):
        raise AssertionError("the data was scanned before the engine was checked")

    monkeypatch.setattr(job, "load_backbone", no_model)
    monkeypatch.setattr(run, "load_job_backbone", no_model)
    monkeypatch.setattr(training_data, "scan_source", no_scan)


def ds_file(tmp_path, **values) -> str:
    config = {"zero_optimization": {"stage": 2}, "gradient_accumulation_steps": "auto",
              "gradient_clipping": "auto", "train_micro_batch_size_per_gpu": "auto", **values}
    path = tmp_path / "ds.json"
    path.write_text(json.dumps(config))
    return str(path)


def refused(world, capsys, extra: list[str] | None = None) -> str:
    root, model, data = world
    capsys.readouterr()
    code = main(["train", "--model_name_or_path", str(model), "--dataset_name", str(data),
                 "--output_dir", str(root / "out"), "--resolution", str(RESOLUTION), "--report_to", "none",
                 *(extra or [])])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    assert not (root / "out").exists()
    return err[0]


@pytest.mark.parametrize("env, extra, expected", [
    # accelerate reads ACCELERATE_GRADIENT_ACCUMULATION_STEPS before its argument (any engine)
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "256"}, [],
     "gradient_accumulation_steps: the snpo config says 1, ACCELERATE_GRADIENT_ACCUMULATION_STEPS"),
    ({"ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "4"}, ["--gradient_accumulation_steps", "2"],
     "gradient_accumulation_steps: the snpo config says 2"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_CLIPPING": "0.5"}, [],
     "max_grad_norm: the snpo config says 1, ACCELERATE_GRADIENT_CLIPPING"),
    ({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_CLIPPING": "1.0"}, ["--max_grad_norm", "0"],
     "max_grad_norm: the snpo config says 0"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "1"}, [], "fsdp_version: the accelerate config asks for FSDP1"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--method", "chats", "--lora_rank", "4"],
     "method: chats under fsdp is not supported"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["--method", "chats", "--lora_rank", "4"],
     "method: chats under deepspeed is not supported"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--optimizer", "adafactor"],
     "optimizer: adafactor is not supported under fsdp"),
    ({"ACCELERATE_USE_DEEPSPEED": "true"}, ["--optimizer", "adafactor"],
     "optimizer: adafactor is not supported under deepspeed"),
    ({"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}, ["--reference_offload", "true"],
     "reference_offload: under FSDP the frozen reference is sharded"),
], ids=["ds-accumulation", "env-accumulation", "ds-clipping", "ds-clipping-snpo-off", "fsdp1", "fsdp-chats",
        "ds-chats", "fsdp-adafactor", "ds-adafactor", "fsdp-offload"])
def test_a_mismatched_engine_is_refused_in_one_line_before_anything_loads(world, clean_env, nothing_loads, capsys,
                                                                          env, extra, expected):
    for name, value in env.items():
        clean_env.setenv(name, value)
    line = refused(world, capsys, extra)
    assert line.startswith(f"snpo train: error: {expected}"), line


@pytest.mark.parametrize("values, extra, expected", [
    ({"gradient_accumulation_steps": 8}, [], "gradient_accumulation_steps: the snpo config says 1, the DeepSpeed config"),
    ({"gradient_clipping": 0.3}, [], "max_grad_norm: the snpo config says 1, the DeepSpeed config"),
    ({"train_micro_batch_size_per_gpu": 4}, [], "per_device_train_batch_size: the snpo config says 1"),
    ({"train_batch_size": 64}, [], "per_device_train_batch_size: 1 x gradient_accumulation_steps 1 x 1 processes"),
], ids=["accumulation", "clipping", "micro-batch", "train-batch"])
def test_a_mismatched_deepspeed_json_is_refused(world, clean_env, nothing_loads, capsys, tmp_path, values, extra,
                                                expected):
    clean_env.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    clean_env.setenv("ACCELERATE_DEEPSPEED_CONFIG_FILE", ds_file(tmp_path, **values))
    line = refused(world, capsys, extra)
    assert line.startswith(f"snpo train: error: {expected}"), line


def test_a_deepspeed_json_without_clipping_means_no_clipping(tmp_path):
    """DeepSpeed does not clip without ``gradient_clipping``: that disagrees with a
    max_grad_norm > 0 and agrees with 0."""
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path)}
    engine = launch_engine(env)
    assert (engine.kind, engine.zero_stage, engine.clipping) == ("deepspeed", 3, 0.0)
    with pytest.raises(ValueError, match="^max_grad_norm: the snpo config says 1, the DeepSpeed config"):
        check_engine(TrainConfig(max_grad_norm=1.0), engine)
    check_engine(TrainConfig(max_grad_norm=0.0), engine)


def test_auto_deepspeed_values_are_filled_from_the_snpo_config():
    """``auto`` (or unset) accumulation and clipping become snpo's, so DeepSpeed does not
    clip at accelerate's default 1.0 while snpo asked for 0.5."""
    config = TrainConfig(gradient_accumulation_steps=3, max_grad_norm=0.5)
    env = {"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_GRADIENT_CLIPPING": "auto"}
    engine = check_engine(config, launch_engine(env))
    fill_engine_env(config, engine, env)
    assert env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] == "3" and env["ACCELERATE_GRADIENT_CLIPPING"] == "0.5"
    check_engine(config, launch_engine(env))  # now they agree
    ddp = {"WORLD_SIZE": "2"}
    fill_engine_env(config, launch_engine(ddp), ddp)
    assert ddp == {"WORLD_SIZE": "2"}  # nothing to fill for DDP


def test_engines_read_from_the_environment():
    assert launch_engine({}).kind == "single"
    assert launch_engine({"WORLD_SIZE": "2"}).kind == "ddp"
    fsdp = launch_engine({"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"})
    assert (fsdp.kind, fsdp.fsdp_version, fsdp.sharded) == ("fsdp", 2, True)
    ds = launch_engine({"ACCELERATE_USE_DEEPSPEED": "true", "ACCELERATE_DEEPSPEED_ZERO_STAGE": "3",
                        "ACCELERATE_GRADIENT_ACCUMULATION_STEPS": "2", "ACCELERATE_GRADIENT_CLIPPING": "1.0"})
    assert (ds.kind, ds.zero_stage, ds.accumulation, ds.clipping) == ("deepspeed", 3, 2, 1.0)
    check_engine(TrainConfig(gradient_accumulation_steps=2, max_grad_norm=1.0), ds)  # agreeing: fine
