"""Bad settings: every field of ``TrainConfig`` is checked before any model or data loads,
and a bad value stops ``snpo train`` with ONE line naming the field, the value and what is
allowed (exit code 2); unknown YAML keys are errors with a suggestion for a likely typo.

``test_every_field_has_a_bad_value_case`` walks the dataclass: a new field without a case here
(or a reason in ``FREE_FORM``) fails it, so new settings get validated too.
"""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

import snpo.training.data as training_data
import snpo.training.job as job
import snpo.training.run as run
from fixtures_data import make_pickapic_parquet
from snpo.cli import main
from snpo.configuration import load_config
from snpo.errors import ConfigError
from snpo.training.config import TrainConfig
from tiny_pipelines import RESOLUTION, make_sd15

FILE = "<an existing file>"  # replaced by a real file's path

# (field, bad value on the command line, what the message must say is allowed or wrong[, the
# field the message names when it is another one])
CASES = [
    ("model_name_or_path", "", "expected a path or hub id"),
    ("model_name_or_path", "/nonexistent/model", "no such folder"),
    ("pretrained_vae_model_name_or_path", "/nonexistent/vae", "no such folder"),
    ("variant", "fp17", "no weight files of variant 'fp17'"),
    ("dataset_name", "", "expected a path or hub id"),
    ("dataset_name", "/nonexistent/data.parquet", "no such file or directory"),
    ("dataset_split", "nosuch", "no parquet shards of split 'nosuch'"),
    ("output_dir", FILE, "exists and is not a folder"),
    ("output_dir", "", "expected a path or hub id"),
    ("cache_dir", "/nonexistent/cache", "no cache in"),
    ("cache_shard_size", "0", "expected an integer >= 1"),
    ("cache_shard_size", "abc", "expected an integer"),
    ("cache_batch_size", "0", "expected an integer >= 1"),
    ("max_train_samples", "0", "expected an integer >= 1 or null"),
    ("drop_ties", "maybe", "expected true or false"),
    ("max_caption_chars", "0", "expected an integer >= 1 or null"),
    ("max_caption_chars", "many", "expected an integer"),
    ("resolution", "12", "expected a multiple of 8"),
    ("resolution", "16.5", "expected an integer"),
    ("center_crop", "maybe", "expected true or false"),
    ("random_flip", "2", "expected true or false"),
    ("dataloader_num_workers", "-1", "expected an integer >= 0"),
    ("objective", "spno", "expected one of"),
    ("beta", "0", "expected a finite number > 0"),
    ("beta", "nan", "expected a finite number"),
    ("beta", "abc", "expected a number"),
    ("mix_lambda", "1.5", "expected a number in (0, 1]"),
    ("mix_lambda", "nan", "expected a finite number"),
    ("mix_scale", "0", "expected a finite number > 0 or null"),
    ("mix_scale", "inf", "expected a finite number or null"),
    ("cfg_dropout", "1", "expected a probability in [0, 1)"),
    ("cfg_dropout", "nan", "expected a finite number"),
    ("chats_lose_prompt_dropout", "1.5", "expected a probability in [0, 1]"),
    ("method", "npo", "expected one of sft, dpo, bdpo, snpo-naive, snpo, npo-negative, chats"),
    ("max_steps", "0", "expected an integer >= 1"),
    ("max_steps", "1.5", "expected an integer"),
    ("per_device_train_batch_size", "0", "expected an integer >= 1"),
    ("gradient_accumulation_steps", "0", "expected an integer >= 1"),
    ("learning_rate", "0", "expected a number > 0"),
    ("learning_rate", "inf", "expected a finite number"),
    ("scale_lr", "maybe", "expected true or false"),
    ("lr_scheduler", "cosin", "expected one of constant"),
    ("lr_warmup_steps", "-1", "expected an integer >= 0"),
    ("adam_beta1", "1", "expected a number in [0, 1)"),
    ("adam_beta2", "-0.1", "expected a number in [0, 1)"),
    ("adam_weight_decay", "-1", "expected a number >= 0"),
    ("adam_epsilon", "0", "expected a number > 0"),
    ("max_grad_norm", "-1", "expected a number >= 0"),
    ("max_grad_norm", "nan", "expected a finite number"),
    ("max_nonfinite_steps", "0", "expected an integer >= 1"),
    ("adam_implementation", "fastest", "expected one of fused, foreach, forloop"),
    ("lora_rank", "-1", "expected an integer >= 0"),
    ("mixed_precision", "fp8", "expected one of no, fp16, bf16"),
    ("upcast_vae", "maybe", "expected true or false"),
    ("channels_last", "maybe", "expected true or false"),
    ("torch_compile", "maybe", "expected true or false"),
    ("precompute_reference", "true", "precompute_reference needs a folder", "reference_errors_dir"),
    ("gradient_checkpointing", "maybe", "expected true or false"),
    ("allow_tf32", "maybe", "expected true or false"),
    ("optimizer", "sgd", "expected one of adamw, adafactor, adamw8bit"),
    ("reference_dtype", "fp8", "expected one of auto, fp32, bf16, fp16"),
    ("reference_offload", "maybe", "expected true or false"),
    ("weighting_scheme", "cosmap", "expected one of logit_normal, mode, uniform, none"),
    ("logit_mean", "nan", "expected a finite number"),
    ("logit_std", "0", "expected a number > 0"),
    ("mode_scale", "abc", "expected a number"),
    ("max_sequence_length", "0", "expected an integer >= 1 or null"),
    ("use_t5", "maybe", "expected true or false"),
    ("embedded_guidance_scale", "-1", "expected a number >= 0"),
    ("true_cfg", "maybe", "expected true or false"),
    ("checkpointing_steps", "-1", "expected an integer >= 0"),
    ("checkpoints_total_limit", "0", "expected an integer >= 1 or null"),
    ("resume_from_checkpoint", "/nonexistent/checkpoint-3", "is not a complete checkpoint folder"),
    ("logging_steps", "0", "expected an integer >= 1"),
    ("report_to", "tensorbord", "expected one of tensorboard, wandb, none, all"),
    ("tracker_project_name", "runs/x", "expected a non-empty name without slashes"),
    ("seed", "-1", "expected an integer in [0, 2**32)"),
    ("seed", "4294967296", "expected an integer in [0, 2**32)"),
    ("validation_prompt", " ", "expected a prompt or null"),
    ("validation_prompts", "['a', '']", "expected a list of non-empty prompts"),
    ("validation_prompts_file", "/nonexistent/prompts.txt", "no such file or folder"),
    ("validation_steps", "0", "expected an integer >= 1"),
    ("validation_seeds", "-1", "expected a list of seeds in [0, 2**63)"),
    ("validation_num_inference_steps", "0", "expected an integer >= 1 or null"),
    ("validation_guidance_scale", "-1", "expected a number >= 0 or null"),
    ("validation_scheduler", "nonsense", "expected one of"),
    ("validation_null_branch", "maybe", "expected true or false"),
    ("collapse_patience", "-1", "expected an integer >= 0"),
    ("push_to_hub", "maybe", "expected true or false"),
    ("hub_model_id", "a/b/c", "not a hub repository id"),
    ("hub_private_repo", "maybe", "expected true or false"),
    ("hub_token", "", "expected a token or null"),
    ("safeguard", "maybe", "expected true or false"),
    ("safeguard_mu", "1.5", "expected a number in [0, 1]"),
    ("safeguard_scope", "step", "expected one of pair, batch"),
    ("kto_desirable_weight", "0", "expected a number > 0"),
    ("kto_undesirable_weight", "-1", "expected a number > 0"),
    ("mapo_beta", "0", "expected a number > 0"),
    ("mapo_snr", "0", "expected a number > 0"),
]
#: fields with no value that can be rejected before the model is fetched, and why
FREE_FORM = {
    "revision": "any git revision of a hub model: only the hub can say whether it exists "
                "(ignored for a local folder)",
    "reference_errors_dir": "any folder, created when first used; precompute_reference without "
                            "it (and without cache_dir) is refused naming it",
}
DATA_FIELDS = {"dataset_name", "dataset_split"}  # checked by opening the data (the cheap scan)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("settings")
    data = root / "train-00000.parquet"
    make_pickapic_parquet(data, 6, with_ties=False)
    (root / "a-file").write_text("not a folder")
    return root, make_sd15(root / "sd"), data


