"""FSDP (FSDP2, through accelerate) with real processes: two gloo ranks launched with the
shipped ``configs/accelerate/fsdp_cpu.yaml``.

- Two FSDP ranks with batch 1 train the same weights (to float tolerance: the gradients are
  reduce-scattered, summed in another order) as one process with gradient accumulation 2 on
  the same pairs, for a full fine-tune (the frozen reference copy sharded like the policy)
  and for LoRA (the reference is the sharded network with its adapters off).
- Checkpoints under FSDP are ordinary full state dicts in safetensors (gathered to rank 0 on
  the CPU); the final ``unet/`` loads with diffusers.
- A run resumed from an FSDP checkpoint (the folder a killed run leaves; and, slow, a real
  SIGKILL of both ranks at a random step) ends bitwise equal to the uninterrupted FSDP run,
  with the same metrics.

accelerate itself never selects FSDP for CPU ranks (with ``use_cpu`` it silently trains DDP):
snpo sets up the gloo ranks and lets accelerate shard on them (``snpo.training.engines``), and
refuses a launch whose engine is not the one it asked for.
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from snpo.cli import main
from snpo.training import checkpoint as ckpt
from test_reliability_kill import (
    MAX_STEPS,
    RUNNER,
    assert_same_run,
    child_env,
    kill_at_step,
    logged_steps,
    make_world,
    resume,
    train_args,
)

ROOT = Path(__file__).resolve().parents[1]
LAUNCH_FSDP = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
               str(ROOT / "configs" / "accelerate" / "fsdp_cpu.yaml")]
UNET = "unet/diffusion_pytorch_model.safetensors"
LORA = "pytorch_lora_weights.safetensors"
#: a full fine-tune: every process's batch is 1, so two ranks = one process x accumulation 2
FULL = dict(lora_rank=0, gradient_accumulation_steps=1, learning_rate=1e-3, cfg_dropout=0.3)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, "sd15")


def launch(command: list[str], env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    done = subprocess.run(command, env=env or child_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def fsdp_full(world):
    """The uninterrupted two-rank FSDP full fine-tune (checkpoints at 2, 4, 6, 8)."""
    root, model, data = world
    out = root / "fsdp-full"
    launch([*LAUNCH_FSDP, "-m", "snpo.cli", *train_args(model, data, out, **FULL)])
    return out


def one_process(world, name: str, **overrides) -> Path:
    root, model, data = world
    out = root / name
    assert main(train_args(model, data, out, **{"checkpointing_steps": 0, **overrides})) == 0
    return out


def assert_close_weights(a_dir: Path, b_dir: Path, weights: str) -> None:
    a, b = load_file(a_dir / weights), load_file(b_dir / weights)
    assert a.keys() == b.keys() and a
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=5e-5, rtol=1e-4)


def max_difference(a_dir: Path, b_dir: Path, weights: str) -> float:
    a, b = load_file(a_dir / weights), load_file(b_dir / weights)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def test_two_fsdp_ranks_equal_one_process_with_accumulation_full_fine_tune(world, fsdp_full):
    one = one_process(world, "one-full", **{**FULL, "gradient_accumulation_steps": 2})
    assert_close_weights(fsdp_full, one, UNET)
    # the same losses and gradient norms step by step (the norm of the sharded gradients)
    for mine, theirs in zip(logged_steps(fsdp_full / "metrics.jsonl"), logged_steps(one / "metrics.jsonl"), strict=True):
        assert mine["loss"] == pytest.approx(theirs["loss"], rel=1e-4, abs=1e-6)
        assert mine["grad_norm"] == pytest.approx(theirs["grad_norm"], rel=1e-4)
    # control: one process without accumulation sees half the pairs a step: other weights
    control = one_process(world, "one-full-control", **FULL)
    assert max_difference(fsdp_full, control, UNET) > 1e-3

    # an FSDP checkpoint: full state dicts in safetensors, written by rank 0 (nothing pickled)
    last = ckpt.resolve_checkpoint(fsdp_full / "checkpoints", "latest")
    state = json.loads((last / ckpt.STATE_FILE).read_text())
    assert (state["format"], state["engine"], state["num_processes"]) == ("snpo-1", "fsdp", 2)
    assert set((last / name).name for name in last.iterdir()) == {
        "model.safetensors", "optimizer.safetensors", "scheduler.safetensors", "rng-0.safetensors",
        "rng-1.safetensors", "extra-0.json", "extra-1.json", "trainer_state.json"}
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(fsdp_full, subfolder="unet")
    saved = load_file(last / "model.safetensors")  # checkpoint-8 = the final weights, whole
    assert saved.keys() == unet.state_dict().keys()
    for key, value in unet.state_dict().items():
        assert torch.equal(saved[key], value), key
    optimizer = ckpt.load_object(last / "optimizer.safetensors")
    assert set(optimizer["state"]) == set(saved)  # moments of every weight, by name, unsharded
    assert optimizer["state"]["conv_in.weight"]["exp_avg"].shape == unet.conv_in.weight.shape


def test_two_fsdp_ranks_equal_one_process_with_accumulation_lora(world):
    """LoRA under FSDP: base weights frozen and sharded next to the trainable adapters; the
    reference is the same sharded module with its adapters disabled."""
    root, model, data = world
    lora = dict(lora_rank=4, gradient_accumulation_steps=1, max_steps=4, checkpointing_steps=2)
    two = root / "fsdp-lora"
    launch([*LAUNCH_FSDP, "-m", "snpo.cli", *train_args(model, data, two, **lora)])
    one = one_process(world, "one-lora", **{**lora, "gradient_accumulation_steps": 2})
    assert_close_weights(two, one, LORA)
    control = one_process(world, "one-lora-control", **lora)
    assert max_difference(two, control, LORA) > 1e-3
    # the LoRA file loads into the pipeline as any LoRA run's
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(model)
    pipe.load_lora_weights(two)


def test_resume_from_an_fsdp_checkpoint_is_bitwise_identical(world, fsdp_full):
    """What a run killed after checkpoint 6 leaves (that checkpoint, its metrics up to step
    7), resumed under FSDP: bitwise the uninterrupted run's weights and metrics."""
    root, model, data = world
    out = root / "fsdp-resumed"
    (out / "checkpoints").mkdir(parents=True)
    shutil.copytree(fsdp_full / "checkpoints" / "checkpoint-6", out / "checkpoints" / "checkpoint-6")
    (out / "checkpoints" / "latest").write_text("checkpoint-6")
    lines = (fsdp_full / "metrics.jsonl").read_text().splitlines()[:7]
    (out / "metrics.jsonl").write_text("".join(f"{line}\n" for line in lines))
    stdout = launch([*LAUNCH_FSDP, "-m", "snpo.cli", *train_args(model, data, out, **FULL),
                     "--resume_from_checkpoint", "latest"]).stdout
    assert f"resumed from {out / 'checkpoints' / 'checkpoint-6'} at step 6" in stdout
    a, b = load_file(fsdp_full / UNET), load_file(out / UNET)
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("pairs_per_second", "peak_memory_gb")}  # noqa: E731
                          for r in rows]
    assert strip(logged_steps(out / "metrics.jsonl")) == strip(logged_steps(fsdp_full / "metrics.jsonl"))
    # a DDP launch cannot resume it (the optimizer state is laid out by name): one line
    done = subprocess.run([*LAUNCH_FSDP[:4], str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m",
                           "snpo.cli", *train_args(model, data, out, **FULL), "--resume_from_checkpoint", "latest"],
                          env=child_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode != 0
    assert "was written under fsdp, this run is ddp" in done.stderr


@pytest.mark.slow
def test_sigkill_two_fsdp_ranks_then_resume_is_bitwise_identical(world, fsdp_full):
    """Both ranks and the launcher SIGKILLed at a random step (as a node failure), resumed
    with ``--resume_from_checkpoint latest`` under FSDP: the uninterrupted run, bitwise."""
    root, model, data = world
    rng = random.Random(5)
    kill_step = rng.randint(3, MAX_STEPS - 2)
    out = root / "fsdp-killed"
    args = train_args(model, data, out, **FULL)
    kill_at_step([*LAUNCH_FSDP, str(RUNNER), *args], out, kill_step, rng, child_env(SNPO_FAULT_STEP_DELAY="0.3"))
    last = ckpt.resolve_checkpoint(out / "checkpoints", "latest")
    assert last is not None and json.loads((last / ckpt.STATE_FILE).read_text())["engine"] == "fsdp"
    resume([*LAUNCH_FSDP, "-m", "snpo.cli", *args], child_env())
    assert_same_run(fsdp_full, out, UNET)
