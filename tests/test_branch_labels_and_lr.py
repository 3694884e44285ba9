"""Branch labels and learning-rate scaling, checked by their effect.

- Over many pairs the share of pairs trained on the null branch is p: the count must lie in
  the exact two-sided 99.9% binomial interval for (n, p), computed here from the binomial
  distribution (not a hand-picked threshold). Checked through the trainer (the logged
  ``branch/negative_fraction`` of a run, which builds its method from the registry as
  ``snpo train`` does) and on one large batch of the method, at p = 0.2 (the default) and
  p = 0.5; every micro-batch of the run must also be plausible on its own, which catches one
  label shared by a whole batch.
- ``scale_lr`` gives the optimizer the rate ``learning_rate x per-device batch x
  accumulation x processes`` (one process here; two gloo processes in the slow test): read
  from the optimizer the trainer builds, and by its effect, AdamW's first step moving every
  weight with a clear gradient by the learning rate itself (|m/sqrt(v)| = 1 on step one).

Planted and caught: the coin drawn as ``rand > p`` (probability 1 - p), one coin per batch
instead of per pair, and the registry building the method with ``cfg_dropout / 2``; the
learning rate without the accumulation factor, and scaled when ``scale_lr`` is off.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import colour_pairs
from snpo.methods import get_method
from snpo.methods.draws import pair_seed
from snpo.toy.data import stack_batch
from snpo.training.config import TrainConfig
from snpo.training.job import build_method
from snpo.training.trainer import Callback, Trainer

ROOT = Path(__file__).resolve().parents[1]


def binomial_interval(n: int, p: float, level: float = 0.999) -> tuple[int, int]:
    """Smallest [lo, hi] with P(X < lo) <= a/2 and P(X > hi) <= a/2, X ~ Binomial(n, p)."""
    alpha = (1 - level) / 2

    def pmf(k: int) -> float:
        return math.exp(math.lgamma(n + 1) - math.lgamma(k + 1) - math.lgamma(n - k + 1)
                        + k * math.log(p) + (n - k) * math.log1p(-p))

    cdf, lo = 0.0, 0
    while cdf + pmf(lo) <= alpha:
        cdf += pmf(lo)
        lo += 1
    tail, hi = 0.0, n
    while tail + pmf(hi) <= alpha:
        tail += pmf(hi)
        hi -= 1
    return lo, hi


def test_binomial_interval_is_exact():
    # by hand, Binomial(10, 0.5): P(X = 0) = 1/1024 = 0.00098, P(X <= 1) = 11/1024 = 0.0107,
    # P(X <= 2) = 56/1024 = 0.0547 (and symmetrically at the top)
    assert binomial_interval(10, 0.5) == (0, 10)  # 0.00098 > 0.0005: 0 is plausible at 99.9%
    assert binomial_interval(10, 0.5, level=0.99) == (1, 9)  # 0.00098 <= 0.005 < 0.0107
    assert binomial_interval(10, 0.5, level=0.9) == (2, 8)  # 0.0107 <= 0.05 < 0.0547
    lo, hi = binomial_interval(400, 0.2)
    assert 50 < lo < 60 and 100 < hi < 110  # about 80 -/+ 3.3 standard deviations (8)


class MicroBatches(Callback):
    """The pairs of every micro-batch, seen as the trainer hands them to the method."""

    def __init__(self) -> None:
        self.sizes: list[int] = []

    def on_micro_batch(self, batch) -> None:
        self.sizes.append(len(batch["prompt"]))


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_null_branch_share_of_a_training_run_matches_p(tiny_toy, tmp_path, p):
    batch, accumulation, steps = 16, 2, 10
    config = TrainConfig(output_dir=str(tmp_path / "out"), method="snpo", cfg_dropout=p,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_steps=steps, learning_rate=1e-4, lr_scheduler="constant", beta=500.0,
                         checkpointing_steps=0, report_to="none", seed=3)
    built = build_method(config, tiny_toy)  # the registry's method, as snpo train builds it
    seen = MicroBatches()
    result = Trainer(config, tiny_toy, colour_pairs(64), built.method, collate_fn=stack_batch,
                     trainable_parameters=built.trainable_parameters, model=built.model,
                     show_progress=False, save_model=False, write_logs=False, callbacks=[seen]).train()
    assert seen.sizes == [batch] * (steps * accumulation)
    per_step = batch * accumulation
    counts = [h["branch/negative_fraction"] * per_step for h in result.history]
    assert all(abs(c - round(c)) < 1e-6 for c in counts)  # whole pairs
    n = per_step * steps
    lo, hi = binomial_interval(n, p)
    assert lo <= round(sum(counts)) <= hi, (sum(counts), lo, hi)
    step_lo, step_hi = binomial_interval(per_step, p)
    assert all(step_lo <= round(c) <= step_hi for c in counts), counts


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_null_branch_share_of_one_large_batch_matches_p(tiny_toy, p):
    n = 400
    data = colour_pairs(n)
    batch = stack_batch([data[i] for i in range(n)])
    config = TrainConfig(output_dir="unused", method="snpo-naive", cfg_dropout=p, beta=500.0)
    tiny_toy.prepare_for_training()
    method = get_method("snpo-naive").build(config, tiny_toy).method
    with torch.no_grad():
        _, metrics = method.compute_loss(tiny_toy.denoiser, batch, [pair_seed(5, 0, i) for i in range(n)])
    count = float(metrics["branch/negative_fraction"]) * n
    lo, hi = binomial_interval(n, p)
    assert lo <= round(count) <= hi, (count, lo, hi)


# ---- scale_lr ------------------------------------------------------------------------------
class OptimizerSpy(Callback):
    """The optimizer's rate when the loop begins, and every weight before and after step one."""

    def on_loop_begin(self, trainer) -> None:
        model, optimizer, _, params = trainer._prepared
        self.rates = [group["lr"] for group in optimizer.param_groups]
        self.params = params
        self.before = [p.detach().clone() for p in params]

    def before_optimizer(self) -> None:
        self.grads = [None if p.grad is None else p.grad.detach().clone() for p in self.params]

    def after_optimizer(self) -> None:
        if not hasattr(self, "after"):
            self.after = [p.detach().clone() for p in self.params]


