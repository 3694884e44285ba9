"""The training loop, on accelerate: one loop for every backbone and method.

The trainer owns the optimizer, the learning-rate schedule, gradient accumulation,
clipping, non-finite guards, logging, checkpoints and resume. It calls
``method.compute_loss(model, batch, pair_seeds)`` and knows neither the model family nor the
objective's math. :class:`Callback` hooks let others watch the loop (the benchmark's phase
timers, the count of skipped pairs) without subclassing it.

One optimizer step = ``gradient_accumulation_steps`` calls of :meth:`Trainer._micro_step`
(loss and backward), then :meth:`Trainer._optimizer_step` (clip, finiteness checks, step)
and :meth:`Trainer._end_step` (non-finite guard, logs, progress, checkpoint).

Reproducibility: every pair of every step gets its own seed, ``pair_seed(seed, step, global
pair index)`` (``snpo.methods.draws``), from which its noise, timestep and branch label are
drawn. The global pair index counts across micro-batches and processes, so one process with
batch 2, one process with batch 1 and accumulation 2, and two processes with batch 1 draw the
same noise for the same pairs, and a resumed run replays exactly.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import resource
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from snpo.backbones.base import Backbone
from snpo.configuration import config_to_dict
from snpo.errors import ConfigError, UserError
from snpo.methods.draws import pair_seed
from snpo.methods.registry import Method
from snpo.training import checkpoint as ckpt
from snpo.training.config import TrainConfig
from snpo.training.engines import (
    check_engine,
    expected_distributed_type,
    fill_engine_env,
    promoted_accelerator,
    shard_like_policy,
)
from snpo.training.fingerprints import resume_fingerprint
from snpo.training.optimizers import make_optimizer

PROGRESS_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logratio/chosen")


class NonFiniteError(UserError, RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


class Callback:
    """Hooks of the training loop; subclass and override what you need (all no-ops here).

    Order within one optimizer step: ``on_micro_batch`` -> (loss) -> ``before_backward`` ->
    ``after_backward``, once per micro-batch; then ``before_optimizer`` -> (clip, step,
    zero_grad) -> ``after_optimizer``; then ``on_step_end`` with the logged metrics, and
    ``on_checkpoint`` after a checkpoint is committed. ``on_micro_batch`` and
    ``on_train_end`` run on every process; the others too, but only the main process writes.
    From ``on_loop_begin`` on, ``trainer.accelerator`` is the run's accelerator and
    ``trainer.start_step`` the step the loop starts from (0 for a fresh run).
    """

    def on_loop_begin(self, trainer: Trainer) -> None: ...
    def on_micro_batch(self, batch: dict[str, Any]) -> None: ...
    def before_backward(self) -> None: ...
    def after_backward(self) -> None: ...
    def before_optimizer(self) -> None: ...
    def after_optimizer(self) -> None: ...
    def on_step_end(self, step: int, logs: dict[str, float]) -> None: ...
    def on_checkpoint(self, step: int, folder: Path) -> None: ...
    def on_train_end(self, accelerator: Accelerator) -> None: ...


class EpochShuffleSampler(Sampler[int]):
    """A permutation of the dataset that depends only on ``(seed, epoch)``, so data order
    replays after a resume and is the same whatever the number of processes."""

    def __init__(self, n: int, seed: int) -> None:
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return iter(torch.randperm(self.n, generator=generator).tolist())

    def __len__(self) -> int:
        return self.n


def cpu_only_launch() -> bool:
    """True when launched as several processes (torchrun, accelerate) on a machine without
    an accelerator: accelerate then needs ``cpu=True`` to see the ranks (gloo)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    xpu = getattr(torch, "xpu", None)
    return not (torch.cuda.is_available() or (xpu is not None and xpu.is_available())
                or torch.backends.mps.is_available())


def peak_memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


@dataclass
class TrainResult:
    global_step: int
    history: list[dict[str, float]] = field(default_factory=list)
    output_dir: Path | None = None
    final_metrics: dict[str, float] = field(default_factory=dict)
    skipped_nonfinite: int = 0


