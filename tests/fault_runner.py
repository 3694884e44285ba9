"""``snpo`` with faults injected from environment variables, for the reliability tests.

    python tests/fault_runner.py train --key value ...       (same arguments as ``snpo``)

Nothing in ``src/`` knows about these faults: this script patches the running process and
then calls ``snpo.cli.main``. Variables:

* ``SNPO_FAULT_STEP_DELAY=SECONDS``: sleep after every optimizer step, so that a test killing
  the process from outside lands mid-run however fast the tiny model trains.
* ``SNPO_FAULT_KILL_IN_SAVE=STEP:POINT``: SIGKILL this process while checkpoint STEP is being
  written, at POINT (see ``install_kill_in_save``).
* ``SNPO_FAULT_BAD_LOSS=KIND:STEPS[:RANK]``: a non-finite loss (``nan_loss``, ``inf_loss``) or
  gradient (``nan_grad``) on the given optimizer steps, on one rank or all
  (``SNPO_FAULT_MICRO_BATCHES``: micro-batches per step, for gradient accumulation).

Works under ``accelerate launch`` too (each rank runs this script).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import torch

#: where a kill during a checkpoint write can land, in the order they happen
KILL_POINTS = ("after_model", "before_state", "before_latest", "during_prune")


def die() -> None:
    """SIGKILL: no exception, no ``finally``, no flush; exactly what an OOM killer does."""
    sys.stdout.flush()
    os.kill(os.getpid(), signal.SIGKILL)


def install_step_delay(seconds: float) -> None:
    from snpo.training.trainer import Trainer

    original = Trainer._should_checkpoint

    def slow(self, step: int) -> bool:  # called once per optimizer step
        time.sleep(seconds)
        return original(self, step)

    Trainer._should_checkpoint = slow


def install_kill_in_save(step: int, point: str) -> None:
    """Kill while ``checkpoint-<step>`` is written:

    * ``after_model``: model weights written to ``checkpoint-N.tmp``, optimizer state not;
    * ``before_state``: every data file written, ``trainer_state.json`` not (incomplete);
    * ``before_latest``: renamed to ``checkpoint-N``, the ``latest`` pointer not yet moved;
    * ``during_prune``: committed; an old checkpoint renamed to ``*.deleting``, not deleted.
    """
    from snpo.training import checkpoint as ckpt

    if point not in KILL_POINTS:
        raise SystemExit(f"SNPO_FAULT_KILL_IN_SAVE: unknown point {point!r}; one of {KILL_POINTS}")
    target = f"checkpoint-{step}"
    save_object, write_text, discard = ckpt.save_object, ckpt.atomic_write_text, ckpt._discard

    def save_object_then_die(path: Path, obj) -> None:
        if point == "after_model" and path.parent.name == f"{target}.tmp" and path.name == ckpt.OPTIMIZER_FILE:
            die()
        save_object(path, obj)

    def write_text_then_die(path: Path, text: str) -> None:
        if point == "before_state" and path.parent.name == f"{target}.tmp" and path.name == ckpt.STATE_FILE:
            die()
        if point == "before_latest" and path.name == "latest" and text == target:
            die()
        write_text(path, text)

    def discard_then_die(path: Path) -> None:
        latest = path.parent / "latest"
        if point == "during_prune" and latest.is_file() and latest.read_text() == target:
            os.replace(path, path.with_name(path.name + ".deleting"))
            die()
        discard(path)

    ckpt.save_object = save_object_then_die
    ckpt.atomic_write_text = write_text_then_die
    ckpt._discard = discard_then_die


class NaNGradient(torch.autograd.Function):
    """Identity forward, NaN backward: a finite loss whose gradient is not."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad):
        return grad * float("nan")


def bad_loss(loss, kind: str):
    """``loss`` made non-finite in one of three ways (see ``install_bad_loss``)."""
    if kind == "nan_loss":
        return loss * float("nan")
    if kind == "inf_loss":  # a constant: the gradient stays finite, only the loss is not
        return loss + float("inf")
    if kind == "nan_grad":
        return NaNGradient.apply(loss)
    raise SystemExit(f"unknown bad loss kind {kind!r}")


def install_bad_loss(kind: str, steps: set[int], rank: int | None, micro_batches_per_step: int) -> None:
    """Make the loss of the given optimizer steps (1-based) non-finite, on one rank or all."""
    from snpo.methods.single import SingleNetworkMethod

    original = SingleNetworkMethod.compute_loss
    calls = [0]

    def compute_loss(self, model, batch, pair_seeds):
        loss, metrics = original(self, model, batch, pair_seeds)
        step = calls[0] // micro_batches_per_step + 1
        calls[0] += 1
        this_rank = int(os.environ.get("RANK", "0"))
        if step in steps and (rank is None or rank == this_rank):
            loss = bad_loss(loss, kind)
        return loss, metrics

    SingleNetworkMethod.compute_loss = compute_loss


def main() -> int:
    if os.environ.get("SNPO_FAULT_STEP_DELAY"):
        install_step_delay(float(os.environ["SNPO_FAULT_STEP_DELAY"]))
    if os.environ.get("SNPO_FAULT_KILL_IN_SAVE"):
        step, point = os.environ["SNPO_FAULT_KILL_IN_SAVE"].split(":")
        install_kill_in_save(int(step), point)
    if os.environ.get("SNPO_FAULT_BAD_LOSS"):
        # KIND:STEP,STEP,...[:RANK], e.g. inf_loss:2:1 (steps count the micro-batches below)
        kind, steps, *rank = os.environ["SNPO_FAULT_BAD_LOSS"].split(":")
        install_bad_loss(kind, {int(x) for x in steps.split(",")}, int(rank[0]) if rank else None,
                         int(os.environ.get("SNPO_FAULT_MICRO_BATCHES", "1")))
    from snpo.cli import main as snpo_main

    return snpo_main(sys.argv[1:])


if __name__ == "__main__":
    sys.exit(main())
