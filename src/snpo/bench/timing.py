"""Phase timers, peak memory and FLOP counts for one benchmarked training run.

- Phases: ``data`` (read/decode/transform/collate), ``encode`` (VAE + text encoders; a cached
  batch only moves tensors), ``policy_forward``, ``reference_forward`` (reference predictions
  under no_grad, or the stored-error lookup), ``policy_backward``, ``optimizer`` (gradient
  clipping + step) and ``other`` (the rest of the step: noise draws, loss math, metrics,
  logging). Phases never overlap: a phase started inside another is counted in the outer one.
  On CUDA every phase boundary calls ``torch.cuda.synchronize()`` so GPU time lands in the
  phase that queued it (this costs a little overlap; the same for every configuration).
- Steps end at the optimizer's ``zero_grad`` (called once per step, also on skipped steps).
- Each phase and step also records the process's CPU time (``time.process_time``). With one
  torch thread on a shared CPU this is the work done whatever the neighbours do; wall time is
  what the run takes. Both are reported; on an idle machine they agree.
- Peak memory. CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats()``
  at the start of the first step. CPU: the process's resident-set high-water mark
  (``VmHWM``), reset at the start of the first step by writing ``5`` to
  ``/proc/self/clear_refs`` (after ``malloc_trim`` returns set-up memory already freed); each configuration runs in its own process, so the number is that
  configuration's peak (weights, activations, gradients, optimizer state, allocator slack);
  ``live_bytes`` is the resident set after the last step once freed heap is returned
  (weights, optimizer state, the reference copy: what persists between steps).
  Where ``clear_refs`` is not writable, ``ru_maxrss`` (process-wide, monotone) is reported
  and flagged.
- FLOPs: ``torch.utils.flop_counter.FlopCounterMode`` over one whole step (the first
  warm-up step), per phase; matmuls, convolutions and attention (forward and backward).
"""

from __future__ import annotations

import resource
import time
from collections import defaultdict
from contextlib import contextmanager
from typing import Any

import torch

PHASES = (
    "data", "encode", "policy_forward", "reference_forward", "policy_backward", "optimizer",
    "other",
)