@dataclass
class _Run:
    """What one call of :meth:`Trainer.train` has prepared (the loop's working state)."""

    accelerator: Accelerator
    model: nn.Module
    optimizer: Any
    lr_scheduler: Any
    dataloader: Any
    sampler: Any
    params: list[nn.Parameter]
    checkpoint_root: Path
    metrics_fh: Any = None
    progress: Any = None
    global_step: int = 0
    micro_metrics: list[dict[str, Tensor]] = field(default_factory=list)
    nonfinite_losses: Tensor | None = None
    consecutive_nonfinite: int = 0
    step_start: float = 0.0


@dataclass
class _StepOutcome:
    """How an optimizer step went: the gradient norm and which checks passed."""

    grad_norm: float | None
    loss_finite: bool
    grads_finite: bool
    overflow_scale: float | None  # fp16: the GradScaler's scale after an overflow it handled

    @property
    def finite(self) -> bool:
        return self.loss_finite and self.grads_finite


class Trainer:
    """Preference alignment with any method and backbone; see the module docstring."""

    def __init__(
        self,
        config: TrainConfig,
        backbone: Backbone,
        dataset: Dataset,
        method: Method,
        *,
        collate_fn: Callable | None = None,
        trainable_parameters: list[nn.Parameter] | None = None,
        model: nn.Module | None = None,
        show_progress: bool = True,
        save_model: bool = True,
        write_logs: bool = True,
        data_report: Callable[[], dict[str, Any]] | None = None,
        model_card: Callable[[Path, dict[str, Any]], None] | None = None,
        sampler: Sampler[int] | None = None,
        callbacks: list[Callback] | None = None,
        stateful: list[Any] | None = None,
    ) -> None:
        """``sampler`` (default: ``EpochShuffleSampler``) must have ``set_epoch`` and depend
        only on (seed, epoch), so every process sees the same order. ``callbacks`` see the
        loop's events (:class:`Callback`). ``stateful`` objects (``state_dict()`` ->
        JSON-able, ``load_state_dict``) are saved per process in every checkpoint and restored
        on resume (e.g. the pairs skipped so far)."""
        self.config = config
        self.backbone = backbone
        self.dataset = dataset
        self.method = method
        self.collate_fn = collate_fn
        self.model = model if model is not None else backbone.denoiser
        self.trainable_parameters = trainable_parameters
        self.show_progress = show_progress
        self.save_model = save_model
        self.write_logs = write_logs
        self.data_report = data_report
        self.model_card = model_card
        self.sampler = sampler
        self.callbacks = list(callbacks or [])
        self.stateful = list(stateful or [])
        # non-finite step counters, saved in checkpoints so a resumed run counts on
        self._counters = {"nonfinite_skipped": 0, "consecutive_nonfinite": 0}

    def _emit(self, event: str, *args: Any) -> None:
        for callback in self.callbacks:
            getattr(callback, event)(*args)

    # ---- set-up --------------------------------------------------------------------------
    def _make_accelerator(self) -> Accelerator:
        """The run's accelerator, for the engine the launcher asked for (``engines``): its
        accumulation and clipping checked against the config (one line), an ``auto``
        DeepSpeed value filled from it; FSDP and DeepSpeed on CPU ranks too."""
        c = self.config
        engine = check_engine(c)
        fill_engine_env(c, engine)
        self.engine = engine
        # a new run in the same process may change the precision: reset the per-run state
        # (the process group of a multi-process run, PartialState, is kept)
        AcceleratorState._reset_state()
        log_with = None
        if self.write_logs and c.report_to != "none":
            log_with = ["tensorboard", "wandb"] if c.report_to == "all" else [c.report_to]
        kwargs = dict(gradient_accumulation_steps=c.gradient_accumulation_steps, mixed_precision=c.mixed_precision,
                      log_with=log_with, project_dir=c.output_dir)
        if engine.sharded and cpu_only_launch():
            accelerator = promoted_accelerator(**kwargs)
        else:
            accelerator = Accelerator(cpu=cpu_only_launch(), **kwargs)
        wanted = expected_distributed_type(engine)
        if wanted is not None and accelerator.distributed_type != wanted:
            # accelerate falls back to DDP without a word (e.g. FSDP with Accelerator(cpu=True))
            raise RuntimeError(f"launched for {engine.kind} but accelerate set up {accelerator.distributed_type}; "
                               "check the launcher and accelerate config")
        return accelerator

    def learning_rate(self, world: int) -> float:
        """``learning_rate``, times per-device batch x accumulation x processes with ``scale_lr``
        (Diffusion-DPO: a per-pair rate times the effective batch)."""
        c = self.config
        if not c.scale_lr:
            return c.learning_rate
        return c.learning_rate * c.per_device_train_batch_size * c.gradient_accumulation_steps * world

    def _make_optimizer(self, params: list[nn.Parameter], world: int) -> torch.optim.Optimizer:
        """``optimizer``: AdamW (``adam_implementation``), Adafactor or 8-bit AdamW."""
        return make_optimizer(self.config, params, self.learning_rate(world))

    def _prepare(self) -> _Run:
        """Accelerator, trainable parameters, optimizer, schedule, data loader and resume."""
        c = self.config
        accelerator = self._make_accelerator()
        launched = int(os.environ.get("WORLD_SIZE", "1"))
        if launched > accelerator.num_processes:
            # each process would train alone and they would overwrite each other's files
            raise RuntimeError(
                f"launched as {launched} processes but accelerate sees {accelerator.num_processes}; "
                "check the launcher and accelerate config (ACCELERATE_USE_CPU=1 on CPU machines)"
            )
        set_seed(c.seed)
        # the weights the run starts from, before adapters or casts: a resume must start there too
        self._weights_digest = ckpt.weights_digest(self.model)
        if c.allow_tf32 and torch.cuda.is_available():
            torch.backends.cuda.matmul.allow_tf32 = True
        output_dir = Path(c.output_dir)
        if accelerator.is_main_process and (self.write_logs or self.save_model):
            output_dir.mkdir(parents=True, exist_ok=True)

        weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision)
        params = self.trainable_parameters
        if params is None:
            params = self.backbone.prepare_for_training(
                lora_rank=c.lora_rank, gradient_checkpointing=c.gradient_checkpointing
            )
        self.backbone.to(accelerator.device, frozen_dtype=weight_dtype)
        for p in params:  # trainable weights stay in float32 under mixed precision
            p.data = p.data.float()

        world = accelerator.num_processes
        optimizer = self._make_optimizer(params, world)
        from diffusers.optimization import get_scheduler

        lr_scheduler = get_scheduler(
            c.lr_scheduler, optimizer=optimizer,
            num_warmup_steps=c.lr_warmup_steps * world, num_training_steps=c.max_steps * world,
        )
        sampler = self.sampler if self.sampler is not None else EpochShuffleSampler(len(self.dataset), c.seed)
        # its own generator: each new iterator draws a base seed, and from the global RNG that
        # draw would shift the restored RNG states of a resumed run (which starts an extra
        # iterator to skip into its epoch), so a model that uses the global RNG would not replay
        dataloader = DataLoader(
            self.dataset, batch_size=c.per_device_train_batch_size, sampler=sampler,
            collate_fn=self.collate_fn, drop_last=True, num_workers=c.dataloader_num_workers,
            generator=torch.Generator().manual_seed(c.seed),
        )
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            self.model, optimizer, dataloader, lr_scheduler
        )
        if accelerator.distributed_type == DistributedType.FSDP:
            # FSDP2 replaced the module's parameters by sharded ones (the optimizer's too):
            # clipping, checks and checkpoints must see those
            params = [p for p in model.parameters() if p.requires_grad]
            reference = getattr(self.backbone, "_reference", None)
            if reference is not None:  # a full fine-tune's frozen copy: sharded like the policy
                shard_like_policy(accelerator, reference)
        if len(dataloader) == 0:
            raise ConfigError(
                f"per_device_train_batch_size: {c.per_device_train_batch_size} x {world} processes "
                f"is more than the {len(self.dataset)} training pairs"
            )
        run = _Run(accelerator, model, optimizer, lr_scheduler, dataloader, sampler, params,
                   output_dir / "checkpoints")
        self._counters = {"nonfinite_skipped": 0, "consecutive_nonfinite": 0}
        self._prepared = (model, optimizer, lr_scheduler, params)
        if c.resume_from_checkpoint:
            self._resume(run)
        self._open_logs(run, output_dir)
        # for callbacks: the run's accelerator and the step the loop starts from (0: fresh)
        self.accelerator, self.start_step = accelerator, run.global_step
        return run

    def _resume(self, run: _Run) -> None:
        c, accelerator = self.config, run.accelerator
        found = ckpt.resolve_checkpoint(run.checkpoint_root, c.resume_from_checkpoint)
        if found is None:
            accelerator.print(f"resume_from_checkpoint: no checkpoint in {run.checkpoint_root}; starting fresh")
            return
        state = ckpt.read_state(found)
        self._check_resumable(state)
        ckpt.load_training_files(found, state, accelerator, run.model, run.optimizer, run.lr_scheduler,
                                 run.params, self.stateful)
        run.global_step = int(state["global_step"])
        for key in self._counters:
            self._counters[key] = int(state.get(key, 0))
        accelerator.print(f"resumed from {found} at step {run.global_step}")

    def _open_logs(self, run: _Run, output_dir: Path) -> None:
        c, accelerator = self.config, run.accelerator
        metrics_file = output_dir / "metrics.jsonl" if self.write_logs else None
        if c.resume_from_checkpoint and metrics_file is not None and accelerator.is_main_process:
            truncate_metrics(metrics_file, run.global_step)  # steps after the checkpoint are replayed
        if self.write_logs and accelerator.is_main_process and c.report_to != "none":
            # trackers take scalars and strings (TensorBoard's hparams): lists as JSON
            tracker_config = {k: v if isinstance(v, int | float | str) else json.dumps(v)
                              for k, v in config_to_dict(c).items() if v is not None}
            # a resumed run replays the steps after its checkpoint: drop their old events
            init_kwargs = {"tensorboard": {"purge_step": run.global_step + 1}} if run.global_step else {}
            accelerator.init_trackers(c.tracker_project_name, config=tracker_config, init_kwargs=init_kwargs)
        if metrics_file is not None and accelerator.is_main_process:
            run.metrics_fh = open(metrics_file, "a")  # noqa: SIM115 (closed in train's finally)

    # ---- the run -------------------------------------------------------------------------
    def train(self) -> TrainResult:
        run = self._prepare()
        accelerator = run.accelerator
        try:
            result = self._loop(run)
        finally:
            if run.progress is not None:
                run.progress.close()
            if run.metrics_fh is not None:
                run.metrics_fh.close()
        self._emit("on_train_end", accelerator)
        accelerator.wait_for_everyone()
        output_dir = Path(self.config.output_dir)
        if self.save_model:
            self._save_outputs(run, result, output_dir)
        result.output_dir = output_dir
        accelerator.end_training()
        return result

    def _save_outputs(self, run: _Run, result: TrainResult, output_dir: Path) -> None:
        accelerator = run.accelerator
        unwrapped = self._gathered_model(accelerator, run.model)
        if not accelerator.is_main_process:
            return
        # a method with several networks (CHATS) saves them its own way
        save = getattr(self.method, "save_trained", None)
        files = save(output_dir, unwrapped) if save else self.backbone.save_trained(output_dir, unwrapped)
        if self.model_card is not None:
            self.model_card(output_dir, {"final_metrics": result.final_metrics, "files": files,
                                         "global_step": result.global_step,
                                         "data": self.data_report() if self.data_report else None})

    def _gathered_model(self, accelerator: Accelerator, model: nn.Module) -> nn.Module:
        """The trained denoiser with full weights on the main process. Under FSDP (and
        DeepSpeed ZeRO-3) the parameters are sharded: every process takes part in gathering
        a full state dict, which only the main process receives, on the CPU (FSDP2:
        ``full_state_dict`` + ``cpu_offload``, so no process holds a second full copy on its
        device), loaded into a fresh copy built from the model's config (with the run's LoRA
        adapters, whose weights the state dict holds)."""
        unwrapped = accelerator.unwrap_model(model)
        zero3 = (accelerator.distributed_type == DistributedType.DEEPSPEED
                 and getattr(self, "engine", None) is not None and self.engine.zero_stage == 3)
        if accelerator.distributed_type != DistributedType.FSDP and not zero3:
            return unwrapped
        state = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return unwrapped
        full = type(unwrapped).from_config(unwrapped.config)
        if self.backbone.lora_rank > 0:
            self.backbone.add_lora_adapter(full)
        full.load_state_dict(state)
        return full

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another model, method or batch layout."""
        ckpt.check_fingerprint(state.get("fingerprint", {}), self._fingerprint())

    def _fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint: the model
        (path, family and a digest of its starting weights), the method, and the batch
        layout (per-pair seeds and the data order depend on it)."""
        return {
            **resume_fingerprint(self.config), "family": self.backbone.family,
            "num_processes": AcceleratorState().num_processes,
            "weights": getattr(self, "_weights_digest", None),
        }

    def _save_checkpoint(self, accelerator: Accelerator, root: Path, step: int) -> None:
        """An atomic checkpoint of safetensors and JSON (see ``snpo.training.checkpoint``)."""
        tmp = root / f"checkpoint-{step}.tmp"
        if accelerator.is_main_process:
            ckpt.begin_checkpoint(root, step)
        accelerator.wait_for_everyone()
        model, optimizer, lr_scheduler, params = self._prepared
        fmt = ckpt.save_training_files(tmp, accelerator, model, optimizer, lr_scheduler, params, self.stateful)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            state = {"format": fmt, "global_step": step, "fingerprint": self._fingerprint(),
                     "num_processes": accelerator.num_processes, "engine": ckpt.engine_name(accelerator),
                     **self._counters}
            ckpt.finish_checkpoint(root, tmp, step, state, self.config.checkpoints_total_limit)
        accelerator.wait_for_everyone()
        self._emit("on_checkpoint", step, root / f"checkpoint-{step}")

    # ---- the loop ------------------------------------------------------------------------
    def _loop(self, run: _Run) -> TrainResult:
        """Whole optimizer steps until ``max_steps``, epoch after epoch (a partial
        accumulation at the end of an epoch is dropped, so a step always sees
        ``gradient_accumulation_steps`` micro-batches and resume arithmetic holds)."""
        c, accelerator = self.config, run.accelerator
        accum = c.gradient_accumulation_steps
        steps_per_epoch = len(run.dataloader) // accum
        if steps_per_epoch == 0:
            raise ConfigError(
                f"gradient_accumulation_steps: {accum} micro-batches a step is more than the "
                f"{len(run.dataloader)} batches an epoch holds"
            )
        result = TrainResult(global_step=run.global_step, skipped_nonfinite=self._counters["nonfinite_skipped"])
        run.progress = tqdm(
            total=c.max_steps, initial=run.global_step,
            desc=getattr(self.method, "progress_name", f"train {c.method}"),
            disable=not (self.show_progress and accelerator.is_local_main_process), dynamic_ncols=True,
        )
        run.consecutive_nonfinite = self._counters["consecutive_nonfinite"]
        run.nonfinite_losses = torch.zeros((), device=accelerator.device)
        run.model.train()
        self._emit("on_loop_begin", self)
        run.step_start = time.perf_counter()
        while run.global_step < c.max_steps:
            epoch, offset = divmod(run.global_step, steps_per_epoch)
            batches = self._step_preview(run, self._epoch_batches(run, epoch, offset, steps_per_epoch))
            for micro, data in enumerate(batches):
                outcome = self._micro_step(run, data, micro % accum)
                if outcome is None:
                    continue
                run.global_step += 1
                self._end_step(run, outcome, result)
                if run.global_step >= c.max_steps:
                    break
        result.global_step = run.global_step
        return result

    def _epoch_batches(self, run: _Run, epoch: int, offset: int, steps_per_epoch: int) -> Iterator[Any]:
        """The micro-batches of ``epoch`` from optimizer step ``offset`` on (a resume skips
        the batches of the steps already done)."""
        accum = self.config.gradient_accumulation_steps
        run.sampler.set_epoch(epoch)
        if hasattr(run.dataloader, "set_epoch"):
            run.dataloader.set_epoch(epoch)
        if hasattr(self.dataset, "set_epoch"):  # per-epoch random crops and flips
            self.dataset.set_epoch(epoch)
        skip = offset * accum
        loader = run.accelerator.skip_first_batches(run.dataloader, skip) if skip else run.dataloader
        return itertools.islice(loader, steps_per_epoch * accum - skip)

    def _step_preview(self, run: _Run, batches: Iterator[Any]) -> Iterator[Any]:
        """The micro-batches, unchanged; a method whose loss needs a statistic of the whole
        optimizer step (Diffusion-KTO's reference point) has ``prepare_step(model, [(batch,
        seeds), ...])`` called with every micro-batch of the step before the first one runs
        (with gradient accumulation only: otherwise the step is one micro-batch)."""
        accum = self.config.gradient_accumulation_steps
        prepare = getattr(self.method, "prepare_step", None)
        if prepare is None or accum == 1:
            yield from batches
            return
        while step := list(itertools.islice(batches, accum)):
            if len(step) == accum:  # the loop drops a partial accumulation at an epoch's end
                full = [(data, self._pair_seeds(run, m)) for m, data in enumerate(step)
                        if not (isinstance(data, dict) and data.get("size", 1) == 0)]
                with run.accelerator.autocast():
                    prepare(run.model, full)
            # pulling the step ahead may have reached the loader's end, which accelerate reads
            # as "sync the gradients now": keep that for the step's last micro-batch only
            state = run.accelerator.gradient_state
            loader = state.active_dataloader if state.in_dataloader else None
            ended = loader is not None and bool(getattr(loader, "end_of_dataloader", False))
            for i, data in enumerate(step):
                if ended:
                    loader.end_of_dataloader = i == len(step) - 1
                yield data

    def _pair_seeds(self, run: _Run, micro: int) -> list[int]:
        """Seeds of this process's pairs: the global pair index counts across micro-batches
        and processes, so the split of a step's pairs does not change their draws."""
        c, acc = self.config, run.accelerator
        batch = c.per_device_train_batch_size
        return [pair_seed(c.seed, run.global_step, (micro * acc.num_processes + acc.process_index) * batch + i)
                for i in range(batch)]

    def _micro_step(self, run: _Run, data: Any, micro: int) -> _StepOutcome | None:
        """Loss and backward of one micro-batch; the optimizer step when the accumulation is
        complete (returns its outcome, else None)."""
        accelerator = run.accelerator
        seeds = self._pair_seeds(run, micro)
        self._emit("on_micro_batch", data)
        empty = isinstance(data, dict) and data.get("size", 1) == 0
        if empty and accelerator.num_processes > 1:
            # every process must join each gradient all-reduce: it cannot skip
            raise RuntimeError(
                "an empty batch (every pair unreadable) in multi-process training; "
                "use a dataset that substitutes unreadable pairs"
            )
        with accelerator.accumulate(run.model):
            if not empty:  # one process: an empty micro-batch adds no gradient
                with accelerator.autocast():
                    loss, metrics = self.method.compute_loss(run.model, data, seeds)
                # counted on the device: no host sync per micro-batch
                run.nonfinite_losses = run.nonfinite_losses + (~torch.isfinite(loss.detach().float())).sum()
                self._emit("before_backward")
                accelerator.backward(loss)
                self._emit("after_backward")
                run.micro_metrics.append(metrics)
            if not accelerator.sync_gradients:
                return None
            return self._optimizer_step(run)

    def _optimizer_step(self, run: _Run) -> _StepOutcome:
        """Clip, check finiteness on every process, step (or skip) and zero the gradients."""
        accelerator = run.accelerator
        self._emit("before_optimizer")
        grad_norm = self._clip(accelerator, run.params)
        loss_finite = self._losses_finite(accelerator, run.nonfinite_losses)
        run.nonfinite_losses = torch.zeros((), device=accelerator.device)
        grads_finite = grad_norm is None or math.isfinite(grad_norm)
        scaler = accelerator.scaler
        if loss_finite and (grads_finite or scaler is not None):
            # under fp16 the GradScaler skips a step whose gradients overflowed and lowers its
            # scale: that is its job, not ours
            run.optimizer.step()
            run.lr_scheduler.step()
        elif scaler is not None:
            scaler.update()  # a skipped step still closes the scaler's cycle
        run.optimizer.zero_grad(set_to_none=True)
        self._emit("after_optimizer")
        overflow = None
        if loss_finite and not grads_finite and scaler is not None and scaler.get_scale() >= 1.0:
            # an fp16 overflow with a finite loss is normal while the GradScaler finds its
            # scale; it counts once the scale is below 1 (a real blow-up)
            overflow = scaler.get_scale()
        return _StepOutcome(grad_norm, loss_finite, grads_finite, overflow)

    def _end_step(self, run: _Run, outcome: _StepOutcome, result: TrainResult) -> None:
        """After an optimizer step: the non-finite guard, logging, progress, checkpoint."""
        stop = self._guard_nonfinite(run, outcome, result)
        logs = self._step_logs(run, outcome, result)
        if stop:
            raise NonFiniteError(
                f"{run.consecutive_nonfinite} consecutive steps had a non-finite loss or "
                f"gradient (max_nonfinite_steps={self.config.max_nonfinite_steps}); stopping at step "
                f"{run.global_step}. Lower learning_rate or beta, or check the data."
            )
        run.progress.update(1)
        run.progress.set_postfix(
            {k.split("/")[-1]: f"{logs[k]:.3g}" for k in PROGRESS_KEYS if k in logs}, refresh=False
        )
        self._counters = {"nonfinite_skipped": result.skipped_nonfinite,
                          "consecutive_nonfinite": run.consecutive_nonfinite}
        self._emit("on_step_end", run.global_step, logs)
        if self._should_checkpoint(run.global_step):
            self._save_checkpoint(run.accelerator, run.checkpoint_root, run.global_step)

    def _guard_nonfinite(self, run: _Run, outcome: _StepOutcome, result: TrainResult) -> bool:
        """Count a skipped step; True when ``max_nonfinite_steps`` in a row were skipped
        (raised once the step is logged)."""
        c, step = self.config, run.global_step
        if outcome.finite:
            run.consecutive_nonfinite = 0
            return False
        result.skipped_nonfinite += 1
        if outcome.overflow_scale is not None:
            run.accelerator.print(f"step {step}: gradient overflow (fp16); the GradScaler skipped the "
                                  f"step and lowered its scale to {outcome.overflow_scale:g}")
            return False
        run.consecutive_nonfinite += 1
        what = "non-finite loss" if not outcome.loss_finite else "non-finite gradient"
        run.accelerator.print(f"step {step}: {what}; step skipped ({run.consecutive_nonfinite} in a row, "
                              f"max_nonfinite_steps={c.max_nonfinite_steps})")
        return run.consecutive_nonfinite >= c.max_nonfinite_steps

    def _step_logs(self, run: _Run, outcome: _StepOutcome, result: TrainResult) -> dict[str, float]:
        """Metrics of the step (mean over micro-batches and processes), written and returned."""
        c, accelerator, step = self.config, run.accelerator, run.global_step
        elapsed = time.perf_counter() - run.step_start
        run.step_start = time.perf_counter()
        logs = self._reduce_metrics(accelerator, run.micro_metrics)
        run.micro_metrics = []
        pairs = c.per_device_train_batch_size * c.gradient_accumulation_steps * accelerator.num_processes
        logs.update({
            "step": step,
            "grad_norm": float(outcome.grad_norm) if outcome.grad_norm is not None else float("nan"),
            "lr": run.lr_scheduler.get_last_lr()[0],
            "pairs_per_second": pairs / max(elapsed, 1e-9),
            "peak_memory_gb": peak_memory_gb(accelerator.device),
            "nonfinite_skipped": result.skipped_nonfinite,
        })
        result.history.append(logs)
        result.final_metrics = logs
        last = step == c.max_steps or run.consecutive_nonfinite >= c.max_nonfinite_steps
        if step % c.logging_steps == 0 or last:
            if run.metrics_fh is not None:
                run.metrics_fh.write(json.dumps(_jsonable(logs)) + "\n")
                run.metrics_fh.flush()
            if accelerator.trackers:
                accelerator.log({k: v for k, v in logs.items() if k != "step" and math.isfinite(v)}, step=step)
        return logs

    def _should_checkpoint(self, step: int) -> bool:
        c = self.config
        if not self.save_model:
            return False
        if c.checkpointing_steps and step % c.checkpointing_steps == 0:
            return True
        return step == c.max_steps and c.checkpointing_steps > 0

    def _clip(self, accelerator: Accelerator, params: list[nn.Parameter]) -> float | None:
        c = self.config
        if accelerator.distributed_type == DistributedType.DEEPSPEED:
            # the engine has clipped (at gradient_clipping = max_grad_norm, engines.check_engine)
            # and stepped inside accelerator.backward; accelerate returns its global norm
            norm = accelerator.clip_grad_norm_(params, c.max_grad_norm or 1.0)
            return None if norm is None else float(norm)
        if c.max_grad_norm > 0:
            norm = accelerator.clip_grad_norm_(params, c.max_grad_norm)
            return None if norm is None else float(norm)  # None: DeepSpeed clips inside its engine
        if accelerator.scaler is not None:
            accelerator.unscale_gradients()  # the true norm, and the scaler's inf check
        grads = [p.grad.detach().float().norm() for p in params if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    @staticmethod
    def _losses_finite(accelerator: Accelerator, nonfinite_losses: Tensor) -> bool:
        """True when every process's losses of this step were finite: all processes must
        agree, or skipping the step on one of them would make their weights diverge."""
        if accelerator.num_processes > 1:
            nonfinite_losses = accelerator.reduce(nonfinite_losses.float().reshape(1), reduction="sum")
        return float(nonfinite_losses.sum()) == 0

    @staticmethod
    def _reduce_metrics(accelerator: Accelerator, micro_metrics: list[dict[str, Tensor]]) -> dict[str, float]:
        """Mean over micro-batches and processes, ignoring NaN (an empty branch)."""
        if not micro_metrics:
            return {}
        keys = sorted(micro_metrics[0])
        stacked = torch.stack([torch.stack([m[k].float().detach() for k in keys]) for m in micro_metrics])
        stacked = stacked.to(accelerator.device)
        if accelerator.num_processes > 1:
            stacked = accelerator.gather(stacked)
        means = torch.nanmean(stacked, dim=0).cpu().tolist()
        return dict(zip(keys, means))


def truncate_metrics(path: Path, step: int) -> None:
    """Keep the lines of ``metrics.jsonl`` up to ``step``: a resumed run replays the steps
    after its checkpoint and logs them again. A line cut short by a kill is dropped too."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and isinstance(record.get("step"), int) and record["step"] <= step:
            kept.append(line)
    ckpt.atomic_write_text(path, "".join(f"{line}\n" for line in kept))


def _jsonable(metrics: dict[str, float]) -> dict[str, Any]:
    return {k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in metrics.items()}
