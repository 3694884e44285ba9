"""Which engine a launch asked for (one process, DDP, FSDP, DeepSpeed), what it means for
snpo's own settings, and how to run it on CPU ranks too.

``accelerate launch --config_file X.yaml`` does not hand the YAML to the training script: it
translates it into environment variables of every rank (checked by launching a script that
prints them, accelerate 1.15/1.16):

- FSDP: ``ACCELERATE_USE_FSDP=true``, ``FSDP_VERSION``, ``FSDP_STATE_DICT_TYPE``, ... (one
  ``FSDP_*`` per key of ``fsdp_config``);
- DeepSpeed: ``ACCELERATE_USE_DEEPSPEED=true``, ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS``,
  ``ACCELERATE_GRADIENT_CLIPPING``, ``ACCELERATE_DEEPSPEED_ZERO_STAGE`` (from
  ``deepspeed_config``), or ``ACCELERATE_DEEPSPEED_CONFIG_FILE`` (a DeepSpeed JSON);
- every launcher: ``ACCELERATE_MIXED_PRECISION``, ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``.

Two of these silently override what snpo asks accelerate for: ``Accelerator(
gradient_accumulation_steps=...)`` reads ``ACCELERATE_GRADIENT_ACCUMULATION_STEPS`` FIRST (the
environment wins over the argument), and DeepSpeed accumulates and clips inside its engine
with the values of its own config (an ``auto`` clipping becomes 1.0). A run whose accelerate
config says 256 micro-batches a step while snpo's says 1 would train with neither. So
:func:`check_engine` compares them and stops with one line, before any model loads; an
``auto`` (or absent) DeepSpeed value is filled from snpo's config (:func:`fill_engine_env`).

CPU ranks. accelerate selects FSDP and DeepSpeed only for accelerator devices: with
``Accelerator(cpu=True)`` an FSDP launch silently becomes DDP over gloo (``MULTI_CPU``), and
without it every rank trains alone. torch's FSDP2 (``fully_shard``) and DeepSpeed's CPU
accelerator (``DS_ACCELERATOR=cpu``, gloo) do run on CPU, so :func:`promoted_accelerator`
builds the gloo process group first and then lets accelerate set up FSDP or DeepSpeed on it,
exactly as on GPUs (the same ``prepare``, clipping, state-dict and checkpoint code). That is
how the FSDP and DeepSpeed paths are tested on this project's CPU-only machines.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from snpo.errors import ConfigError

ENGINES = ("single", "ddp", "fsdp", "deepspeed")
#: methods whose trained module is not one denoiser: not supported under sharding yet
SHARDING_UNSUPPORTED_METHODS = {"chats": "its two trainable networks (win and lose) share one "
                                         "DualDenoiser module that the FSDP/DeepSpeed save path does not rebuild"}


@dataclass(frozen=True)
class LaunchEngine:
    """What the launcher's environment asks for."""

    kind: str = "single"  # single | ddp | fsdp | deepspeed
    world_size: int = 1
    fsdp_version: int | None = None
    zero_stage: int | None = None
    #: accumulation / clipping the engine will use: a number, "auto", or None (not set)
    accumulation: int | str | None = None
    accumulation_source: str = ""
    clipping: float | str | None = None
    clipping_source: str = ""
    micro_batch: int | str | None = None  # DeepSpeed JSON: train_micro_batch_size_per_gpu
    train_batch: int | str | None = None  # DeepSpeed JSON: train_batch_size
    deepspeed_config_file: str | None = None

    @property
    def sharded(self) -> bool:
        return self.kind in ("fsdp", "deepspeed")


def _flag(env: Mapping[str, str], name: str) -> bool:
    return env.get(name, "false").strip().lower() in ("1", "true", "yes")


