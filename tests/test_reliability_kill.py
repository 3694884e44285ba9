"""Runs that survive SIGKILL: ``snpo train`` killed at a random step (or while a checkpoint is
being written) and resumed with ``--resume_from_checkpoint latest`` ends with weights bitwise
identical to an uninterrupted run, with the same metrics and the same data report, in one
process and in two gloo processes.

The killed runs are real subprocesses (``tests/fault_runner.py`` only slows steps down, or
kills the process from inside at a chosen point of a checkpoint write); the kill is SIGKILL,
so nothing is flushed or cleaned up. The kill step comes from a seeded RNG. The random-step
kill also runs on a tiny SD3 pipeline (rectified flow, three text encoders), in one process
and in two (both slow; the in-process SD3 resume of ``test_reliability_checkpoint.py`` is fast).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_data import make_pickapic_parquet
from snpo.cli import main
from snpo.training import checkpoint as ckpt
from tiny_pipelines import RESOLUTION, make_sd3, make_sd15

ROOT = Path(__file__).resolve().parents[1]
RUNNER = Path(__file__).resolve().parent / "fault_runner.py"
LAUNCH_2PROC = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml")]
TIMING_KEYS = ("pairs_per_second", "peak_memory_gb")  # wall-clock facts, never replayed
MAX_STEPS = 8
#: per family: the model builder and its extra training keys (SD3: a short T5, only speed)
FAMILIES = {"sd15": (make_sd15, {}), "sd3": (make_sd3, {"max_sequence_length": 24})}


def make_world(tmp_path_factory, family: str):
    """A tiny pipeline of ``family`` and a Pick-a-Pic shard with ties, a bad label and an
    unreadable image (met only while training: it must be counted once even across a kill)."""
    root = tmp_path_factory.mktemp(f"kill-{family}")
    model = FAMILIES[family][0](root / family)
    data = root / "train-00000.parquet"
    make_pickapic_parquet(data, 12, bad_rows={"unreadable_image": 1, "bad_label": 1})
    return root, model, data


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    return make_world(tmp_path_factory, "sd15")


@pytest.fixture(scope="module")
def sd3_world(tmp_path_factory):
    return make_world(tmp_path_factory, "sd3")


def train_args(model: Path, data: Path, out: Path, **overrides) -> list[str]:
    values = dict(model_name_or_path=model, dataset_name=data, output_dir=out, resolution=RESOLUTION,
                  method="snpo", cfg_dropout=0.5, lora_rank=4, per_device_train_batch_size=1,
                  gradient_accumulation_steps=2, max_steps=MAX_STEPS, learning_rate=1e-2,
                  lr_scheduler="linear", lr_warmup_steps=2, beta=500, checkpointing_steps=2,
                  checkpoints_total_limit=2, report_to="none", seed=3, **FAMILIES[Path(model).name][1])
    values.update(overrides)
    return ["train", *[x for k, v in values.items() for x in (f"--{k}", str(v))]]


def child_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), **extra)
    return env


def logged_steps(metrics: Path) -> list[dict]:
    """The complete lines of metrics.jsonl (the last one may be cut short by a kill)."""
    if not metrics.is_file():
        return []
    out = []
    for line in metrics.read_text().splitlines():
        with contextlib.suppress(ValueError):  # a line cut short by the kill
            out.append(json.loads(line))
    return out


def kill_at_step(command: list[str], out: Path, step: int, rng: random.Random, env: dict[str, str]) -> None:
    """Start ``command``, SIGKILL its whole process group once ``step`` is logged (plus a
    random fraction of a step), and check it really died mid-run."""
    log = open(out.parent / f"{out.name}.killed.log", "w")  # noqa: SIM115 (closed below)
    proc = subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 300
        while not any(m["step"] >= step for m in logged_steps(out / "metrics.jsonl")):
            assert proc.poll() is None, f"the run ended (rc {proc.returncode}) before step {step}"
            assert time.monotonic() < deadline, "the run never reached the kill step"
            time.sleep(0.02)
        time.sleep(rng.uniform(0.0, 0.25))
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and every rank, as a node failure
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()
    assert proc.returncode == -signal.SIGKILL
    assert not (out / "README.md").exists(), "the killed run must not have finished"


def resume(command: list[str], env: dict[str, str]) -> str:
    """The user's recovery: the same command plus ``--resume_from_checkpoint latest``."""
    done = subprocess.run([*command, "--resume_from_checkpoint", "latest"], env=env, capture_output=True,
                          text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def assert_same_run(reference: Path, resumed: Path, weights: str) -> None:
    """Bitwise equal weights, the same metrics for every step (each logged once), the same
    data report in the model card."""
    a, b = load_file(reference / weights), load_file(resumed / weights)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key

    def strip(rows):
        return [{k: v for k, v in row.items() if k not in TIMING_KEYS} for row in rows]

    ref_rows, res_rows = logged_steps(reference / "metrics.jsonl"), logged_steps(resumed / "metrics.jsonl")
    assert [r["step"] for r in res_rows] == list(range(1, MAX_STEPS + 1))
    assert strip(res_rows) == strip(ref_rows)

    def data_section(card: Path) -> str:
        text = card.read_text()
        return text[text.index("## Data"): text.index("## Training config")]

    assert data_section(resumed / "README.md") == data_section(reference / "README.md")
    assert "unreadable_image` | 1 |" in data_section(resumed / "README.md")


def reference_run(world) -> Path:
    """The uninterrupted single-process run every single-process variant must reproduce."""
    root, model, data = world
    out = root / "reference"
    assert main(train_args(model, data, out)) == 0
    return out


@pytest.fixture(scope="module")
def reference(world):
    return reference_run(world)


@pytest.fixture(scope="module")
def sd3_reference(sd3_world):
    return reference_run(sd3_world)


@pytest.mark.parametrize("family, seed", [
    ("sd15", 7), *(pytest.param("sd15", s, marks=pytest.mark.slow) for s in (1, 2, 3)),
    pytest.param("sd3", 7, marks=pytest.mark.slow),  # fast SD3 resume: test_reliability_checkpoint.py
])
def test_sigkill_at_a_random_step_then_resume_is_bitwise_identical(request, family, seed):
    prefix = "" if family == "sd15" else f"{family}_"
    world, reference = request.getfixturevalue(f"{prefix}world"), request.getfixturevalue(f"{prefix}reference")
    root, model, data = world
    rng = random.Random(seed)
    kill_step = rng.randint(3, MAX_STEPS - 2)
    out = root / f"killed-{seed}"
    args = train_args(model, data, out)
    kill_at_step([sys.executable, str(RUNNER), *args], out, kill_step, rng,
                 child_env(SNPO_FAULT_STEP_DELAY="0.3"))
    last = ckpt.resolve_checkpoint(out / "checkpoints", "latest")
    assert last is not None
    last_step = ckpt.read_state(last)["global_step"]
    assert kill_step - 2 <= last_step <= kill_step + 1  # the kill may land in the next step

    stdout = resume([sys.executable, "-m", "snpo.cli", *args], child_env())
    assert f"resumed from {last} at step {last_step}" in stdout
    assert_same_run(reference, out, "pytorch_lora_weights.safetensors")
    # pruned to checkpoints_total_limit=2, only after each new checkpoint was complete
    assert [s for s, _ in ckpt.list_checkpoints(out / "checkpoints")] == [MAX_STEPS - 2, MAX_STEPS]


@pytest.mark.parametrize("point", [
    "before_state",
    pytest.param("after_model", marks=pytest.mark.slow),
    pytest.param("before_latest", marks=pytest.mark.slow),
    pytest.param("during_prune", marks=pytest.mark.slow),
])
def test_sigkill_while_writing_a_checkpoint_keeps_the_previous_one(world, reference, point):
    """Killed inside the write of checkpoint-6: ``latest`` still names a complete checkpoint
    that loads, and resuming from it reproduces the uninterrupted run."""
    root, model, data = world
    out = root / f"killed-in-save-{point}"
    args = train_args(model, data, out)
    done = subprocess.run([sys.executable, str(RUNNER), *args], capture_output=True, text=True, timeout=400,
                          env=child_env(SNPO_FAULT_KILL_IN_SAVE=f"6:{point}"))
    assert done.returncode == -signal.SIGKILL, done.stderr[-2000:]
    root_ckpt = out / "checkpoints"
    committed = point == "during_prune"  # killed after `latest` moved to checkpoint-6
    assert (root_ckpt / "latest").read_text() == ("checkpoint-6" if committed else "checkpoint-4")
    latest = ckpt.resolve_checkpoint(root_ckpt, "latest")
    assert latest == root_ckpt / ("checkpoint-6" if committed else "checkpoint-4")
    assert set(os.listdir(latest)) == {"model.safetensors", "optimizer.safetensors", "scheduler.safetensors",
                                       "rng-0.safetensors", "extra-0.json", "trainer_state.json"}
    load_file(latest / "model.safetensors")  # loadable, not half written
    ckpt.load_object(latest / "optimizer.safetensors")
    if point in ("after_model", "before_state"):
        assert (root_ckpt / "checkpoint-6.tmp").is_dir() and not (root_ckpt / "checkpoint-6").exists()

    resume([sys.executable, "-m", "snpo.cli", *args], child_env())
    assert_same_run(reference, out, "pytorch_lora_weights.safetensors")
    leftovers = [p.name for p in root_ckpt.iterdir() if p.name.endswith((".tmp", ".deleting"))]
    assert leftovers == []  # what the kill left behind was cleared by the next save


@pytest.mark.parametrize("family", ["sd15", pytest.param("sd3", marks=pytest.mark.slow)])
def test_sigkill_two_gloo_processes_then_resume_is_bitwise_identical(request, family):
    """Two ranks (accelerate launch, gloo), a full fine-tune, killed as a whole at a random
    step: the resumed run's denoiser (UNet, SD3's transformer) equals an uninterrupted
    two-process run's, bitwise."""
    root, model, data = request.getfixturevalue("world" if family == "sd15" else f"{family}_world")
    rng = random.Random(11)
    kill_step = rng.randint(3, MAX_STEPS - 2)
    overrides = dict(lora_rank=0, gradient_accumulation_steps=1, learning_rate=1e-3, cfg_dropout=0.3)
    env = child_env()

    straight = root / "two-straight"
    done = subprocess.run([*LAUNCH_2PROC, str(RUNNER), *train_args(model, data, straight, **overrides)],
                          env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    out = root / "two-killed"
    args = train_args(model, data, out, **overrides)
    kill_at_step([*LAUNCH_2PROC, str(RUNNER), *args], out, kill_step, rng, child_env(SNPO_FAULT_STEP_DELAY="0.3"))
    last = ckpt.resolve_checkpoint(out / "checkpoints", "latest")
    assert last is not None and {"rng-0.safetensors", "rng-1.safetensors"} <= set(os.listdir(last))
    resume([*LAUNCH_2PROC, "-m", "snpo.cli", *args], env)
    denoiser = "unet" if family == "sd15" else "transformer"
    assert_same_run(straight, out, f"{denoiser}/diffusion_pytorch_model.safetensors")
