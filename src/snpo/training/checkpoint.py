"""Atomic, resumable checkpoints that hold nothing but safetensors and JSON.

Layout under ``output_dir/checkpoints/``::

    checkpoint-500/          a complete checkpoint:
        model.safetensors        trainable parameters (and buffers) of the trained network
        optimizer.safetensors    optimizer state: tensors, plus the rest as JSON metadata
        scheduler.safetensors    learning-rate schedule state (JSON metadata, no tensors)
        scaler.safetensors       GradScaler state (fp16 only)
        rng-<rank>.safetensors   global RNG states of each process (python, numpy, torch, cuda)
        extra-<rank>.json        per-process state of helpers (e.g. pairs skipped so far)
        trainer_state.json       step, counters, fingerprint; written last
    checkpoint-1000.tmp/     a write in progress: never read, removed on the next save
    checkpoint-250.deleting/ an old checkpoint being pruned: never read, removed on the next save
    latest                   text file naming the newest committed checkpoint

Atomicity. A checkpoint is written into ``checkpoint-N.tmp/``, ``trainer_state.json`` last;
the folder is renamed to ``checkpoint-N`` only when complete, and ``latest`` is replaced
atomically after that (the commit point). Old checkpoints are pruned only after the commit,
by renaming them to ``*.deleting`` first, so a half-deleted folder is never mistaken for a
checkpoint. A kill at any moment leaves ``latest`` on a complete, loadable checkpoint.

Trust. Nothing here is unpickled, ever: tensors go to safetensors, everything else (optimizer
hyper-parameters, schedule counters, RNG states) to JSON, with a tagged encoding that keeps
tuples, integer dict keys and numpy arrays exact (``encode_state``/``decode_state``). Files
that a checkpoint folder may also contain (``*.bin``, ``*.pkl``, ``*.pt``) are never opened.
Under FSDP (FSDP2) the same files hold FULL state dicts gathered to the main process on the
CPU (the optimizer state keyed by parameter name; ``engine: fsdp`` in ``trainer_state.json``),
read back by the main process and broadcast shard by shard. Under DeepSpeed the engine's
partitioned states are written by ``accelerator.save_state`` instead (``format: accelerate``)
and read back by accelerate, which uses ``torch.load(weights_only=True)``.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import shutil
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from snpo.errors import ConfigError
from snpo.files import atomic_write_text, fsync_path

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
FORMAT = "snpo-1"  # ``format`` in trainer_state.json: how the files of the folder are written
ACCELERATE_FORMAT = "accelerate"  # FSDP / DeepSpeed: written by accelerator.save_state
MODEL_FILE = "model.safetensors"
OPTIMIZER_FILE = "optimizer.safetensors"
SCHEDULER_FILE = "scheduler.safetensors"
SCALER_FILE = "scaler.safetensors"
STATE_KEY = "snpo_state"  # the safetensors metadata entry holding an object's JSON part


class CheckpointError(ConfigError):
    """A checkpoint that cannot be resumed from: a bad ``resume_from_checkpoint`` setting, so
    ``snpo`` prints the one-line message (naming the field) without a traceback."""


def rng_file(rank: int) -> str:
    return f"rng-{rank}.safetensors"


def extra_file(rank: int) -> str:
    return f"extra-{rank}.json"


# ---- file-system helpers ---------------------------------------------------------------
def _discard(path: Path) -> None:
    """Remove a checkpoint folder so that no reader ever sees it half deleted: rename it out
    of the ``checkpoint-N`` namespace first (atomic), then delete."""
    trash = path.with_name(path.name + ".deleting")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


# ---- finding checkpoints ---------------------------------------------------------------
def list_checkpoints(root: Path) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        match = CHECKPOINT_RE.match(child.name)
        if match and child.is_dir() and (child / STATE_FILE).is_file():
            found.append((int(match.group(1)), child))
    return sorted(found)


def resolve_checkpoint(root: Path, spec: str) -> Path | None:
    """``latest`` (or a path) -> a complete checkpoint folder; None when there is none yet.

    ``latest`` is the folder the ``latest`` pointer names when that folder is complete (the
    pointer is the commit point), else the newest complete folder.
    """
    if spec != "latest":
        path = Path(spec).expanduser()
        if not (path / STATE_FILE).is_file():
            path = root / spec
        if not (path / STATE_FILE).is_file():
            raise CheckpointError(f"resume_from_checkpoint: {spec!r} is not a complete checkpoint folder")
        return path
    pointer = root / "latest"
    if pointer.is_file():
        name = pointer.read_text().strip()
        candidate = root / name
        if CHECKPOINT_RE.match(name) and (candidate / STATE_FILE).is_file():
            return candidate
    complete = list_checkpoints(root)
    return complete[-1][1] if complete else None


# ---- writing -----------------------------------------------------------------------------
def begin_checkpoint(root: Path, step: int) -> Path:
    """Create the temporary folder a checkpoint is written into (main process only), after
    clearing what an interrupted save or prune left behind."""
    root.mkdir(parents=True, exist_ok=True)
    for stale in [*root.glob("checkpoint-*.tmp"), *root.glob("checkpoint-*.deleting")]:
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"checkpoint-{step}.tmp"
    tmp.mkdir()
    return tmp


def finish_checkpoint(root: Path, tmp: Path, step: int, state: dict[str, Any], total_limit: int | None) -> Path:
    """Write the trainer state, move the checkpoint into place, point ``latest`` at it
    (the commit), then prune to ``total_limit`` (never the new one)."""
    for child in tmp.iterdir():
        fsync_path(child)
    atomic_write_text(tmp / STATE_FILE, json.dumps(state, indent=2))
    fsync_path(tmp)
    final = root / f"checkpoint-{step}"
    if final.exists():  # the same step again, after resuming from an older checkpoint
        _discard(final)
    os.replace(tmp, final)
    fsync_path(root)
    atomic_write_text(root / "latest", final.name)
    fsync_path(root)
    if total_limit is not None:
        others = [path for _, path in list_checkpoints(root) if path != final]
        for old in others[: max(0, len(others) + 1 - total_limit)]:
            _discard(old)
    return final


def read_state(checkpoint: Path) -> dict[str, Any]:
    try:
        state = json.loads((checkpoint / STATE_FILE).read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"resume_from_checkpoint: cannot read {checkpoint / STATE_FILE}: {exc}") from None
    if not isinstance(state, dict) or "global_step" not in state:
        raise CheckpointError(f"resume_from_checkpoint: {checkpoint / STATE_FILE} is not a trainer state")
    return state


def check_fingerprint(saved: Mapping[str, Any], mine: Mapping[str, Any]) -> None:
    """Refuse a checkpoint written by another model, objective or batch layout (one line).

    Keys missing on either side are not compared (a checkpoint of an older snpo, or a check
    made before the model is loaded)."""
    from snpo.training.fingerprints import upgrade_resume_fingerprint

    saved = upgrade_resume_fingerprint(dict(saved))
    for key, value in mine.items():
        if key in saved and saved[key] != value:
            raise CheckpointError(
                f"resume_from_checkpoint: the checkpoint was written with {key}={saved[key]!r}, "
                f"this run has {key}={value!r}; resume with the same setting or start a new output_dir"
            )


# ---- plain-data encoding of states -----------------------------------------------------
def encode_state(obj: Any, tensors: dict[str, Tensor], path: str = "s") -> Any:
    """``obj`` as JSON-able data; its tensors are moved to ``tensors`` (named by their path).

    Tagged so that decoding is exact: ``{"tuple": [...]}``, ``{"dict": [[key, value], ...]}``
    (keys may be int, float, str, bool or None), ``{"tensor": name}``, ``{"ndarray": [...],
    "dtype": ...}``, ``{"float": "nan"|"inf"|"-inf"}``. Anything else is refused: a state that
    needs pickling to be saved cannot be loaded safely.
    """
    if obj is None or isinstance(obj, bool | int | str):
        return obj
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else {"float": repr(obj)}
    if isinstance(obj, Tensor):
        tensors[path] = obj.detach().to("cpu").contiguous()
        return {"tensor": path}
    if isinstance(obj, np.ndarray):
        return {"ndarray": obj.tolist(), "dtype": str(obj.dtype)}
    if isinstance(obj, np.generic):
        return encode_state(obj.item(), tensors, path)
    if isinstance(obj, list):
        return [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
    if isinstance(obj, tuple):
        return {"tuple": [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]}
    if isinstance(obj, Mapping):
        items = []
        for key, value in obj.items():
            if not (key is None or isinstance(key, bool | int | float | str)):
                raise TypeError(f"checkpoint: cannot save a state with a {type(key).__name__} key at {path}")
            items.append([key, encode_state(value, tensors, f"{path}.{key}")])
        return {"dict": items}
    raise TypeError(f"checkpoint: cannot save a {type(obj).__name__} at {path} as plain data")


def decode_state(data: Any, tensors: Mapping[str, Tensor]) -> Any:
    """The inverse of ``encode_state``."""
    if isinstance(data, list):
        return [decode_state(v, tensors) for v in data]
    if not isinstance(data, dict):
        return data
    if "tensor" in data:
        return tensors[data["tensor"]]
    if "tuple" in data:
        return tuple(decode_state(v, tensors) for v in data["tuple"])
    if "dict" in data:
        return {key: decode_state(value, tensors) for key, value in data["dict"]}
    if "ndarray" in data:
        return np.asarray(data["ndarray"], dtype=np.dtype(data["dtype"]))
    if "float" in data:
        return float(data["float"])
    raise ConfigError(f"checkpoint: unknown encoded value {sorted(data)}")


def save_object(path: Path, obj: Any) -> None:
    """One state object -> one safetensors file (tensors + the rest as JSON metadata)."""
    tensors: dict[str, Tensor] = {}
    encoded = encode_state(obj, tensors)
    seen: set[int] = set()
    for name, tensor in tensors.items():  # one tensor in several places (bitsandbytes' qmaps): copies
        if tensor.numel() and tensor.untyped_storage().data_ptr() in seen:
            tensors[name] = tensor.clone()
        seen.add(tensors[name].untyped_storage().data_ptr())
    save_file(tensors, str(path), metadata={STATE_KEY: json.dumps(encoded)})


def load_object(path: Path) -> Any:
    """Read what ``save_object`` wrote (safetensors only: no code runs while loading)."""
    with safe_open(str(path), framework="pt") as f:
        metadata = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (no __iter__)
    if STATE_KEY not in metadata:
        raise CheckpointError(f"resume_from_checkpoint: {path} holds no snpo state")
    return decode_state(json.loads(metadata[STATE_KEY]), tensors)


# ---- global RNG states -------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    """The global RNG states of this process. Training noise, timesteps, branch labels and
    data order do not use them (they come from per-pair seeds), but a user's model may
    (dropout), so they are saved and restored anyway."""
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": np.random.get_state(),
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = list(state["cuda"])
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ---- the model's trained tensors -----------------------------------------------------------
def trained_tensors(model: nn.Module, trainable: Iterable[nn.Parameter]) -> dict[str, Tensor]:
    """What training changes in ``model``: its trainable parameters and its buffers, by name.

    Frozen weights (the base model under LoRA, the encoders) are not saved: they are read
    again from ``model_name_or_path``, and the fingerprint's weights digest makes sure they
    are the same weights."""
    trainable = list(trainable)
    names = trained_tensors_names(model, trainable)
    if len(names) != len({id(p) for p in trainable}):
        raise RuntimeError("checkpoint: some trainable parameters are not part of the trained module")
    state = model.state_dict()
    keep = set(names) | {name for name, _ in model.named_buffers() if name in state}
    return {name: state[name].detach().to("cpu").contiguous() for name in sorted(keep)}


def load_trained_tensors(model: nn.Module, path: Path, trainable: Iterable[nn.Parameter]) -> None:
    """Load ``model.safetensors`` into ``model``; every trainable parameter must be there."""
    tensors = load_file(str(path))
    expected = set(trained_tensors_names(model, trainable))
    missing = sorted(expected - set(tensors))
    unexpected = sorted(set(tensors) - set(model.state_dict()))
    if missing or unexpected:
        detail = "; ".join(
            f"{len(names)} {what}, e.g. {names[0]}"
            for what, names in (("missing", missing), ("unexpected", unexpected)) if names
        )
        raise CheckpointError(f"resume_from_checkpoint: {path} does not match this model ({detail})")
    model.load_state_dict(tensors, strict=False)


def trained_tensors_names(model: nn.Module, trainable: Iterable[nn.Parameter]) -> list[str]:
    ids = {id(p) for p in trainable}
    return [name for name, p in model.named_parameters() if id(p) in ids]


def weights_digest(module: nn.Module, sample: int = 1024) -> str:
    """A cheap identity of a network's weights: names, shapes, dtypes and ``sample`` evenly
    spaced values of every tensor (float64), hashed. Tells two checkpoints of one
    architecture apart without reading every weight of a multi-GB model."""
    h = hashlib.blake2b(digest_size=12)
    for name, tensor in sorted(module.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        stride = max(1, flat.numel() // sample)
        values = flat[::stride][:sample].to("cpu", torch.float64).numpy()
        h.update(f"{name}:{tuple(tensor.shape)}:{tensor.dtype}".encode())
        h.update(values.tobytes())
    return h.hexdigest()


# ---- extra per-process state -------------------------------------------------------------
def save_extra(folder: Path, rank: int, states: list[Any]) -> None:
    """Per-process JSON state of helpers with ``state_dict``/``load_state_dict``."""
    (folder / extra_file(rank)).write_text(json.dumps([s.state_dict() for s in states]))


def load_extra(folder: Path, rank: int, states: list[Any]) -> None:
    path = folder / extra_file(rank)
    if not states or not path.is_file():
        return
    saved = json.loads(path.read_text())
    for target, value in zip(states, saved):
        target.load_state_dict(value)


# ---- whole training states -----------------------------------------------------------------
@contextmanager
def deepspeed_loads_weights_only() -> Iterator[None]:
    """DeepSpeed's checkpoint engine reads its partition files with
    ``torch.load(weights_only=False)`` (deepspeed 0.19, ``TorchCheckpointEngine.load``), which
    would unpickle whatever a checkpoint folder holds; for the duration of a resume it reads
    them with ``weights_only=True`` (tensors and plain containers only)."""
    try:
        from deepspeed.runtime.checkpoint_engine import torch_checkpoint_engine as engine
        from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
        from deepspeed.runtime.zero.config import ZeroStageEnum
        from deepspeed.utils.tensor_fragment import fragment_address
    except ImportError:
        yield
        return
    original = engine.TorchCheckpointEngine.load
    # the only classes DeepSpeed's optimizer states hold (found with
    # torch.serialization.get_unsafe_globals_in_checkpoint on ZeRO-2/3 checkpoints): plain
    # data, allowed by name; anything else stops the resume
    allowed = [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]

    def load(self: Any, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(allowed):
            return torch.load(path, map_location=map_location, weights_only=True)

    engine.TorchCheckpointEngine.load = load
    try:
        yield
    finally:
        engine.TorchCheckpointEngine.load = original


def _sharded(accelerator: Any) -> bool:
    """DeepSpeed: its engine's states are written by ``accelerator.save_state``."""
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.DEEPSPEED