def _number(value: Any) -> Any:
    """A config value as int/float, ``"auto"`` kept, anything else returned as is."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text in ("auto", "none", ""):
            return "auto" if text == "auto" else None
        try:
            number = float(text)
        except ValueError:
            return value
        return int(number) if number.is_integer() and "." not in text else number
    return value


def _deepspeed_json(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).expanduser().read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"ACCELERATE_DEEPSPEED_CONFIG_FILE: cannot read the DeepSpeed config {path!r} ({exc})") from None
    if not isinstance(data, dict):
        raise ConfigError(f"ACCELERATE_DEEPSPEED_CONFIG_FILE: {path!r} is not a JSON object")
    return data


def launch_engine(env: Mapping[str, str] | None = None) -> LaunchEngine:
    """The engine of this launch, from the environment accelerate (or torchrun) set."""
    env = os.environ if env is None else env
    world = int(env.get("WORLD_SIZE", "1") or 1)
    accumulation: Any = None
    accumulation_source = ""
    if env.get("ACCELERATE_GRADIENT_ACCUMULATION_STEPS"):
        accumulation = _number(env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"])
        accumulation_source = "ACCELERATE_GRADIENT_ACCUMULATION_STEPS (the accelerate config's gradient_accumulation_steps)"
    if _flag(env, "ACCELERATE_USE_DEEPSPEED"):
        clipping: Any = _number(env["ACCELERATE_GRADIENT_CLIPPING"]) if env.get("ACCELERATE_GRADIENT_CLIPPING") else None
        clipping_source = "ACCELERATE_GRADIENT_CLIPPING (the accelerate config's gradient_clipping)" if clipping is not None else ""
        stage = _number(env.get("ACCELERATE_DEEPSPEED_ZERO_STAGE", "")) or None
        micro = train = None
        path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
        if path and path.lower() != "none":
            data = _deepspeed_json(path)
            source = f"the DeepSpeed config {path}"
            if "gradient_accumulation_steps" in data:  # accelerate takes the file's value
                accumulation, accumulation_source = _number(data["gradient_accumulation_steps"]), source
            # a file without gradient_clipping: DeepSpeed does not clip
            clipping = _number(data.get("gradient_clipping", 0.0))
            clipping_source = source
            zero = data.get("zero_optimization") or {}
            stage = _number(zero.get("stage", stage))
            micro = _number(data.get("train_micro_batch_size_per_gpu"))
            train = _number(data.get("train_batch_size"))
        return LaunchEngine("deepspeed", world, zero_stage=stage if isinstance(stage, int) else 2,
                            accumulation=accumulation, accumulation_source=accumulation_source,
                            clipping=clipping, clipping_source=clipping_source, micro_batch=micro,
                            train_batch=train, deepspeed_config_file=path or None)
    if _flag(env, "ACCELERATE_USE_FSDP"):
        return LaunchEngine("fsdp", world, fsdp_version=int(env.get("FSDP_VERSION", "1") or 1),
                            accumulation=accumulation, accumulation_source=accumulation_source)
    return LaunchEngine("ddp" if world > 1 else "single", world, accumulation=accumulation,
                        accumulation_source=accumulation_source)


def check_engine(config: Any, engine: LaunchEngine | None = None) -> LaunchEngine:
    """Refuse, in one line naming the snpo field, a launch whose engine would train with
    other settings than the snpo config's (or that snpo does not support); returns the
    engine. Needs no model and no deepspeed package."""
    engine = engine or launch_engine()
    accum = config.gradient_accumulation_steps
    if isinstance(engine.accumulation, int) and engine.accumulation != accum:
        raise ConfigError(
            f"gradient_accumulation_steps: the snpo config says {accum}, {engine.accumulation_source} says "
            f"{engine.accumulation}; set both to the same value (or 'auto' in a DeepSpeed config)"
        )
    if engine.kind == "fsdp" and engine.fsdp_version != 2:
        raise ConfigError(
            f"fsdp_version: the accelerate config asks for FSDP{engine.fsdp_version}; snpo trains and tests "
            "FSDP2 only: set fsdp_version: 2 in fsdp_config (configs/accelerate/fsdp.yaml)"
        )
    if engine.kind == "deepspeed":
        clip = engine.clipping
        if isinstance(clip, int | float) and not math.isclose(float(clip), config.max_grad_norm):
            raise ConfigError(
                f"max_grad_norm: the snpo config says {config.max_grad_norm:g}, {engine.clipping_source} says "
                f"{float(clip):g} (DeepSpeed clips inside its engine); set both to the same value "
                "(or gradient_clipping: auto)"
            )
        micro = engine.micro_batch
        if isinstance(micro, int) and micro != config.per_device_train_batch_size:
            raise ConfigError(
                f"per_device_train_batch_size: the snpo config says {config.per_device_train_batch_size}, "
                f"the DeepSpeed config {engine.deepspeed_config_file} says train_micro_batch_size_per_gpu "
                f"{micro}; set both to the same value (or auto)"
            )
        total = config.per_device_train_batch_size * accum * engine.world_size
        if isinstance(engine.train_batch, int) and engine.train_batch != total:
            raise ConfigError(
                f"per_device_train_batch_size: {config.per_device_train_batch_size} x gradient_accumulation_steps "
                f"{accum} x {engine.world_size} processes = {total} pairs a step, the DeepSpeed config "
                f"{engine.deepspeed_config_file} says train_batch_size {engine.train_batch}; make them agree (or auto)"
            )
    if engine.sharded and config.method in SHARDING_UNSUPPORTED_METHODS:
        raise ConfigError(
            f"method: {config.method} under {engine.kind} is not supported ({SHARDING_UNSUPPORTED_METHODS[config.method]}); "
            "train it with DDP (configs/accelerate/multi_gpu.yaml)"
        )
    optimizer = getattr(config, "optimizer", "adamw")
    if engine.sharded and optimizer != "adamw":
        why = {"fsdp": "it keeps plain tensors next to FSDP2's sharded DTensor parameters and stops",
               "deepspeed": "ZeRO hands it one flat partition per parameter group, so factored moments "
                            "and per-tensor scaling would become another optimizer"}[engine.kind]
        if optimizer == "adamw8bit":
            why = "its 8-bit states are not sharded by the engine"
        raise ConfigError(f"optimizer: {optimizer} is not supported under {engine.kind} ({why}); use adamw there, "
                          f"or {optimizer} with DDP / one GPU")
    if engine.kind == "fsdp" and getattr(config, "reference_offload", False):
        raise ConfigError("reference_offload: under FSDP the frozen reference is sharded like the policy "
                          "(1/N of it per process); offloading it as well is not supported")
    return engine


def fill_engine_env(config: Any, engine: LaunchEngine, env: dict[str, str] | None = None) -> None:
    """Make an ``auto`` (or unset) DeepSpeed accumulation and clipping snpo's values, so the
    engine accumulates and clips as the snpo config says (accelerate would fill an ``auto``
    clipping with 1.0). Call after :func:`check_engine`, before the Accelerator is built."""
    env = os.environ if env is None else env
    if engine.kind != "deepspeed":
        return
    if not isinstance(engine.accumulation, int):
        env["ACCELERATE_GRADIENT_ACCUMULATION_STEPS"] = str(config.gradient_accumulation_steps)
    if not isinstance(engine.clipping, int | float):
        env["ACCELERATE_GRADIENT_CLIPPING"] = str(float(config.max_grad_norm))


def promoted_accelerator(**kwargs: Any) -> Any:
    """An ``Accelerator`` running FSDP or DeepSpeed on CPU (gloo) ranks, which accelerate
    never selects itself (it falls back to DDP): initialise the gloo process group as for
    CPU ranks, then build the accelerator as on GPU ranks with the CPU as their device."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.utils import DistributedType

    if _flag(os.environ, "ACCELERATE_USE_DEEPSPEED"):
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    state = PartialState(cpu=True)  # gloo process group, one rank per process
    state._shared_state["device"] = torch.device("cpu")  # FSDP: compute device "cpu", not "cpu:0"
    PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU  # the FSDP/DeepSpeed branch
    try:
        return Accelerator(cpu=False, **kwargs)
    except BaseException:
        PartialState._shared_state["distributed_type"] = DistributedType.MULTI_CPU
        raise


def expected_distributed_type(engine: LaunchEngine) -> Any:
    from accelerate.utils import DistributedType

    return {"fsdp": DistributedType.FSDP, "deepspeed": DistributedType.DEEPSPEED}.get(engine.kind)


def shard_like_policy(accelerator: Any, module: Any) -> Any:
    """FSDP2: shard a frozen module (a full fine-tune's reference copy) the way accelerate
    shards the trained one (the same wrap policy, the same mesh), in place; each process then
    holds 1/N of its weights, all-gathered block by block in its forward."""
    from accelerate.utils.fsdp_utils import (
        fsdp2_prepare_auto_wrap_policy,
        get_module_children_bottom_up,
    )
    from torch.distributed.fsdp import FSDPModule, fully_shard

    plugin = accelerator.state.fsdp_plugin
    policy = fsdp2_prepare_auto_wrap_policy(plugin, module)
    if policy is not None:
        for child in get_module_children_bottom_up(module)[:-1]:
            if policy(child) and not isinstance(child, FSDPModule):
                fully_shard(child, reshard_after_forward=True)
    fully_shard(module, reshard_after_forward=True)
    return module
