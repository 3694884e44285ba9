"""Numerical faults: a non-finite loss or gradient skips the step (weights and optimizer
untouched), is logged (``nonfinite_skipped`` in metrics.jsonl, one line on stdout), and stops
the run with a clear message after ``max_nonfinite_steps`` in a row, across resumes too;
``snpo train`` then exits non-zero with one line. Under fp16 a gradient overflow is the
GradScaler's business (it skips the step and lowers its scale), not a fault."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import colour_pairs
from fault_runner import bad_loss
from fixtures_data import make_pickapic_parquet
from snpo.cli import main
from snpo.methods.single import SingleNetworkMethod
from snpo.toy.data import stack_batch
from snpo.training.config import TrainConfig
from snpo.training.trainer import Callback, NonFiniteError, Trainer
from tiny_pipelines import RESOLUTION, make_sd15

ROOT = Path(__file__).resolve().parents[1]


class FaultyMethod(SingleNetworkMethod):
    """Makes the loss of chosen optimizer steps (1-based) non-finite (see ``bad_loss``)."""

    def __init__(self, backbone, config: TrainConfig, kind: str, steps: set[int], first_step: int = 1) -> None:
        super().__init__(backbone, config.objective_config, config.cfg_dropout)
        self.kind, self.steps, self.step = kind, steps, first_step

    def compute_loss(self, model, batch, pair_seeds):
        loss, metrics = super().compute_loss(model, batch, pair_seeds)
        step, self.step = self.step, self.step + 1  # accumulation 1: one call per step
        return (bad_loss(loss, self.kind) if step in self.steps else loss), metrics


def config_for(out: Path, **overrides) -> TrainConfig:
    values = dict(output_dir=str(out), max_steps=6, per_device_train_batch_size=4, learning_rate=1e-3,
                  beta=500.0, method="snpo", cfg_dropout=0.3, report_to="none", checkpointing_steps=0,
                  max_nonfinite_steps=3, lr_scheduler="constant")
    values.update(overrides)
    return TrainConfig(**values)


def weights(backbone) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in backbone.denoiser.state_dict().items()}


def same(a: dict, b: dict) -> bool:
    return all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("kind", ["nan_loss", "inf_loss", "nan_grad"])
def test_nonfinite_step_is_skipped_logged_and_leaves_the_weights_alone(tiny_toy, tmp_path, capsys, kind):
    """Steps 2 and 3 go bad: the weights before steps 2, 3 and 4 are the same, the run goes
    on, and the log and metrics.jsonl say what happened."""
    config = config_for(tmp_path / "out")
    before_step: list[dict] = []  # weights as each step starts
    trainer = Trainer(config, tiny_toy, colour_pairs(8), FaultyMethod(tiny_toy, config, kind, {2, 3}),
                      collate_fn=stack_batch, show_progress=False, save_model=False,
                      callbacks=[WeightsBeforeEachStep(tiny_toy, before_step)])
    result = trainer.train()
    assert result.global_step == 6 and result.skipped_nonfinite == 2
    assert not same(before_step[0], before_step[1])  # step 1 trained
    assert same(before_step[1], before_step[2]) and same(before_step[2], before_step[3])  # 2, 3 skipped
    assert not same(before_step[3], before_step[4])  # training goes on
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 1, 2, 2, 2, 2]
    what = "non-finite gradient" if kind == "nan_grad" else "non-finite loss"
    out = capsys.readouterr().out
    assert f"step 2: {what}; step skipped (1 in a row, max_nonfinite_steps=3)" in out
    assert f"step 3: {what}; step skipped (2 in a row" in out


@pytest.mark.parametrize("max_grad_norm", [1.0, 0.0])
def test_consecutive_nonfinite_steps_stop_the_run_with_a_clear_message(tiny_toy, tmp_path, max_grad_norm):
    config = config_for(tmp_path / "out", max_steps=10, max_grad_norm=max_grad_norm)
    method = FaultyMethod(tiny_toy, config, "nan_grad", set(range(3, 11)))
    with pytest.raises(NonFiniteError) as err:
        Trainer(config, tiny_toy, colour_pairs(8), method, collate_fn=stack_batch, show_progress=False,
                save_model=False).train()
    assert str(err.value) == (
        "3 consecutive steps had a non-finite loss or gradient (max_nonfinite_steps=3); stopping at "
        "step 5. Lower learning_rate or beta, or check the data.")
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [0, 0, 1, 2, 3]  # the stopping step is logged too
    assert rows[-1]["grad_norm"] is None


def test_nonfinite_counters_survive_a_resume(tiny_toy, tmp_path):
    """Bad steps 3..5 with a kill after checkpoint 4: the resumed run knows step 3 and 4 were
    already bad, so step 5 is the third in a row and stops it, as without the kill."""
    fresh = copy.deepcopy(tiny_toy)
    config = config_for(tmp_path / "out", max_steps=8, checkpointing_steps=4)

    class Stop(Exception):
        pass

    class KillAfterCheckpoint(Trainer):
        def _save_checkpoint(self, accelerator, root, step):
            super()._save_checkpoint(accelerator, root, step)
            raise Stop

    with pytest.raises(Stop):
        KillAfterCheckpoint(config, tiny_toy, colour_pairs(8), FaultyMethod(tiny_toy, config, "nan_loss", {3, 4, 5}),
                            collate_fn=stack_batch, show_progress=False).train()
    config.resume_from_checkpoint = "latest"
    with pytest.raises(NonFiniteError, match="stopping at step 5"):
        Trainer(config, fresh, colour_pairs(8), FaultyMethod(fresh, config, "nan_loss", {3, 4, 5}, first_step=5),
                collate_fn=stack_batch, show_progress=False).train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [(r["step"], r["nonfinite_skipped"]) for r in rows] == [(1, 0), (2, 0), (3, 1), (4, 2), (5, 3)]


def test_snpo_train_stops_with_one_line_and_a_nonzero_exit(tmp_path, capsys, monkeypatch):
    model = make_sd15(tmp_path / "sd")
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 8, with_ties=False)
    original = SingleNetworkMethod.compute_loss

    def nan_loss(self, model, batch, pair_seeds):
        loss, metrics = original(self, model, batch, pair_seeds)
        return loss * float("nan"), metrics

    monkeypatch.setattr(SingleNetworkMethod, "compute_loss", nan_loss)
    out = tmp_path / "out"
    capsys.readouterr()
    code = main(["train", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir",
                 str(out), "--resolution", str(RESOLUTION), "--lora_rank", "4", "--max_steps", "10",
                 "--max_nonfinite_steps", "2", "--report_to", "none", "--checkpointing_steps", "0"])
    assert code == 2
    captured = capsys.readouterr()
    err = captured.err.strip().splitlines()  # progress bars, then the error: one line, no traceback
    assert err[-1] == ("snpo train: error: 2 consecutive steps had a non-finite loss or gradient "
                       "(max_nonfinite_steps=2); stopping at step 2. Lower learning_rate or beta, or check the data.")
    assert "Traceback" not in captured.err and sum("error" in line for line in err) == 1
    assert "step 1: non-finite loss; step skipped (1 in a row" in captured.out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["nonfinite_skipped"] for r in rows] == [1, 2]
    assert not (out / "pytorch_lora_weights.safetensors").exists()  # nothing half-trained is saved


class WeightsBeforeEachStep(Callback):
    """Records the weights as each micro-batch starts (one micro-batch a step here)."""

    def __init__(self, backbone, out: list) -> None:
        self.backbone, self.out = backbone, out

    def on_micro_batch(self, batch) -> None:
        self.out.append(weights(self.backbone))


class ScaledTrainer(Trainer):
    """The fp16 GradScaler path of a GPU run, on the CPU: a CPU GradScaler whose huge initial
    scale makes the first scaled gradients overflow (float32 tops out at 2**128)."""

    def _make_accelerator(self):
        accelerator = super()._make_accelerator()
        accelerator.scaler = torch.amp.GradScaler("cpu", init_scale=2.0**127)
        # what accelerate does under fp16 on a GPU: unscale every prepared optimizer
        accelerator.unscale_gradients = lambda optimizer=None: [
            accelerator.scaler.unscale_(opt.optimizer) for opt in accelerator._optimizers]
        return accelerator


def test_fp16_gradient_overflow_is_left_to_the_grad_scaler(tiny_toy, tmp_path, capsys):
    """Overflowing steps are skipped by the scaler, which lowers its scale until gradients fit;
    they do not count towards max_nonfinite_steps, and the run trains on (it used to crash:
    a skipped optimizer.step() never closed the scaler's unscale/update cycle)."""
    config = config_for(tmp_path / "out", max_steps=10, max_nonfinite_steps=2)
    before_step: list[dict] = []
    result = ScaledTrainer(config, tiny_toy, colour_pairs(8), SingleNetworkMethod(tiny_toy, config.objective_config, 0.3),
                           collate_fn=stack_batch, show_progress=False, save_model=False,
                           callbacks=[WeightsBeforeEachStep(tiny_toy, before_step)]).train()
    skipped = [h["nonfinite_skipped"] for h in result.history]
    assert skipped[2] == 3 and skipped[-1] < 10  # several overflows in a row, then training
    assert same(before_step[0], before_step[1]) and same(before_step[1], before_step[2])
    assert not same(before_step[0], weights(tiny_toy))
    assert "gradient overflow (fp16); the GradScaler skipped the step and lowered its scale" in capsys.readouterr().out


def test_nonfinite_loss_under_the_grad_scaler_still_stops_the_run(tiny_toy, tmp_path):
    config = config_for(tmp_path / "out", max_steps=10, max_nonfinite_steps=2)
    with pytest.raises(NonFiniteError, match="2 consecutive steps"):
        ScaledTrainer(config, tiny_toy, colour_pairs(8), FaultyMethod(tiny_toy, config, "nan_loss", set(range(1, 11))),
                      collate_fn=stack_batch, show_progress=False, save_model=False).train()


@pytest.mark.slow
def test_two_processes_agree_to_skip_a_step_only_one_of_them_found_bad(tmp_path):
    """An infinite loss with finite gradients on rank 1 only: both ranks skip the step (or
    their weights would silently diverge). Equal to one process with accumulation 2 whose
    second micro-batch of that step goes bad."""
    model = make_sd15(tmp_path / "sd")
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 10, with_ties=False)
    args = ["train", "--model_name_or_path", str(model), "--dataset_name", str(data), "--resolution",
            str(RESOLUTION), "--lora_rank", "4", "--per_device_train_batch_size", "1", "--max_steps", "4",
            "--learning_rate", "1e-2", "--beta", "500", "--report_to", "none", "--checkpointing_steps", "0"]
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path), SNPO_FAULT_BAD_LOSS="inf_loss:2:1")
    two = tmp_path / "two"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                           str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), str(ROOT / "tests" / "fault_runner.py"),
                           *args, "--output_dir", str(two)], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "step 2: non-finite loss; step skipped" in done.stdout
    one = tmp_path / "one"
    # one process, accumulation 2: micro-batch 2 of step 2 (rank 1's pairs) goes bad
    env.update(SNPO_FAULT_BAD_LOSS="inf_loss:4", SNPO_FAULT_MICRO_BATCHES="1")
    done = subprocess.run([sys.executable, str(ROOT / "tests" / "fault_runner.py"), *args, "--output_dir", str(one),
                           "--gradient_accumulation_steps", "2"], env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    a = load_file(two / "pytorch_lora_weights.safetensors")
    b = load_file(one / "pytorch_lora_weights.safetensors")
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
