"""DeepSpeed ZeRO (through accelerate) with real processes: two CPU ranks (gloo, DeepSpeed's
CPU accelerator) launched with the shipped ``configs/accelerate/deepspeed_zero{2,3}_cpu.yaml``.
Skipped where the deepspeed package is not installed (``pip install --no-build-isolation
deepspeed``, see README); the config checks that need no deepspeed are in ``test_engines.py``.

- ZeRO-2, full fine-tune and LoRA: two ranks with batch 1 train the weights of one process
  with gradient accumulation 2 (to float tolerance: the engine averages the ranks' gradients
  in its own order; 1e-7 here), with the same ``grad_norm`` every step: DeepSpeed
  clips once, inside its engine, at snpo's ``max_grad_norm`` (filled in for ``auto``), and
  snpo logs the engine's norm (no second clipping).
- ZeRO-3 (slow): the same to float tolerance, the final ``unet/`` gathered to rank 0.
- Resume (slow): from a DeepSpeed checkpoint (``format: accelerate``), bitwise.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snpo.cli import main
from snpo.training import checkpoint as ckpt
from test_reliability_kill import child_env, logged_steps, make_world, train_args

pytest.importorskip("deepspeed")

ROOT = Path(__file__).resolve().parents[1]
UNET = "unet/diffusion_pytorch_model.safetensors"
LORA = "pytorch_lora_weights.safetensors"
FULL = dict(lora_rank=0, gradient_accumulation_steps=1, learning_rate=1e-3, cfg_dropout=0.3, max_steps=4,
            checkpointing_steps=2)


def launcher(stage: int) -> list[str]:
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / f"deepspeed_zero{stage}_cpu.yaml"), "-m", "snpo.cli"]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, "sd15")


def launch(command: list[str]) -> str:
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def one_process(world, name: str, **overrides) -> Path:
    root, model, data = world
    out = root / name
    if not out.is_dir():
        assert main(train_args(model, data, out, **{**overrides, "checkpointing_steps": 0})) == 0
    return out


def compare(a_dir: Path, b_dir: Path, weights: str, *, exact: bool) -> None:
    a, b = load_file(a_dir / weights), load_file(b_dir / weights)
    assert a.keys() == b.keys() and a
    for key in a:
        if exact:
            assert torch.equal(a[key], b[key]), key
        else:
            torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=1e-4)


def same_norms(a_dir: Path, b_dir: Path) -> None:
    for mine, theirs in zip(logged_steps(a_dir / "metrics.jsonl"), logged_steps(b_dir / "metrics.jsonl"), strict=True):
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_two_zero2_ranks_equal_one_process_with_accumulation(world, lora):
    root, model, data = world
    settings = {**FULL, "lora_rank": 4, "learning_rate": 1e-2} if lora else FULL
    two = root / f"zero2-{'lora' if lora else 'full'}"
    launch([*launcher(2), *train_args(model, data, two, **settings)])
    one = one_process(world, f"one-{'lora' if lora else 'full'}", **{**settings, "gradient_accumulation_steps": 2})
    compare(two, one, LORA if lora else UNET, exact=False)
    same_norms(two, one)  # DeepSpeed's pre-clip norm, clipped once at max_grad_norm = 1
    assert max(row["grad_norm"] for row in logged_steps(two / "metrics.jsonl")) > 1.0  # clipping mattered
    state = json.loads((ckpt.resolve_checkpoint(two / "checkpoints", "latest") / ckpt.STATE_FILE).read_text())
    assert (state["format"], state["engine"]) == ("accelerate", "deepspeed")


@pytest.mark.slow
def test_two_zero3_ranks_equal_one_process_with_accumulation(world):
    root, model, data = world
    two = root / "zero3-full"
    launch([*launcher(3), *train_args(model, data, two, **FULL)])
    one = one_process(world, "one-full", **{**FULL, "gradient_accumulation_steps": 2})
    compare(two, one, UNET, exact=False)  # ZeRO-3 gathers parameters: float tolerance


@pytest.mark.slow
def test_resume_from_a_deepspeed_checkpoint_is_bitwise_identical(world):
    root, model, data = world
    straight = root / "zero2-full"
    if not (straight / UNET).is_file():
        launch([*launcher(2), *train_args(model, data, straight, **FULL)])
    out = root / "zero2-resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(straight / "checkpoints" / "checkpoint-2", out / "checkpoints" / "checkpoint-2")
    (out / "checkpoints" / "latest").write_text("checkpoint-2")
    stdout = launch([*launcher(2), *train_args(model, data, out, **FULL), "--resume_from_checkpoint", "latest"])
    assert "at step 2" in stdout
    compare(straight, out, UNET, exact=True)


class Planted:
    """A class a malicious checkpoint would make the unpickler build (and run code)."""

    def __reduce__(self):
        return (print, ("unpickled",))


def test_deepspeed_checkpoint_files_are_read_weights_only_during_a_resume(tmp_path):
    """DeepSpeed's own loader unpickles anything (``weights_only=False``); inside snpo's
    resume it reads tensors and plain containers only, and is restored afterwards."""
    import pickle

    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine

    tensors, planted = tmp_path / "ok.pt", tmp_path / "planted.pt"
    torch.save({"step": 3, "w": torch.ones(2)}, tensors)
    torch.save({"x": Planted()}, planted)
    engine = TorchCheckpointEngine.__new__(TorchCheckpointEngine)
    original = TorchCheckpointEngine.load
    with ckpt.deepspeed_loads_weights_only():
        assert torch.equal(engine.load(str(tensors))["w"], torch.ones(2))
        with pytest.raises(pickle.UnpicklingError):
            engine.load(str(planted))
    assert TorchCheckpointEngine.load is original
