"""Opt-in speed options of ``TrainConfig`` and where they take effect.

- ``channels_last`` and ``torch_compile``: flags on the backbone, applied by
  ``Backbone.prepare_for_training`` (after LoRA adapters are added) to the denoiser and to a
  full fine-tune's reference copy.
- ``precompute_reference``: a ``ReferenceErrorStore`` on the method, under
  ``reference_errors_dir`` (default ``<cache_dir>/reference-errors``), in a folder named by
  :func:`reference_fingerprint` (see ``snpo.methods.reference_errors`` for when reuse is exact).

What each one buys, measured side by side, is in BENCHMARKS.md (``snpo bench``).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from snpo.configuration import config_to_dict
from snpo.training.config import TrainConfig

#: TrainConfig fields that cannot change the reference errors of a step: runs differing only
#: in these share stored reference errors. Every other field (and any field added later)
#: separates stores, which is the safe default.
REUSABLE_ACROSS = frozenset({
    "objective", "beta", "mix_lambda", "mix_scale",
    "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon",
    "max_grad_norm", "max_nonfinite_steps", "max_steps",
    "output_dir", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "logging_steps", "report_to", "tracker_project_name",
    "dataloader_num_workers", "cache_shard_size", "cache_batch_size",
    "precompute_reference", "reference_errors_dir",
})
STORE_VERSION = 1


def reference_errors_root(config: TrainConfig) -> Path:
    if config.reference_errors_dir:
        return Path(config.reference_errors_dir)
    if not config.cache_dir:
        raise ValueError("reference_errors_dir: expected a folder (or a cache_dir), got nothing")
    return Path(config.cache_dir) / "reference-errors"


def reference_fingerprint(config: TrainConfig) -> dict[str, Any]:
    """Everything the reference errors of a training step depend on."""
    from snpo.backbones import resolve_model_path
    from snpo.data.cache import component_fingerprint, dataset_fingerprint, read_manifest

    values = {k: v for k, v in config_to_dict(config).items() if k not in REUSABLE_ACROSS}
    model_path = resolve_model_path(config.model_name_or_path, revision=config.revision,
                                    variant=config.variant)
    unet = model_path / "unet"
    values["denoiser_weights"] = component_fingerprint(unet) if unet.is_dir() else str(model_path)
    values["dataset_files"] = dataset_fingerprint(
        config.dataset_name, config.dataset_split, config.drop_ties, config.max_train_samples)
    if config.cache_dir:
        manifest = read_manifest(Path(config.cache_dir)) or {}
        values["cache"] = {"fingerprint": manifest.get("fingerprint"),
                           "num_pairs": manifest.get("num_pairs")}
    values["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    values["store_version"] = STORE_VERSION
    return values


def open_reference_store(config: TrainConfig) -> Any:
    from snpo.methods.reference_errors import ReferenceErrorStore

    return ReferenceErrorStore(reference_errors_root(config), reference_fingerprint(config))


def apply_speed_options(config: TrainConfig, backbone: Any, method: Any | None) -> None:
    """Set the opt-in speed options of ``config`` on a backbone and its (single-network) method,
    before ``backbone.prepare_for_training`` (called by ``Trainer.train``, or by
    ``prepare_chats``). ``method`` may be None only without ``precompute_reference`` (which
    ``TrainConfig.validate`` allows for method single only)."""
    backbone.channels_last = config.channels_last
    backbone.torch_compile = config.torch_compile
    if config.precompute_reference:
        method.reference_store = open_reference_store(config)