@pytest.fixture
def nothing_loads(monkeypatch):
    """Fails the test if a model is loaded; records whether the data was opened."""
    scans = []

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the settings were checked")

    original_scan = training_data.scan_source

    def scan(config):
        scans.append(config.dataset_name)
        return original_scan(config)

    monkeypatch.setattr(job, "load_backbone", no_model)
    monkeypatch.setattr(run, "load_job_backbone", no_model)
    monkeypatch.setattr(training_data, "scan_source", scan)
    monkeypatch.setattr(run, "scan_source", scan)
    return scans


def base_args(world) -> dict[str, str]:
    root, model, data = world
    return {"model_name_or_path": str(model), "dataset_name": str(data), "output_dir": str(root / "out"),
            "resolution": str(RESOLUTION), "report_to": "none"}


def test_every_field_has_a_bad_value_case():
    fields = {f.name for f in dataclasses.fields(TrainConfig)}
    covered = {case[0] for case in CASES} | set(FREE_FORM)
    missing = sorted(fields - covered)
    assert not missing, f"TrainConfig fields without a bad-value case in {__file__}: {missing}"
    assert covered <= fields


@pytest.mark.parametrize("case", CASES, ids=[f"{c[0]}={c[1]!r}" for c in CASES])
def test_a_bad_value_stops_before_anything_loads_with_one_line(world, nothing_loads, capsys, case):
    field, value, allowed = case[:3]
    named = case[3] if len(case) > 3 else field
    if value == FILE:
        value = str(world[0] / "a-file")
    args = {**base_args(world), field: value}
    capsys.readouterr()
    code = main(["train", *[x for k, v in args.items() for x in (f"--{k}", v)]])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1, err
    line = err[0]
    assert line.startswith(f"snpo train: error: {named}: "), line
    assert allowed in line, line
    if value and named == field:
        assert value in line or re.search(rf"got {re.escape(value)}", line), line
    if field not in DATA_FIELDS:
        assert nothing_loads == [], "the data was opened before the settings were checked"
    assert not (world[0] / "out").exists()