@pytest.mark.parametrize("scale_lr, batch, accumulation", [(True, 4, 2), (True, 2, 3), (False, 4, 2)])
def test_scale_lr_sets_the_optimizer_rate(tiny_toy, tmp_path, scale_lr, batch, accumulation):
    base = 1e-4
    config = TrainConfig(output_dir=str(tmp_path / "out"), method="dpo", cfg_dropout=0.0,
                         per_device_train_batch_size=batch, gradient_accumulation_steps=accumulation,
                         max_steps=1, learning_rate=base, scale_lr=scale_lr, lr_scheduler="constant",
                         adam_weight_decay=0.0, max_grad_norm=0.0, beta=500.0, checkpointing_steps=0,
                         report_to="none", seed=0)
    expected = base * batch * accumulation if scale_lr else base  # one process
    spy = OptimizerSpy()
    built = build_method(config, tiny_toy)
    result = Trainer(config, tiny_toy, colour_pairs(16), built.method, collate_fn=stack_batch,
                     trainable_parameters=built.trainable_parameters, model=built.model,
                     show_progress=False, save_model=False, write_logs=False, callbacks=[spy]).train()
    assert spy.rates and all(r == pytest.approx(expected, rel=1e-12) for r in spy.rates)
    assert result.history[0]["lr"] == pytest.approx(expected, rel=1e-12)
    # the effect: AdamW's first step is lr * g / (|g| + eps) per element, i.e. lr wherever
    # |g| >> eps (1e-8); the weight moves by exactly that (up to float32 rounding of w + dw)
    moved = []
    for before, after, grad in zip(spy.before, spy.after, spy.grads):
        if grad is None:
            continue
        clear = grad.abs() > 1e-4
        moved.append((after - before)[clear].abs().double())
    moved = torch.cat(moved)
    assert moved.numel() > 1000
    torch.testing.assert_close(moved.median(), torch.tensor(expected, dtype=torch.float64), rtol=1e-3, atol=0)
    assert float(((moved - expected).abs() / expected).quantile(0.99)) < 1e-2


@pytest.mark.slow
def test_scale_lr_counts_processes(tmp_path):
    """Two gloo processes (the shipped CPU accelerate config): the logged rate is
    learning_rate x batch x accumulation x 2."""
    from fixtures_data import make_pickapic_parquet
    from tiny_pipelines import RESOLUTION, make_sd15

    model = make_sd15(tmp_path / "sd")
    data = tmp_path / "train.parquet"
    make_pickapic_parquet(data, 8, with_ties=False)
    out = tmp_path / "two"
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "snpo.cli"]
    args = ["train", "--model_name_or_path", str(model), "--dataset_name", str(data), "--output_dir", str(out),
            "--resolution", str(RESOLUTION), "--lora_rank", "2", "--per_device_train_batch_size", "1",
            "--gradient_accumulation_steps", "2", "--max_steps", "1", "--learning_rate", "1e-6",
            "--scale_lr", "true", "--lr_scheduler", "constant", "--report_to", "none",
            "--checkpointing_steps", "0"]
    proc = subprocess.run([*launch, *args], env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    import json

    logged = json.loads((out / "metrics.jsonl").read_text().splitlines()[-1])
    assert logged["lr"] == pytest.approx(1e-6 * 1 * 2 * 2, rel=1e-9)
