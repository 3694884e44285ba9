"""``TrainConfig``: every knob of ``snpo train``, named as TRL and diffusers users expect."""

from __future__ import annotations

import dataclasses
import math
import os
import types
import typing
from dataclasses import dataclass

from snpo.objectives import ObjectiveConfig, validate_objective_args

LR_SCHEDULERS = (
    "constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
)
MIXED_PRECISION = ("no", "fp16", "bf16")
REPORT_TO = ("tensorboard", "wandb", "none", "all")
#: ``single``: one network trained with ``objective`` (every single-network method);
#: ``npo-negative``: Diff-NPO's negative model (dpo on reversed labels; merge it with
#: ``snpo merge``); ``chats``: CHATS' win and lose networks, trained together.
METHODS = ("single", "npo-negative", "chats")


@dataclass
class TrainConfig:
    """Configuration of one preference-alignment run (any objective, one network)."""

    # model and data
    model_name_or_path: str = ""  # a diffusers pipeline folder or hub id
    pretrained_vae_model_name_or_path: str | None = None  # e.g. an fp16-safe SDXL VAE
    revision: str | None = None
    variant: str | None = None  # e.g. "fp16" weight files
    dataset_name: str = ""
    dataset_split: str | None = None
    output_dir: str = "snpo-output"
    cache_dir: str | None = None  # a latent/text cache written by `snpo cache`
    cache_shard_size: int = 512  # pairs per cache shard file
    cache_batch_size: int = 8  # pairs encoded at once by `snpo cache`
    max_train_samples: int | None = None
    drop_ties: bool = True
    max_caption_chars: int | None = 2000  # longer captions are skipped as overlong_caption
    resolution: int = 512
    center_crop: bool = True
    random_flip: bool = True
    dataloader_num_workers: int = 0

    # method and objective
    method: str = "single"  # single | npo-negative | chats (the dual-model baselines)
    objective: str = "snpo"
    beta: float = 2000.0
    mix_lambda: float = 0.9
    mix_scale: float | None = None
    cfg_dropout: float = 0.1
    chats_lose_prompt_dropout: float = 0.5  # CHATS: share of pairs whose lose prompt is blanked

    # optimisation
    max_steps: int = 2000
    per_device_train_batch_size: int = 1
    gradient_accumulation_steps: int = 1
    learning_rate: float = 1e-8
    scale_lr: bool = False
    lr_scheduler: str = "constant_with_warmup"
    lr_warmup_steps: int = 0
    adam_beta1: float = 0.9
    adam_beta2: float = 0.999
    adam_weight_decay: float = 1e-2
    adam_epsilon: float = 1e-8
    max_grad_norm: float = 1.0
    max_nonfinite_steps: int = 5

    # model mode and precision
    lora_rank: int = 0
    mixed_precision: str = "no"
    upcast_vae: bool | None = None  # VAE in float32 under mixed precision; null = the family's rule
    gradient_checkpointing: bool = False
    allow_tf32: bool = False

    # speed options, all opt-in (measured side by side in BENCHMARKS.md)
    channels_last: bool = False  # NHWC denoiser weights and inputs
    torch_compile: bool = False  # torch.compile the denoiser (and a full fine-tune's reference)
    precompute_reference: bool = False  # reuse reference errors across runs of a sweep
    reference_errors_dir: str | None = None  # where they live; null = <cache_dir>/reference-errors

    # checkpoints, logging, reproducibility
    checkpointing_steps: int = 500
    checkpoints_total_limit: int | None = None
    resume_from_checkpoint: str | None = None
    logging_steps: int = 1
    report_to: str = "tensorboard"
    tracker_project_name: str = "snpo"
    seed: int = 0

    def validate(self) -> None:
        """One-line errors naming the field, the value and what is allowed."""
        _check_types(self)
        validate_objective_args(self.objective, self.beta, self.mix_lambda, self.mix_scale)
        checks = [
            ("cfg_dropout", 0 <= self.cfg_dropout < 1, "a probability in [0, 1)"),
            ("chats_lose_prompt_dropout", 0 <= self.chats_lose_prompt_dropout <= 1, "a probability in [0, 1]"),
            ("max_steps", self.max_steps >= 1, "an integer >= 1"),
            ("per_device_train_batch_size", self.per_device_train_batch_size >= 1, "an integer >= 1"),
            ("gradient_accumulation_steps", self.gradient_accumulation_steps >= 1, "an integer >= 1"),
            ("learning_rate", self.learning_rate > 0, "a number > 0"),
            ("lr_warmup_steps", self.lr_warmup_steps >= 0, "an integer >= 0"),
            ("max_grad_norm", self.max_grad_norm >= 0, "a number >= 0 (0 disables clipping)"),
            ("max_nonfinite_steps", self.max_nonfinite_steps >= 1, "an integer >= 1"),
            ("lora_rank", self.lora_rank >= 0, "an integer >= 0 (0 = full fine-tune)"),
            ("resolution", self.resolution >= 8 and self.resolution % 8 == 0, "a multiple of 8, >= 8"),
            ("checkpointing_steps", self.checkpointing_steps >= 0, "an integer >= 0 (0 = only at the end)"),
            ("logging_steps", self.logging_steps >= 1, "an integer >= 1"),
            ("dataloader_num_workers", self.dataloader_num_workers >= 0, "an integer >= 0"),
            ("cache_shard_size", self.cache_shard_size >= 1, "an integer >= 1"),
            ("cache_batch_size", self.cache_batch_size >= 1, "an integer >= 1"),
            ("adam_beta1", 0 <= self.adam_beta1 < 1, "a number in [0, 1)"),
            ("adam_beta2", 0 <= self.adam_beta2 < 1, "a number in [0, 1)"),
            ("adam_weight_decay", self.adam_weight_decay >= 0, "a number >= 0"),
            ("adam_epsilon", self.adam_epsilon > 0, "a number > 0"),
            # per-pair seeds and the data order are drawn from generators that take 32-bit seeds
            ("seed", 0 <= self.seed < 2**32, "an integer in [0, 2**32)"),
            ("tracker_project_name", bool(self.tracker_project_name.strip())
             and not set("/\\") & set(self.tracker_project_name), "a non-empty name without slashes"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ValueError(f"{name}: expected {allowed}, got {getattr(self, name)!r}")
        if self.checkpoints_total_limit is not None and self.checkpoints_total_limit < 1:
            raise ValueError(
                f"checkpoints_total_limit: expected an integer >= 1 or null, got {self.checkpoints_total_limit!r}"
            )
        if self.max_caption_chars is not None and self.max_caption_chars < 1:
            raise ValueError(f"max_caption_chars: expected an integer >= 1 or null, got {self.max_caption_chars!r}")
        if self.precompute_reference and not (self.reference_errors_dir or self.cache_dir):
            raise ValueError(
                "reference_errors_dir: precompute_reference needs a folder shared by the runs of a "
                "sweep (default <cache_dir>/reference-errors), got nothing"
            )
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"max_train_samples: expected an integer >= 1 or null, got {self.max_train_samples!r}")
        for name, value, allowed in [
            ("method", self.method, METHODS),
            ("lr_scheduler", self.lr_scheduler, LR_SCHEDULERS),
            ("mixed_precision", self.mixed_precision, MIXED_PRECISION),
            ("report_to", self.report_to, REPORT_TO),
        ]:
            if value not in allowed:
                raise ValueError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")

        self._validate_method()

    def _validate_method(self) -> None:
        if self.method == "npo-negative" and self.objective != "dpo":
            raise ValueError(
                f"objective: method npo-negative trains dpo on reversed labels (METHOD.md), "
                f"so objective must be dpo, got {self.objective!r}"
            )
        if self.method == "chats" and self.objective != "dpo":
            raise ValueError(
                f"objective: method chats has its own loss (its beta is `beta`); set objective "
                f"to dpo to say so, got {self.objective!r}"
            )
        if self.method != "single" and self.precompute_reference:
            raise ValueError(
                f"precompute_reference: stored reference errors assume one network on the "
                f"dataset's own labels (method single), got method {self.method!r}"
            )

    @property
    def objective_config(self) -> ObjectiveConfig:
        return ObjectiveConfig(self.objective, self.beta, self.mix_lambda, self.mix_scale)


def _type_problem(value: object, annotation: object) -> str | None:
    """What ``value`` should be when it does not match ``annotation`` (None when it does)."""
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(annotation)
        if value is None and type(None) in args:
            return None
        problems = [_type_problem(value, a) for a in args if a is not type(None)]
        if any(p is None for p in problems):
            return None
        return " or ".join(p for p in problems if p) + (" or null" if type(None) in args else "")
    if annotation is bool:
        return None if isinstance(value, bool) else "true or false"
    if annotation is int:
        return None if isinstance(value, int) and not isinstance(value, bool) else "an integer"
    if annotation is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return "a number"
        return None if math.isfinite(value) else "a finite number"
    if annotation is str:  # paths given as Path objects are fine
        return None if isinstance(value, str | os.PathLike) else "a string"
    return None


def _check_types(config: TrainConfig) -> None:
    """Types first, so that a config built in Python (not through ``load_config``) fails with
    the same one-line message instead of a TypeError deep inside training."""
    hints = typing.get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        expected = _type_problem(value, hints[f.name])
        if expected:
            raise ValueError(f"{f.name}: expected {expected}, got {value!r}")
