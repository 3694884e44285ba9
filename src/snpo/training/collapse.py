"""The live collapse signal: a plot of the run's curves refreshed at each checkpoint, and a
one-line note when ``logratio/chosen`` keeps falling.

``logratio/chosen`` is ``ref_err - err`` on the chosen images (conditional branch): how much
more likely the policy finds the winner than the reference does. Preference objectives can
raise the margin while BOTH likelihoods fall; a winner whose likelihood keeps decreasing is
the collapse the paper warns of (blurred or drifting images long before the run ends).

The rule (:func:`collapse_note`, a pure function): at each checkpoint the run's
``logratio/chosen`` is the mean over the steps since the previous checkpoint (one step's value
is a mean over a few pairs, far too noisy to compare); a fresh run starts from exactly 0 (the
policy is the reference at step 0). When these checkpoint values have fallen ``patience``
times in a row, the note is printed, once per streak: a streak that goes on stays silent, a
rise ends it, and a new streak of ``patience`` falls is noted again. It is a note, not a stop.

The plot (``output_dir/training_curves.png``, :func:`plot_training_curves`): the log-ratios of
both images with the checkpoint values of the chosen one, ``rewards/margins``, and the
accuracy per branch (conditional and null), each step faint and a moving average on top.
It is drawn with matplotlib's Agg canvas directly (no pyplot, no global backend switch) and
written atomically.
"""

from __future__ import annotations

import io
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from snpo.files import atomic_write_bytes
from snpo.training.trainer import Callback

CURVES_FILE = "training_curves.png"
WATCHED = "logratio/chosen"
#: panels of the plot: (title, metric keys drawn in it)
PANELS = (
    ("log-ratio vs reference", ("logratio/chosen", "logratio/rejected")),
    ("rewards/margins", ("rewards/margins",)),
    ("accuracy per branch", ("branch/conditional/accuracy", "branch/negative/accuracy")),
)
#: a method without per-branch accuracies (CHATS) has the overall one
ACCURACY_FALLBACK = "rewards/accuracies"


def _finite(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def checkpoint_values(
    history: Sequence[Mapping[str, Any]], checkpoints: Sequence[int], key: str = WATCHED,
    *, start_at_zero: bool = True,
) -> list[tuple[int, float]]:
    """``(step, value)`` per checkpoint: the mean of ``key`` over the logged steps since the
    previous checkpoint (a checkpoint whose window holds no finite value is left out), after
    ``(0, 0.0)`` when ``start_at_zero`` (a fresh run's policy is the reference)."""
    points = [(0, 0.0)] if start_at_zero else []
    previous = 0
    for step in sorted(set(checkpoints)):
        window = [h[key] for h in history
                  if isinstance(h.get("step"), int) and previous < h["step"] <= step and _finite(h.get(key))]
        previous = step
        if window:
            points.append((step, sum(window) / len(window)))
    return points


def falling_streak(values: Sequence[float]) -> int:
    """How many times in a row the sequence has fallen (strictly) at its end."""
    streak = 0
    for i in range(len(values) - 1, 0, -1):
        if values[i] < values[i - 1]:
            streak += 1
        else:
            break
    return streak


def collapse_note(points: Sequence[tuple[int, float]], patience: int, key: str = WATCHED) -> str | None:
    """The note when the checkpoint values ``points`` (``(step, value)``, in order) have just
    fallen ``patience`` times in a row, else None (see the module docstring). Called after
    each checkpoint with the points so far, it fires once per streak."""
    if patience < 1:
        return None
    values = [v for _, v in points]
    if falling_streak(values) != patience:
        return None
    (first_step, first), (last_step, last) = points[-patience - 1], points[-1]
    checkpoints = "1 checkpoint" if patience == 1 else f"{patience} checkpoints"
    return (f"note: {key} has fallen for {checkpoints} in a row ({first:.4g} -> {last:.4g}, "
            f"steps {first_step}-{last_step}): the winner's likelihood is decreasing, the collapse the "
            f"paper warns of; watch the validation images (training goes on)")


# ---- the plot ----------------------------------------------------------------------------
def _smooth(values: Sequence[float], window: int) -> list[float]:
    from snpo.evaluate.aggregate import smooth

    return [float(v) for v in smooth(values, window)]


def render_training_curves(
    history: Sequence[Mapping[str, Any]], points: Sequence[tuple[int, float]] = (), *, title: str = "",
) -> bytes:
    """PNG bytes of the three panels (see the module docstring)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11.0, 3.3))
    axes = fig.subplots(1, len(PANELS))
    window = max(1, min(25, len(history) // 10 or 1))
    for ax, (panel, keys) in zip(axes, PANELS):
        if panel.startswith("accuracy") and not any(_finite(h.get(k)) for h in history for k in keys):
            keys = (ACCURACY_FALLBACK,)
        for key in keys:
            rows = [(h["step"], h[key]) for h in history if isinstance(h.get("step"), int) and _finite(h.get(key))]
            if not rows:
                continue
            steps, values = zip(*rows)
            line, = ax.plot(steps, values, linewidth=0.6, alpha=0.3)
            label = key.split("/", 1)[-1] if len(keys) > 1 else key
            ax.plot(steps, _smooth(values, window), color=line.get_color(), linewidth=1.4, label=label)
        if panel.startswith("log-ratio") and points:
            ax.plot([s for s, _ in points], [v for _, v in points], "o", color="black", markersize=3,
                    label="chosen, per checkpoint")
        if not panel.startswith("accuracy"):
            ax.axhline(0, color="black", linewidth=0.6)
        ax.set_title(panel, fontsize=10)
        ax.set_xlabel("step", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.16, top=0.82 if title else 0.88, wspace=0.28)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=80)
    return buffer.getvalue()


def plot_training_curves(path: str | Path, history: Sequence[Mapping[str, Any]],
                         points: Sequence[tuple[int, float]] = (), *, title: str = "") -> Path:
    """Write :func:`render_training_curves` to ``path`` atomically."""
    path = Path(path)
    atomic_write_bytes(path, render_training_curves(history, points, title=title))
    return path


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a ``metrics.jsonl`` (a torn last line is skipped)."""
    path = Path(path)
    if not path.is_file():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict):
            records.append(record)
    return records


