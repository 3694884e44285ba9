"""What a run's stored state depends on, computed once from the config: one function per kind.

- :func:`resume_fingerprint`: what a resumed run must share with the run that wrote the
  checkpoint (the trainer adds the family, the process count and a weights digest);
- :func:`cache_fingerprint_for`: what a latent/text cache's tensors depend on;
- :func:`reference_fingerprint`: what stored reference errors (``precompute_reference``)
  depend on.

Every kind that mentions the data uses :func:`data_fingerprint`, so the data settings cannot
drift apart between them. Fingerprints are JSON-able dicts, compared entry by entry; where a
short name is needed (a folder), ``snpo.files.stable_hash`` hashes one.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from snpo.configuration import config_to_dict

#: resampling filter of the training transforms (part of a cache's fingerprint)
RESAMPLE = "bicubic"

#: what a resume must agree on with the run that wrote the checkpoint
RESUME_KEYS = ("model_name_or_path", "method", "lora_rank", "per_device_train_batch_size",
               "gradient_accumulation_steps")

#: TrainConfig fields that cannot change the reference errors of a step: runs differing only
#: in these share stored reference errors. Every other field (and any field added later)
#: separates stores, which is the safe default.
REUSABLE_ACROSS = frozenset({
    "method", "beta", "mix_lambda", "mix_scale",
    "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps",
    "adam_beta1", "adam_beta2", "adam_weight_decay", "adam_epsilon", "adam_implementation",
    "max_grad_norm", "max_nonfinite_steps", "max_steps",
    "output_dir", "checkpointing_steps", "checkpoints_total_limit", "resume_from_checkpoint",
    "logging_steps", "report_to", "tracker_project_name",
    "dataloader_num_workers", "cache_shard_size", "cache_batch_size",
    "precompute_reference", "reference_errors_dir",
    # beyond the paper: the safeguard scales a gradient; kto and mapo never store reference errors
    "safeguard", "safeguard_mu", "safeguard_scope", "kto_desirable_weight", "kto_undesirable_weight",
    "mapo_beta", "mapo_snr",
    # watching a run: drawn or uploaded after the steps, never part of one
    "validation_prompt", "validation_prompts", "validation_prompts_file", "validation_steps",
    "validation_seeds", "validation_num_inference_steps", "validation_guidance_scale",
    "validation_scheduler", "validation_null_branch", "collapse_patience", "push_to_hub",
    "hub_model_id", "hub_private_repo",
})
REFERENCE_STORE_VERSION = 1


def resume_fingerprint(config: Any) -> dict[str, Any]:
    """The part of a trainer fingerprint that the config alone decides."""
    return {key: getattr(config, key) for key in RESUME_KEYS}


def upgrade_resume_fingerprint(saved: dict[str, Any]) -> dict[str, Any]:
    """A fingerprint written before methods were one key (``method: single`` + ``objective``)."""
    saved = dict(saved)
    objective = saved.pop("objective", None)
    if saved.get("method") == "single":
        saved["method"] = objective or "snpo"
    return saved


def data_fingerprint(config: Any) -> dict[str, Any]:
    """The data settings of a TrainConfig plus the names and sizes of its local files."""
    from snpo.data.cache import dataset_fingerprint

    return dataset_fingerprint(config.dataset_name, config.dataset_split, config.drop_ties,
                               config.max_train_samples, config.max_caption_chars)


def _vae_path(config: Any) -> Path | None:
    from snpo.backbones import resolve_model_path

    vae = config.pretrained_vae_model_name_or_path
    return resolve_model_path(vae, revision=config.revision) if vae else None


def cache_fingerprint_for(config: Any, family: str, model_path: Path) -> dict[str, Any]:
    """Everything the cache of this config's data and model holds depends on: with a flow
    model also the encoding options of the config (T5 length, SD3's ``use_t5``), the same
    ``Backbone.encoding_options()`` the loaded model reports (absent for other families, so
    their caches keep their fingerprints)."""
    from snpo.backbones import encoding_options, family_options
    from snpo.data.cache import cache_fingerprint

    fingerprint = cache_fingerprint(
        family=family, model_path=model_path, vae_path=_vae_path(config),
        resolution=config.resolution, center_crop=config.center_crop,
        random_flip=config.random_flip, resample=RESAMPLE, dataset=data_fingerprint(config),
    )
    encoding = encoding_options(family, model_path, family_options(config))
    if encoding:
        fingerprint["encoding"] = encoding
    return fingerprint


def reference_fingerprint(config: Any) -> dict[str, Any]:
    """Everything the reference errors of a training step depend on."""
    from snpo.backbones import resolve_model_path
    from snpo.data.cache import component_fingerprint, read_manifest

    values = {k: v for k, v in config_to_dict(config).items() if k not in REUSABLE_ACROSS}
    model_path = resolve_model_path(config.model_name_or_path, revision=config.revision,
                                    variant=config.variant)
    denoiser = next((model_path / d for d in ("unet", "transformer") if (model_path / d).is_dir()), None)
    values["denoiser_weights"] = component_fingerprint(denoiser) if denoiser else str(model_path)
    values["data"] = data_fingerprint(config)
    if config.cache_dir:
        manifest = read_manifest(Path(config.cache_dir)) or {}
        values["cache"] = {"fingerprint": manifest.get("fingerprint"),
                           "num_pairs": manifest.get("num_pairs")}
    values["world_size"] = int(os.environ.get("WORLD_SIZE", "1"))
    values["store_version"] = REFERENCE_STORE_VERSION
    return values