def _wrong_type(annotation) -> object:
    """A Python value of the wrong type for a field's annotation."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)] or [annotation]
    return {int: "abc", float: "abc", bool: "yes", str: 5}[args[0]]


@pytest.mark.parametrize("field", [f.name for f in dataclasses.fields(TrainConfig)])
def test_a_config_built_in_python_is_type_checked_by_validate(field):
    """``TrainConfig(...)`` skips the YAML/command-line conversion: ``validate()`` (which
    ``run_train`` calls first) still names the field instead of failing deep in training."""
    hints = typing.get_type_hints(TrainConfig)
    config = TrainConfig(model_name_or_path="m", dataset_name="d")
    setattr(config, field, _wrong_type(hints[field]))
    with pytest.raises(ValueError, match=rf"^{field}: expected .*, got "):
        config.validate()


def test_yaml_unknown_keys_are_errors_with_a_suggestion(world, tmp_path, capsys, nothing_loads):
    def run_yaml(text: str) -> str:
        path = tmp_path / "config.yaml"
        path.write_text(text)
        capsys.readouterr()
        args = [x for k, v in base_args(world).items() for x in (f"--{k}", v)]
        assert main(["train", "--config", str(path), *args]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        return err[0]

    assert run_yaml("learning_rat: 1e-5\n").endswith("unknown key 'learning_rat'; did you mean 'learning_rate'?")
    assert "did you mean 'lr_scheduler'?" in run_yaml("lr_schedular: cosine\n")
    assert "did you mean 'checkpoints_total_limit'?" in run_yaml("checkpoint_total_limit: 3\n")
    assert run_yaml("flux_capacitor: 1\n").endswith("unknown key 'flux_capacitor'")  # no close match
    assert "max_steps: expected an integer, got [1, 2]" in run_yaml("max_steps: [1, 2]\n")
    assert "beta: expected a number, got {'a': 1}" in run_yaml("beta: {a: 1}\n")
    assert "line 2: not valid YAML" in run_yaml("beta: 1\n  - x: [\n")
    assert "expected a mapping of keys to values" in run_yaml("- beta\n- 1\n")
    assert nothing_loads == []


def test_unknown_command_line_key_is_an_error_with_a_suggestion():
    with pytest.raises(ConfigError, match=r"^command line: unknown key 'gradient_acumulation_steps'; did you mean"):
        load_config(TrainConfig, None, ["--gradient_acumulation_steps", "2"])


def test_a_checkpoint_of_another_run_is_refused_before_the_model_loads(world, tmp_path, capsys, monkeypatch):
    """Resuming with another objective, model, batch layout or process count stops with one
    line before anything loads; the same path with other weights stops once it is loaded."""
    root, model, data = world
    out = tmp_path / "out"
    args = {**base_args(world), "output_dir": str(out), "lora_rank": "4", "max_steps": "2",
            "checkpointing_steps": "2", "per_device_train_batch_size": "2"}
    as_list = lambda d: [x for k, v in d.items() for x in (f"--{k}", v)]  # noqa: E731
    assert main(["train", *as_list(args)]) == 0
    resume = {**args, "resume_from_checkpoint": "latest", "max_steps": "3"}

    def refused(change: dict[str, str], expected: str, env: dict[str, str] | None = None) -> None:
        with monkeypatch.context() as patch:
            patch.setattr(job, "load_backbone", lambda *a, **k: pytest.fail("model loaded"))
            for key, value in (env or {}).items():
                patch.setenv(key, value)
            capsys.readouterr()
            assert main(["train", *as_list({**resume, **change})]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("snpo train: error: resume_from_checkpoint: ") and expected in err[0], err

    refused({"method": "dpo"}, "written with method='snpo', this run has method='dpo'")
    refused({"lora_rank": "8"}, "lora_rank=4, this run has lora_rank=8")
    refused({"per_device_train_batch_size": "1"}, "per_device_train_batch_size=2")
    refused({"gradient_accumulation_steps": "2"}, "gradient_accumulation_steps=1")
    refused({"model_name_or_path": str(make_sd15(tmp_path / "other", seed=1))}, "model_name_or_path=")
    refused({}, "num_processes=1, this run has num_processes=2", env={"WORLD_SIZE": "2"})

    # the same folder, other weights: found by the weights digest once the model is loaded
    make_sd15(Path(model).parent / "sd-other", seed=2)
    other_unet = Path(model).parent / "sd-other" / "unet" / "diffusion_pytorch_model.safetensors"
    mine = Path(model) / "unet" / "diffusion_pytorch_model.safetensors"
    saved = mine.read_bytes()
    try:
        mine.write_bytes(other_unet.read_bytes())
        capsys.readouterr()
        assert main(["train", *as_list(resume)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith("snpo train: error: resume_from_checkpoint: the checkpoint was written with weights=")
    finally:
        mine.write_bytes(saved)
    assert main(["train", *as_list(resume)]) == 0  # the right model resumes