class CollapseWatch(Callback):
    """Keeps the run's metrics, notes a falling ``logratio/chosen`` at each checkpoint and
    refreshes ``training_curves.png`` there and at the end (main process writes).

    On a resume the metrics up to the checkpoint are read back from ``metrics.jsonl`` (the
    trainer has already cut it at the checkpoint), so the plot and the streak span the run."""

    def __init__(self, config: Any, *, plot: bool = True) -> None:
        self.config = config
        self.plot = plot
        self.history: list[dict[str, Any]] = []
        self.checkpoints: list[int] = []
        self.accelerator: Any = None
        self._plotted = -1  # len(history) the plot on disk shows

    def on_loop_begin(self, trainer: Any) -> None:
        self.accelerator = trainer.accelerator
        start = int(getattr(trainer, "start_step", 0))
        self.history, self.checkpoints, self._plotted = [], [], -1
        if start:
            out = Path(self.config.output_dir)
            self.history = [r for r in read_metrics(out / "metrics.jsonl")
                            if isinstance(r.get("step"), int) and r["step"] <= start]
            every = self.config.checkpointing_steps
            self.checkpoints = [s for s in range(every, start + 1, every)] if every else []
            if start not in self.checkpoints:
                self.checkpoints.append(start)

    def on_step_end(self, step: int, logs: dict[str, float]) -> None:
        self.history.append(dict(logs))

    def points(self) -> list[tuple[int, float]]:
        # a resumed run started fresh too: from the reference, logratio 0
        return checkpoint_values(self.history, self.checkpoints)

    def on_checkpoint(self, step: int, folder: Path) -> None:
        self.checkpoints.append(step)
        points = self.points()
        note = collapse_note(points, self.config.collapse_patience)
        if note and self.accelerator is not None:
            self.accelerator.print(note)
        self._plot(points)

    def on_train_end(self, accelerator: Any) -> None:
        self._plot(self.points())

    def _plot(self, points: list[tuple[int, float]]) -> None:
        accelerator = self.accelerator
        if (not self.plot or accelerator is None or not accelerator.is_main_process or not self.history
                or self._plotted == len(self.history)):  # the end right after the last checkpoint
            return
        self._plotted = len(self.history)
        out = Path(self.config.output_dir)
        try:  # a picture is not worth stopping a run for
            out.mkdir(parents=True, exist_ok=True)
            plot_training_curves(out / CURVES_FILE, self.history, points,
                                 title=f"{self.config.method}: {Path(str(self.config.model_name_or_path)).name}")
        except Exception as err:  # noqa: BLE001
            accelerator.print(f"note: {CURVES_FILE} not refreshed ({type(err).__name__}: {err})")
