"""The shape the architecture promises: a new objective or method is one registration, every
entry point builds a method from the same code, old configs still train the same, user
errors are one line, and ``--help`` explains every key."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import yaml
from safetensors.torch import load_file

from fixtures_data import make_pickapic_parquet
from snpo.cli import CONFIG_CLASSES, config_class, main
from snpo.configuration import describe_fields, load_config
from snpo.errors import UserError
from snpo.methods import METHODS, BuiltMethod, MethodSpec, SingleNetworkMethod, register_method
from snpo.methods.single import objective_config, single_network_method
from snpo.objectives import OBJECTIVES, Objective, register_objective
from snpo.sampling import single_network_guide
from snpo.training.config import TrainConfig
from tiny_pipelines import RESOLUTION, make_sd15


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("arch")
    data = root / "train-00000.parquet"
    make_pickapic_parquet(data, 8, with_ties=False)
    return make_sd15(root / "sd"), data


def train_args(model, data, out, **overrides) -> list[str]:
    values = dict(model_name_or_path=model, dataset_name=data, output_dir=out, resolution=RESOLUTION,
                  per_device_train_batch_size=2, learning_rate=1e-2, lr_scheduler="constant", beta=500,
                  lora_rank=4, max_steps=2, checkpointing_steps=0, report_to="none", seed=0, cfg_dropout=0.5)
    values.update(overrides)
    return [x for k, v in values.items() for x in (f"--{k}", str(v))]


# ---- a new objective and a new method, each one registration --------------------------------
def _hinge(terms, config):
    """A hinge on the DPO logit (IPO-like): loss = relu(1 - z)."""
    winner, loser = terms.roles(swap=True)
    logits = winner - loser
    return F.relu(1 - logits), logits


class RejectedSFT(SingleNetworkMethod):
    """A method of its own: likelihood training on the REJECTED images (a toy 'unlearning
    target'), sampled with half the guidance of plain CFG."""


def _build_rejected_sft(config, backbone):
    from snpo.methods.npo import ReversedLabels

    return BuiltMethod(ReversedLabels(RejectedSFT(backbone, objective_config(config, "sft"), config.cfg_dropout)))


def _half_guide(backbone, networks, settings):
    guides_seen.append(settings.guidance_scale)
    return single_network_guide(backbone, networks["policy"], settings.guidance_scale / 2)


guides_seen: list[float] = []


@pytest.fixture
def registered():
    register_objective(Objective("test-hinge", _hinge, swaps=True, summary="hinge on z"))
    register_method(single_network_method("test-hinge"))
    register_method(MethodSpec(name="test-rejected-sft", title="SFT on rejected images",
                               build=_build_rejected_sft, make_guide=_half_guide))
    yield
    for name in ("test-hinge", "test-rejected-sft"):
        METHODS.pop(name, None)
    OBJECTIVES.pop("test-hinge", None)


def test_a_new_objective_and_method_train_sample_and_bench_with_one_registration_each(
        registered, world, tmp_path, monkeypatch, capsys):
    model, data = world
    for name in ("test-hinge", "test-rejected-sft"):
        out = tmp_path / name
        assert main(["train", *train_args(model, data, out, method=name)]) == 0
        lora = load_file(out / "pytorch_lora_weights.safetensors")
        assert any(k.endswith("lora.up.weight") and v.abs().sum() > 0 for k, v in lora.items()), name
        card = (out / "README.md").read_text()
        assert f"- {name}" in card and "load_lora_weights" in card

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red cat\n")
    guides_seen.clear()
    samples = tmp_path / "samples"
    assert main(["sample", "--model_name_or_path", str(model), "--lora", str(tmp_path / "test-rejected-sft"),
                 "--method", "test-rejected-sft", "--prompts", str(prompts), "--seeds", "0",
                 "--num_inference_steps", "2", "--guidance_scale", "6", "--output_dir", str(samples),
                 "--show_progress", "false"]) == 0
    assert guides_seen == [6.0]  # the method's own guide sampled
    assert len(list((samples / "images").glob("*.png"))) == 1

    monkeypatch.setenv("SNPO_CACHE", str(tmp_path / "cache"))
    assert main(["bench", "--quick", "--variants", "test-hinge,test-rejected-sft",
                 "--output_dir", str(tmp_path / "bench")]) == 0
    summary = json.loads((tmp_path / "bench" / "results.json").read_text())["summary"]
    assert summary["failures"] == {}
    assert {"test-hinge", "test-rejected-sft"} <= set(summary["variants"])


# ---- one way to build a method --------------------------------------------------------------
@pytest.mark.parametrize("method", sorted(METHODS))
def test_bench_and_train_build_the_same_method(method, world, tmp_path, monkeypatch):
    """`snpo bench` (its worker) and `snpo train` reach the same build_method with the same
    config, speed options included: recorded at the point where the method is built."""
    import snpo.training.job as job
    from snpo.bench.timing import PhaseTimer
    from snpo.bench.worker import run_snpo
    from snpo.configuration import config_to_dict

    model, data = world
    built: list[dict] = []
    original = job.build_method

    def spy(config, backbone):
        result = original(config, backbone)
        params = result.trainable_parameters
        built.append({
            "config": {k: v for k, v in config_to_dict(config).items() if k != "output_dir"},
            "method": type(result.method).__name__, "channels_last": backbone.channels_last,
            "torch_compile": backbone.torch_compile, "two_networks": result.model is not None,
            "trainable": None if params is None else sum(p.numel() for p in params),
        })
        return result

    monkeypatch.setattr(job, "build_method", spy)
    spec = {"model": str(model), "dataset": str(data), "cache_dir": None, "cached": False,
            "output_dir": str(tmp_path / "bench"), "resolution": RESOLUTION, "method": method,
            "beta": 500.0, "warmup_steps": 0, "measure_steps": 1, "batch_size": 2, "lora_rank": 4,
            "mixed_precision": "no", "seed": 0, "channels_last": True, "count_flops": False}
    run_snpo(spec, PhaseTimer("cpu", count_flops_step=None))
    bench_config = built[-1]["config"]
    assert main(["train", *train_args(model, data, tmp_path / "train", method=method, beta=500.0,
                                      learning_rate=1e-6, cfg_dropout=0.2, max_steps=1,
                                      channels_last="true", mixed_precision="no")]) == 0
    assert built[-1] == built[0], (bench_config, built[-1]["config"])


# ---- old configs --------------------------------------------------------------------------
def test_old_configs_load_and_train_identically(world, tmp_path, capsys):
    model, data = world
    old = {"method": "single", "objective": "bdpo", "mix_lambda": 0.5}
    new = {"method": "bdpo", "mix_lambda": 0.5}
    weights = {}
    for name, values in (("old", old), ("new", new), ("objective-only", {"objective": "bdpo", "mix_lambda": 0.5})):
        cfg = tmp_path / f"{name}.yaml"
        cfg.write_text(yaml.safe_dump(values))
        assert main(["train", "--config", str(cfg), *train_args(model, data, tmp_path / name)]) == 0
        weights[name] = load_file(tmp_path / name / "pytorch_lora_weights.safetensors")
    assert "note: objective: read as method: 'bdpo'" in capsys.readouterr().err
    for name in ("old", "objective-only"):
        assert weights[name].keys() == weights["new"].keys()
        assert all(torch.equal(weights[name][k], weights["new"][k]) for k in weights["new"])
    assert load_config(TrainConfig, None, ["--method", "single"]).method == "snpo"  # the old default
    with pytest.raises(UserError, match="^objective: an alias of method"):
        load_config(TrainConfig, None, ["--method", "dpo", "--objective", "bdpo"])
    for preset in sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml")):
        assert "objective" not in yaml.safe_load(preset.read_text()), preset.name


# ---- errors and help ------------------------------------------------------------------------
def test_the_cli_prints_user_errors_as_one_line_and_keeps_tracebacks_for_bugs(monkeypatch, capsys):
    import snpo.training.run as run

    monkeypatch.setattr(run, "run_train", lambda config: (_ for _ in ()).throw(UserError("beta: too hot")))
    assert main(["train", "--model_name_or_path", "m", "--dataset_name", "d"]) == 2
    assert capsys.readouterr().err.strip() == "snpo train: error: beta: too hot"
    # a plain ValueError is a bug, even when its message looks like a field's
    monkeypatch.setattr(run, "run_train", lambda config: (_ for _ in ()).throw(ValueError("beta: a bug")))
    with pytest.raises(ValueError, match="a bug"):
        main(["train", "--model_name_or_path", "m", "--dataset_name", "d"])


@pytest.mark.parametrize("command", sorted(CONFIG_CLASSES))
def test_help_explains_every_key_with_its_type_and_default(command, capsys):
    rows = describe_fields(config_class(command))
    assert all(text for _, _, _, text in rows), [key for key, _, _, text in rows if not text]
    with pytest.raises(SystemExit):
        main([command, "--help"])
    out = capsys.readouterr().out
    for key, type_name, default, text in rows:
        assert f"--{key} ({type_name}, default {default})" in out and text in out
    if command == "train":
        assert "--beta (float, default 2000.0)" in out and "--method (str, default snpo)" in out
