"""Memory options of full fine-tunes: ``optimizer`` (Adafactor, 8-bit AdamW),
``reference_dtype`` and ``reference_offload`` (the frozen reference copy in half precision,
kept on the CPU between its forwards).

Stated tolerances: a bf16 reference's predictions agree with the float32 reference's within
2% of their scale (max abs error / max abs value; bf16 keeps 8 bits of mantissa), an fp16
one within 0.5%; an offloaded reference's predictions equal the resident one's exactly (the
same weights, moved, not changed)."""

from __future__ import annotations

import importlib.util

import pytest
import torch
from safetensors.torch import load_file

import snpo.training.optimizers as optimizers
from fixtures_data import make_pickapic_parquet
from snpo.backbones import load_backbone
from snpo.cli import main
from snpo.training.config import TrainConfig
from snpo.training.optimizers import make_optimizer
from tiny_pipelines import RESOLUTION, make_sd15

UNET = "unet/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    data = root / "train-00000.parquet"
    make_pickapic_parquet(data, 8, with_ties=False)
    return root, make_sd15(root / "sd"), data


def args(world, out, **overrides) -> list[str]:
    root, model, data = world
    values = dict(model_name_or_path=model, dataset_name=data, output_dir=root / out, resolution=RESOLUTION,
                  lora_rank=0, per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                  lr_scheduler="constant", beta=500, checkpointing_steps=2, report_to="none", seed=1)
    values.update(overrides)
    return ["train", *[x for k, v in values.items() for x in (f"--{k}", str(v))]]


def state_numel(optimizer: torch.optim.Optimizer) -> int:
    return sum(v.numel() for s in optimizer.state.values() for v in s.values() if isinstance(v, torch.Tensor))


@pytest.mark.parametrize("name", ["adafactor", "adamw8bit"])
def test_optimizer_trains_resumes_bitwise_and_keeps_less_state(world, name):
    root, model, _ = world
    assert main(args(world, f"{name}-straight", optimizer=name)) == 0
    start = load_file(model / UNET)
    trained = load_file(root / f"{name}-straight" / UNET)
    assert max((trained[k] - start[k]).abs().max().item() for k in start) > 1e-4  # it trained
    # killed after checkpoint 2 (the folder it leaves), resumed: bitwise the straight run
    out = root / f"{name}-resumed"
    (out / "checkpoints").mkdir(parents=True)
    import shutil

    shutil.copytree(root / f"{name}-straight" / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    assert main(args(world, f"{name}-resumed", optimizer=name, resume_from_checkpoint="latest")) == 0
    resumed = load_file(out / UNET)
    for key in trained:
        assert torch.equal(trained[key], resumed[key]), key

    # optimizer state per parameter: AdamW 2 float32 moments; Adafactor factored; 8-bit: bytes
    params = [torch.nn.Parameter(torch.randn(64, 96)) for _ in range(3)]
    for p in params:
        p.grad = torch.randn_like(p)
    config = TrainConfig(optimizer=name)
    mine = make_optimizer(config, params, 1e-3)
    adamw = make_optimizer(TrainConfig(optimizer="adamw"), params, 1e-3)
    mine.step()
    adamw.step()
    n = sum(p.numel() for p in params)
    mine_bytes = sum(v.numel() * v.element_size() for s in mine.state.values() for v in s.values()
                     if isinstance(v, torch.Tensor) and v.numel() > 1)
    adamw_bytes = sum(v.numel() * v.element_size() for s in adamw.state.values() for v in s.values()
                      if isinstance(v, torch.Tensor) and v.numel() > 1)
    assert adamw_bytes == 8 * n
    assert mine_bytes < (0.1 if name == "adafactor" else 0.3) * adamw_bytes, (mine_bytes, adamw_bytes)


def test_adamw8bit_without_bitsandbytes_is_one_line_naming_optimizer(world, monkeypatch, capsys):
    real = importlib.util.find_spec
    monkeypatch.setattr(optimizers.importlib.util, "find_spec",
                        lambda name, *a: None if name == "bitsandbytes" else real(name, *a))
    capsys.readouterr()
    assert main(args(world, "no-bnb", optimizer="adamw8bit")) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snpo train: error: optimizer: adamw8bit needs bitsandbytes"), err
    assert "pip install bitsandbytes" in err[0]


def reference_predictions(model_path, **settings) -> tuple[torch.Tensor, object]:
    backbone = load_backbone(model_path)
    for key, value in settings.items():
        setattr(backbone, key, value)
    backbone.prepare_for_training(lora_rank=0)
    backbone.to("cpu")
    g = torch.Generator().manual_seed(0)
    noisy = torch.randn(2, 4, RESOLUTION // 2, RESOLUTION // 2, generator=g)
    cond = backbone.encode_prompts(["a red cat", "a cat"])
    with backbone.reference() as ref:
        out = backbone.predict(ref, noisy, torch.tensor([10, 500]), cond)
    return out, backbone


@pytest.mark.parametrize("dtype, tolerance", [(torch.bfloat16, 2e-2), (torch.float16, 5e-3)])
def test_a_half_precision_reference_agrees_with_the_float32_one(world, dtype, tolerance):
    _, model, _ = world
    exact, _ = reference_predictions(model)
    half, backbone = reference_predictions(model, reference_dtype=dtype)
    assert next(backbone._reference.parameters()).dtype == dtype
    assert next(backbone.denoiser.parameters()).dtype == torch.float32  # the policy is untouched
    assert half.dtype == torch.float32  # callers get float32 back, with or without autocast
    error = (half - exact).abs().max() / exact.abs().max()
    assert 0 < error < tolerance, error


def test_an_offloaded_reference_lives_on_the_cpu_and_predicts_the_same(world, monkeypatch):
    _, model, _ = world
    resident, _ = reference_predictions(model)
    moves = []
    original = torch.nn.Module.to

    def watched(self, *args, **kwargs):
        moves.append(str(args[0]) if args else str(kwargs.get("device")))
        return original(self, *args, **kwargs)

    offloaded, backbone = reference_predictions(model, reference_offload=True)
    assert torch.equal(offloaded, resident)
    monkeypatch.setattr(torch.nn.Module, "to", watched)
    with backbone.reference():
        pass
    assert moves[-2:] == [str(backbone.device), "cpu"]  # visits the policy's device for the block only
    assert next(backbone._reference.parameters()).device.type == "cpu"


def test_reference_options_train_a_full_fine_tune_and_are_refused_with_lora(world, capsys):
    root, _, _ = world
    assert main(args(world, "ref-bf16", reference_dtype="bf16", reference_offload="true",
                     checkpointing_steps=0)) == 0
    capsys.readouterr()
    assert main(args(world, "ref-lora", reference_dtype="bf16", lora_rank=4)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("snpo train: error: reference_dtype: applies to a full fine-tune"), err