def _read_status(field: str) -> int | None:
    """A ``/proc/self/status`` field in bytes (``VmRSS``, ``VmHWM``), or None."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _release_free_heap() -> None:
    """Hand memory freed during set-up back to the OS (glibc ``malloc_trim``), so the
    resident set counts live memory only: without it, the full weights a sharded run freed
    after sharding stay resident and hide what sharding saves."""
    import contextlib
    import ctypes
    import gc

    gc.collect()
    with contextlib.suppress(OSError, AttributeError):  # not glibc: freed set-up memory may count
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def reset_cpu_peak() -> bool:
    """Reset the resident-set high-water mark (Linux >= 4.0) after releasing freed heap
    memory; False when not possible."""
    _release_free_heap()
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


class PhaseTimer:
    """Per-step phase times (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu", *, count_flops_step: int | None = 0) -> None:
        self.device = torch.device(device)
        self.steps: list[dict[str, Any]] = []
        self._bucket: dict[str, float] = defaultdict(float)
        self._cpu: dict[str, float] = defaultdict(float)
        self._flops: dict[str, int] = defaultdict(int)
        self._active: str | None = None
        self._started = 0.0
        self._cpu_started = 0.0
        self._step_cpu_start = 0.0
        self._flops_at_start = 0
        self._step_start: float | None = None
        self.count_flops_step = count_flops_step
        self._counter: Any = None
        self.memory: dict[str, Any] = {}
        #: set during a step to label it (e.g. the objective of an interleaved run)
        self.step_label: str | None = None

    # ---- synchronisation and clocks -------------------------------------------------------
    def sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _total_flops(self) -> int:
        return int(self._counter.get_total_flops()) if self._counter is not None else 0

    # ---- phases ------------------------------------------------------------------------------
    def start(self, name: str) -> bool:
        """Start ``name`` unless a phase is running; True when this call started it."""
        if self._active is not None or self._step_start is None:
            return False
        self.sync()
        self._active, self._started = name, time.perf_counter()
        self._cpu_started = time.process_time()
        self._flops_at_start = self._total_flops()
        return True

    def stop(self, name: str) -> None:
        if self._active != name:
            return
        self.sync()
        self._bucket[name] += time.perf_counter() - self._started
        self._cpu[name] += time.process_time() - self._cpu_started
        self._flops[name] += self._total_flops() - self._flops_at_start
        self._active = None

    @contextmanager
    def phase(self, name: str):
        started = self.start(name)
        try:
            yield
        finally:
            if started:
                self.stop(name)

    def wrap(self, fn, name: str):
        """``fn`` timed as phase ``name``."""

        def timed(*args, **kwargs):
            with self.phase(name):
                return fn(*args, **kwargs)

        timed.__wrapped__ = fn
        return timed

    # ---- steps -------------------------------------------------------------------------------
    def begin(self) -> None:
        """Start of the first step: reset peak memory, start the clock (and the FLOP counter)."""
        self.sync()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            self.memory = {"method": "torch.cuda.max_memory_allocated",
                           "start_bytes": torch.cuda.memory_allocated(self.device)}
        else:
            exact = reset_cpu_peak()
            self.memory = {"method": "VmHWM after clear_refs" if exact else "ru_maxrss (process-wide)",
                           "start_bytes": _read_status("VmRSS")}
        self._maybe_start_flops(0)
        self._step_start = time.perf_counter()
        self._step_cpu_start = time.process_time()

    def _maybe_start_flops(self, index: int) -> None:
        if self.count_flops_step is not None and index == self.count_flops_step:
            from torch.utils.flop_counter import FlopCounterMode

            self._counter = FlopCounterMode(display=False)
            self._counter.__enter__()

    def end_step(self) -> None:
        """End of one optimizer step (the optimizer's ``zero_grad``)."""
        if self._step_start is None:
            return
        if self._active is not None:  # never expected; keep the accounting consistent
            self.stop(self._active)
        self.sync()
        now = time.perf_counter()
        wall = now - self._step_start
        cpu = time.process_time() - self._step_cpu_start
        phases = {name: self._bucket.get(name, 0.0) for name in PHASES if name != "other"}
        phases["other"] = max(0.0, wall - sum(phases.values()))
        phases_cpu = {name: self._cpu.get(name, 0.0) for name in PHASES if name != "other"}
        phases_cpu["other"] = max(0.0, cpu - sum(phases_cpu.values()))
        record: dict[str, Any] = {"wall_s": wall, "phases_s": phases, "cpu_s": cpu,
                                  "phases_cpu_s": phases_cpu}
        if self.step_label is not None:
            record["label"], self.step_label = self.step_label, None
        if self._counter is not None:
            flops = {k: v for k, v in self._flops.items() if v}
            flops["total"] = self._total_flops()
            flops["other"] = max(0, flops["total"] - sum(v for k, v in flops.items() if k != "total"))
            record["flops"] = flops
            self._counter.__exit__(None, None, None)
            self._counter = None
        self.steps.append(record)
        self._bucket = defaultdict(float)
        self._cpu = defaultdict(float)
        self._flops = defaultdict(int)
        self._maybe_start_flops(len(self.steps))
        self._step_start = time.perf_counter()
        self._step_cpu_start = time.process_time()

    def finish(self) -> dict[str, Any]:
        """Peak memory since :meth:`begin` and the per-step records."""
        self.sync()
        if self._counter is not None:
            self._counter.__exit__(None, None, None)
            self._counter = None
        if self.device.type == "cuda":
            self.memory["peak_bytes"] = torch.cuda.max_memory_allocated(self.device)
            self.memory["peak_reserved_bytes"] = torch.cuda.max_memory_reserved(self.device)
        else:
            hwm = _read_status("VmHWM")
            if hwm is None or not self.memory.get("method", "").startswith("VmHWM"):
                hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
            self.memory["peak_bytes"] = hwm
            # between steps (freed heap returned): weights, optimizer state, reference copy;
            # the part sharding divides, without the CPU allocator's transients of the step
            _release_free_heap()
            self.memory["live_bytes"] = _read_status("VmRSS")
        return {"steps": self.steps, "memory": self.memory}


def optimizer_hooks(optimizer: torch.optim.Optimizer, timer: PhaseTimer) -> torch.optim.Optimizer:
    """Time ``optimizer.step`` as the ``optimizer`` phase and end a step at ``zero_grad``."""
    def pre_hook(*_: Any) -> None:
        timer.start("optimizer")

    def post_hook(*_: Any) -> None:
        timer.stop("optimizer")

    optimizer.register_step_pre_hook(pre_hook)
    optimizer.register_step_post_hook(post_hook)
    zero_grad = optimizer.zero_grad

    def zero_grad_and_end_step(set_to_none: bool = True) -> None:  # accelerate inspects the name
        zero_grad(set_to_none=set_to_none)
        timer.end_step()

    optimizer.zero_grad = zero_grad_and_end_step
    return optimizer