def _fsdp(accelerator: Any) -> bool:
    from accelerate.utils import DistributedType

    return accelerator.distributed_type == DistributedType.FSDP


def engine_name(accelerator: Any) -> str:
    """``fsdp``, ``deepspeed`` or ``ddp`` (one process too): the layout of a checkpoint's
    optimizer state (FSDP: by parameter name), recorded in ``trainer_state.json``."""
    return "fsdp" if _fsdp(accelerator) else "deepspeed" if _sharded(accelerator) else "ddp"


def _inner_optimizer(optimizer: Any) -> Any:
    return getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer


def _fsdp_options(**kwargs: Any) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def save_fsdp_states(folder: Path, accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """FSDP2: the trained tensors and the optimizer state as FULL state dicts (keyed by
    parameter name), gathered to the main process only and on the CPU (``cpu_offload``), so
    no process ever holds a second full copy on its device; written as safetensors like a
    DDP checkpoint. Every process must call it (the gathers are collective)."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = _fsdp_options(cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, _inner_optimizer(optimizer), options=options)
    if not accelerator.is_main_process:
        return
    keep = {name for name, p in model.named_parameters() if p.requires_grad}
    keep |= {name for name, _ in model.named_buffers()}
    tensors = {k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if k in keep}
    save_file(tensors, str(folder / MODEL_FILE), metadata={"format": "pt", "layout": "fsdp-full"})
    save_object(folder / OPTIMIZER_FILE, optim_state)
    save_object(folder / SCHEDULER_FILE, scheduler.state_dict())
    if accelerator.scaler is not None:
        save_object(folder / SCALER_FILE, accelerator.scaler.state_dict())


def load_fsdp_states(folder: Path, accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any) -> None:
    """The inverse of :func:`save_fsdp_states`: the main process reads the files and
    broadcasts them, each process keeping its own shards (``broadcast_from_rank0``)."""
    import torch.distributed as dist
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    main = accelerator.is_main_process
    problem = [None]
    model_state: dict[str, Tensor] = {}
    if main:
        try:
            model_state = load_file(str(folder / MODEL_FILE))
            expected = {name for name, p in model.named_parameters() if p.requires_grad}
            missing = sorted(expected - set(model_state))
            if missing:
                problem[0] = f"{folder / MODEL_FILE} does not match this model ({len(missing)} missing, e.g. {missing[0]})"
        except Exception as exc:  # every process must hear of it, or the others wait forever
            problem[0] = f"{folder / MODEL_FILE} cannot be loaded ({type(exc).__name__}: {exc})"
    if dist.is_initialized():
        dist.broadcast_object_list(problem, src=0)  # a message between ranks, not a file
    if problem[0]:
        raise CheckpointError(f"resume_from_checkpoint: {problem[0]}")
    set_model_state_dict(model, model_state, options=_fsdp_options(broadcast_from_rank0=True, strict=False))
    optim_state = load_object(folder / OPTIMIZER_FILE) if main else {}
    set_optimizer_state_dict(model, _inner_optimizer(optimizer), optim_state,
                             options=_fsdp_options(broadcast_from_rank0=True))
    scheduler.load_state_dict(load_object(folder / SCHEDULER_FILE))
    if accelerator.scaler is not None and (folder / SCALER_FILE).is_file():
        accelerator.scaler.load_state_dict(load_object(folder / SCALER_FILE))


def save_training_files(
    folder: Path, accelerator: Any, model: nn.Module, optimizer: Any, scheduler: Any,
    trainable: list[nn.Parameter], stateful: list[Any],
) -> str:
    """Write this process's share of a checkpoint into ``folder``; returns the format.

    Every process calls it (the model, optimizer and scheduler are written by the main
    process; each process writes its own RNG and helper states)."""
    rank = accelerator.process_index
    if _sharded(accelerator):
        # DeepSpeed's partitioned states: only accelerate (and the engine) know how to gather them
        accelerator.save_state(str(folder), safe_serialization=True)
        fmt = ACCELERATE_FORMAT
    elif _fsdp(accelerator):
        save_fsdp_states(folder, accelerator, model, optimizer, scheduler)
        save_object(folder / rng_file(rank), rng_state())
        fmt = FORMAT
    else:
        if accelerator.is_main_process:
            unwrapped = accelerator.unwrap_model(model)
            save_file(trained_tensors(unwrapped, trainable), str(folder / MODEL_FILE), metadata={"format": "pt"})
            save_object(folder / OPTIMIZER_FILE, optimizer.state_dict())
            save_object(folder / SCHEDULER_FILE, scheduler.state_dict())
            if accelerator.scaler is not None:
                save_object(folder / SCALER_FILE, accelerator.scaler.state_dict())
        save_object(folder / rng_file(rank), rng_state())
        fmt = FORMAT
    save_extra(folder, rank, stateful)
    return fmt


def load_training_files(
    folder: Path, state: Mapping[str, Any], accelerator: Any, model: nn.Module, optimizer: Any,
    scheduler: Any, trainable: list[nn.Parameter], stateful: list[Any],
) -> None:
    """Restore what ``save_training_files`` wrote, on every process."""
    fmt = state.get("format")
    if fmt == ACCELERATE_FORMAT:
        if not _sharded(accelerator):
            raise CheckpointError(
                f"resume_from_checkpoint: {folder} was written under DeepSpeed; resume it with the same launcher"
            )
        with deepspeed_loads_weights_only():
            accelerator.load_state(str(folder))  # accelerate reads with torch.load(weights_only=True)
    elif fmt == FORMAT:
        if _sharded(accelerator):
            raise CheckpointError(
                f"resume_from_checkpoint: {folder} was written without DeepSpeed; resume it the same way"
            )
        written = state.get("engine", "ddp")
        if (written == "fsdp") != _fsdp(accelerator):
            raise CheckpointError(
                f"resume_from_checkpoint: {folder} was written under {written}, this run is "
                f"{engine_name(accelerator)}; resume it with the same launcher and accelerate config"
            )
        try:
            if _fsdp(accelerator):
                load_fsdp_states(folder, accelerator, model, optimizer, scheduler)
            else:
                load_trained_tensors(accelerator.unwrap_model(model), folder / MODEL_FILE, trainable)
                optimizer.load_state_dict(load_object(folder / OPTIMIZER_FILE))
                scheduler.load_state_dict(load_object(folder / SCHEDULER_FILE))
                if accelerator.scaler is not None and (folder / SCALER_FILE).is_file():
                    accelerator.scaler.load_state_dict(load_object(folder / SCALER_FILE))
            rng = folder / rng_file(accelerator.process_index)
            if rng.is_file():
                set_rng_state(load_object(rng))
        except CheckpointError:
            raise
        except Exception as exc:  # a damaged file (disk, copy): one line, and what to do instead
            older = [p.name for _, p in list_checkpoints(folder.parent) if p != folder]
            hint = f"; resume from an older one ({', '.join(older)})" if older else ""
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            raise CheckpointError(
                f"resume_from_checkpoint: {folder} cannot be loaded ({type(exc).__name__}: {first}){hint}"
            ) from exc
    else:
        raise CheckpointError(
            f"resume_from_checkpoint: {folder} has no snpo checkpoint format (an older snpo pickled its "
            "optimizer state); it is not loaded: start a new output_dir"
        )
    load_extra(folder, accelerator.process_index, stateful)
