"""The training loop, on accelerate: one loop for every backbone and objective.

The trainer owns the optimizer, the learning-rate schedule, gradient accumulation,
clipping, non-finite guards, logging, checkpoints and resume. It calls
``method.compute_loss(model, batch, pair_seeds)`` and knows neither the model family nor the
objective's math.

Reproducibility: every pair of every step gets its own seed, derived from
``(seed, step, global pair index)``, from which its noise, timestep and branch label are
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
from typing import Any, Protocol

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.state import AcceleratorState
from accelerate.utils import DistributedType, set_seed
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Sampler
from tqdm.auto import tqdm

from snpo.backbones.base import Backbone
from snpo.configuration import config_to_dict
from snpo.training import checkpoint as ckpt
from snpo.training.config import TrainConfig

PROGRESS_KEYS = ("loss", "rewards/accuracies", "rewards/margins", "logratio/chosen")


class Method(Protocol):
    """What the trainer needs from a method (see ``snpo.methods``)."""

    def compute_loss(
        self, model: nn.Module, batch: dict[str, Any], pair_seeds: list[int]
    ) -> tuple[Tensor, dict[str, Tensor]]: ...


class NonFiniteError(RuntimeError):
    """Too many consecutive steps with a non-finite loss or gradient."""


def pair_seed(seed: int, step: int, index: int) -> int:
    """A well-mixed 63-bit seed for pair ``index`` of optimizer step ``step``."""
    return int(np.random.SeedSequence([seed, step, index]).generate_state(2, np.uint64)[0] >> np.uint64(1))


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
        on_batch: Callable[[dict[str, Any]], None] | None = None,
        on_train_end: Callable[[Accelerator], None] | None = None,
        stateful: list[Any] | None = None,
    ) -> None:
        """``sampler`` (default: ``EpochShuffleSampler``) must have ``set_epoch`` and depend
        only on (seed, epoch), so every process sees the same order. ``on_batch(batch)`` sees
        every micro-batch on every process before the loss (e.g. to count skipped pairs);
        ``on_train_end(accelerator)`` runs on every process after the last step, before the
        model is saved (e.g. to gather counts from all processes). ``stateful`` objects
        (``state_dict()`` -> JSON-able, ``load_state_dict``) are saved per process in every
        checkpoint and restored on resume (e.g. the pairs skipped so far)."""
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
        self.on_batch = on_batch
        self.on_train_end = on_train_end
        self.stateful = list(stateful or [])
        # non-finite step counters, saved in checkpoints so a resumed run counts on
        self._counters = {"nonfinite_skipped": 0, "consecutive_nonfinite": 0}

    # ------------------------------------------------------------------------------------
    def _make_accelerator(self) -> Accelerator:
        c = self.config
        # a new run in the same process may change the precision: reset the per-run state
        # (the process group of a multi-process run, PartialState, is kept)
        AcceleratorState._reset_state()
        log_with = None
        if self.write_logs and c.report_to != "none":
            log_with = ["tensorboard", "wandb"] if c.report_to == "all" else [c.report_to]
        return Accelerator(
            cpu=cpu_only_launch(),
            gradient_accumulation_steps=c.gradient_accumulation_steps,
            mixed_precision=c.mixed_precision,
            log_with=log_with,
            project_dir=c.output_dir,
        )

    def _make_optimizer(self, params: list[nn.Parameter], world: int) -> torch.optim.Optimizer:
        c = self.config
        lr = c.learning_rate
        if c.scale_lr:  # Diffusion-DPO: a per-pair rate times the effective batch
            lr *= c.per_device_train_batch_size * c.gradient_accumulation_steps * world
        kwargs: dict[str, Any] = dict(lr=lr, betas=(c.adam_beta1, c.adam_beta2),
                                      weight_decay=c.adam_weight_decay, eps=c.adam_epsilon)
        # fused AdamW: 5x faster than the default on CPU for LoRA, 3.6x for a full UNet
        # (BENCHMARKS.md); devices without a fused kernel take the default implementation
        try:
            return torch.optim.AdamW(params, fused=True, **kwargs)
        except (RuntimeError, ValueError):
            return torch.optim.AdamW(params, **kwargs)

    def train(self) -> TrainResult:
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
        dataloader = DataLoader(
            self.dataset, batch_size=c.per_device_train_batch_size, sampler=sampler,
            collate_fn=self.collate_fn, drop_last=True, num_workers=c.dataloader_num_workers,
        )
        if accelerator.distributed_type == DistributedType.FSDP and c.lora_rank > 0:
            raise ValueError("lora_rank: FSDP shards full fine-tunes (lora_rank 0); train LoRA with DDP "
                             "(configs/accelerate/multi_gpu.yaml)")
        model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
            self.model, optimizer, dataloader, lr_scheduler
        )
        if len(dataloader) == 0:
            raise ValueError(
                f"per_device_train_batch_size: {c.per_device_train_batch_size} x {world} processes "
                f"is more than the {len(self.dataset)} training pairs"
            )

        checkpoint_root = output_dir / "checkpoints"
        global_step = 0
        self._counters = {"nonfinite_skipped": 0, "consecutive_nonfinite": 0}
        self._prepared = (model, optimizer, lr_scheduler, params)
        if c.resume_from_checkpoint:
            found = ckpt.resolve_checkpoint(checkpoint_root, c.resume_from_checkpoint)
            if found is None:
                accelerator.print(f"resume_from_checkpoint: no checkpoint in {checkpoint_root}; starting fresh")
            else:
                state = ckpt.read_state(found)
                self._check_resumable(state)
                ckpt.load_training_files(found, state, accelerator, model, optimizer, lr_scheduler, params,
                                         self.stateful)
                global_step = int(state["global_step"])
                for key in self._counters:
                    self._counters[key] = int(state.get(key, 0))
                accelerator.print(f"resumed from {found} at step {global_step}")

        metrics_file = output_dir / "metrics.jsonl" if self.write_logs else None
        if c.resume_from_checkpoint and metrics_file is not None and accelerator.is_main_process:
            truncate_metrics(metrics_file, global_step)  # steps after the checkpoint are replayed
        if self.write_logs and accelerator.is_main_process and c.report_to != "none":
            tracker_config = {k: v for k, v in config_to_dict(c).items() if v is not None}
            # a resumed run replays the steps after its checkpoint: drop their old events
            init_kwargs = {"tensorboard": {"purge_step": global_step + 1}} if global_step else {}
            accelerator.init_trackers(c.tracker_project_name, config=tracker_config, init_kwargs=init_kwargs)

        result = self._loop(
            accelerator, model, optimizer, lr_scheduler, dataloader, sampler, params,
            global_step, checkpoint_root, metrics_file,
        )
        if self.on_train_end is not None:
            self.on_train_end(accelerator)
        accelerator.wait_for_everyone()
        unwrapped = self._gathered_model(accelerator, model) if self.save_model else None
        if self.save_model and accelerator.is_main_process:
            # a method with several networks (CHATS) saves them its own way
            save = getattr(self.method, "save_trained", None)
            files = save(output_dir, unwrapped) if save else self.backbone.save_trained(output_dir, unwrapped)
            if self.model_card is not None:
                self.model_card(output_dir, {"final_metrics": result.final_metrics, "files": files,
                                             "global_step": result.global_step,
                                             "data": self.data_report() if self.data_report else None})
        result.output_dir = output_dir
        accelerator.end_training()
        return result

    def _gathered_model(self, accelerator: Accelerator, model: nn.Module) -> nn.Module:
        """The trained denoiser with full weights on the main process. Under FSDP the
        parameters are sharded: gather a full state dict (every process takes part) into a
        fresh copy built from the model's config."""
        unwrapped = accelerator.unwrap_model(model)
        if accelerator.distributed_type != DistributedType.FSDP:
            return unwrapped
        state = accelerator.get_state_dict(model)
        if not accelerator.is_main_process:
            return unwrapped
        full = type(unwrapped).from_config(unwrapped.config)
        full.load_state_dict(state)
        return full

    def _check_resumable(self, state: dict[str, Any]) -> None:
        """Refuse a checkpoint written by another model, objective or batch layout."""
        ckpt.check_fingerprint(state.get("fingerprint", {}), self._fingerprint())

    def _fingerprint(self) -> dict[str, Any]:
        """What a resumed run must share with the run that wrote the checkpoint: the model
        (path, family and a digest of its starting weights), the objective, and the batch
        layout (per-pair seeds and the data order depend on it)."""
        return {
            **ckpt.config_fingerprint(self.config), "family": self.backbone.family,
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
                     "num_processes": accelerator.num_processes, **self._counters}
            ckpt.finish_checkpoint(root, tmp, step, state, self.config.checkpoints_total_limit)
        accelerator.wait_for_everyone()

    # ------------------------------------------------------------------------------------
    def _loop(
        self, accelerator: Accelerator, model: nn.Module, optimizer, lr_scheduler, dataloader,
        sampler: EpochShuffleSampler, params: list[nn.Parameter], global_step: int,
        checkpoint_root: Path, metrics_file: Path | None,
    ) -> TrainResult:
        c = self.config
        world, rank = accelerator.num_processes, accelerator.process_index
        batch = c.per_device_train_batch_size
        accum = c.gradient_accumulation_steps
        steps_per_epoch = len(dataloader) // accum
        if steps_per_epoch == 0:
            raise ValueError(
                f"gradient_accumulation_steps: {accum} micro-batches a step is more than the "
                f"{len(dataloader)} batches an epoch holds"
            )
        result = TrainResult(global_step=global_step, skipped_nonfinite=self._counters["nonfinite_skipped"])
        progress = tqdm(
            total=c.max_steps, initial=global_step, desc=getattr(self.method, "progress_name", f"train {c.objective}"),
            disable=not (self.show_progress and accelerator.is_local_main_process), dynamic_ncols=True,
        )
        # closed in the `finally` below; a context manager would not cover the early raise paths
        metrics_fh = (
            open(metrics_file, "a")  # noqa: SIM115
            if (metrics_file and accelerator.is_main_process) else None
        )
        consecutive_nonfinite = self._counters["consecutive_nonfinite"]
        nonfinite_losses = torch.zeros((), device=accelerator.device)
        model.train()
        step_start = time.perf_counter()
        try:
            while global_step < c.max_steps:
                epoch, offset = divmod(global_step, steps_per_epoch)
                sampler.set_epoch(epoch)
                if hasattr(dataloader, "set_epoch"):
                    dataloader.set_epoch(epoch)
                if hasattr(self.dataset, "set_epoch"):  # per-epoch random crops and flips
                    self.dataset.set_epoch(epoch)
                skip = offset * accum
                epoch_loader = accelerator.skip_first_batches(dataloader, skip) if skip else dataloader
                micro_metrics: list[dict[str, Tensor]] = []
                micro = 0
                # Whole steps only: a partial accumulation at the end of an epoch is dropped,
                # so a step always sees `accum` micro-batches and resume arithmetic holds.
                for data in itertools.islice(epoch_loader, steps_per_epoch * accum - skip):
                    seeds = [
                        pair_seed(c.seed, global_step, (micro * world + rank) * batch + i)
                        for i in range(batch)
                    ]
                    if self.on_batch is not None:
                        self.on_batch(data)
                    empty = isinstance(data, dict) and data.get("size", 1) == 0
                    if empty and world > 1:
                        # every process must join each gradient all-reduce: it cannot skip
                        raise RuntimeError(
                            "an empty batch (every pair unreadable) in multi-process training; "
                            "use a dataset that substitutes unreadable pairs"
                        )
                    with accelerator.accumulate(model):
                        if not empty:  # one process: an empty micro-batch adds no gradient
                            with accelerator.autocast():
                                loss, metrics = self.method.compute_loss(model, data, seeds)
                            # counted on the device: no host sync per micro-batch
                            nonfinite_losses = nonfinite_losses + (~torch.isfinite(loss.detach().float())).sum()
                            accelerator.backward(loss)
                            micro_metrics.append(metrics)
                        grad_norm = None
                        if accelerator.sync_gradients:
                            grad_norm = self._clip(accelerator, params)
                            loss_finite = self._losses_finite(accelerator, nonfinite_losses)
                            nonfinite_losses = torch.zeros((), device=accelerator.device)
                            grads_finite = grad_norm is None or math.isfinite(grad_norm)
                            scaler = accelerator.scaler
                            finite = loss_finite and grads_finite
                            if loss_finite and (grads_finite or scaler is not None):
                                # under fp16 the GradScaler skips a step whose gradients
                                # overflowed and lowers its scale: that is its job, not ours
                                optimizer.step()
                                lr_scheduler.step()
                            elif scaler is not None:
                                scaler.update()  # a skipped step still closes the scaler's cycle
                            optimizer.zero_grad(set_to_none=True)
                    micro += 1
                    if not accelerator.sync_gradients:
                        continue
                    # ---- one optimizer step done ---------------------------------------
                    global_step += 1
                    micro = 0
                    stop = False
                    if finite:
                        consecutive_nonfinite = 0
                    else:
                        result.skipped_nonfinite += 1
                        # an fp16 overflow with a finite loss is normal while the GradScaler
                        # finds its scale; it counts once the scale is below 1 (a real blow-up)
                        overflow = loss_finite and scaler is not None and scaler.get_scale() >= 1.0
                        if not overflow:
                            consecutive_nonfinite += 1
                        if overflow:
                            accelerator.print(f"step {global_step}: gradient overflow (fp16); the GradScaler "
                                              f"skipped the step and lowered its scale to {scaler.get_scale():g}")
                        else:
                            what = "non-finite loss" if not loss_finite else "non-finite gradient"
                            accelerator.print(f"step {global_step}: {what}; step skipped ({consecutive_nonfinite} "
                                              f"in a row, max_nonfinite_steps={c.max_nonfinite_steps})")
                        stop = consecutive_nonfinite >= c.max_nonfinite_steps  # raised once logged
                    elapsed = time.perf_counter() - step_start
                    step_start = time.perf_counter()
                    logged = self._reduce_metrics(accelerator, micro_metrics)
                    micro_metrics = []
                    logged.update({
                        "step": global_step,
                        "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                        "lr": lr_scheduler.get_last_lr()[0],
                        "pairs_per_second": batch * accum * world / max(elapsed, 1e-9),
                        "peak_memory_gb": peak_memory_gb(accelerator.device),
                        "nonfinite_skipped": result.skipped_nonfinite,
                    })
                    result.history.append(logged)
                    result.final_metrics = logged
                    if global_step % c.logging_steps == 0 or global_step == c.max_steps or stop:
                        if metrics_fh is not None:
                            metrics_fh.write(json.dumps(_jsonable(logged)) + "\n")
                            metrics_fh.flush()
                        if accelerator.trackers:
                            accelerator.log({k: v for k, v in logged.items() if k != "step" and math.isfinite(v)},
                                            step=global_step)
                    if stop:
                        raise NonFiniteError(
                            f"{consecutive_nonfinite} consecutive steps had a non-finite loss or "
                            f"gradient (max_nonfinite_steps={c.max_nonfinite_steps}); stopping at step "
                            f"{global_step}. Lower learning_rate or beta, or check the data."
                        )
                    progress.update(1)
                    progress.set_postfix(
                        {k.split("/")[-1]: f"{logged[k]:.3g}" for k in PROGRESS_KEYS if k in logged}, refresh=False
                    )
                    self._counters = {"nonfinite_skipped": result.skipped_nonfinite,
                                      "consecutive_nonfinite": consecutive_nonfinite}
                    if self._should_checkpoint(global_step):
                        self._save_checkpoint(accelerator, checkpoint_root, global_step)
                    if global_step >= c.max_steps:
                        break
        finally:
            progress.close()
            if metrics_fh is not None:
                metrics_fh.close()
        result.global_step = global_step
        return result

    def _should_checkpoint(self, step: int) -> bool:
        c = self.config
        if not self.save_model:
            return False
        if c.checkpointing_steps and step % c.checkpointing_steps == 0:
            return True
        return step == c.max_steps and c.checkpointing_steps > 0

    def _clip(self, accelerator: Accelerator, params: list[nn.Parameter]) -> float | None:
        c = self.config
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
