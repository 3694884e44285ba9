"""The ``snpo train`` and ``snpo cache`` commands.

Order matters: everything that can fail cheaply fails before a model is loaded.

1. the config is validated (``load_config``: types and ranges), then what needs the file
   system but no model (``preflight``: paths, the output folder, the checkpoint to resume
   from) and optional packages;
2. ``build_job`` (``snpo.training.job``) scans the data or checks the cache, loads the
   backbone (without VAE and text encoders when training from a cache) and builds the method
   and the trainer;
3. the trainer runs; LoRA weights or the denoiser are saved with a model card.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch

from snpo.backbones import ModelNotFoundError, detect_family, resolve_model_path
from snpo.data import DataSourceError
from snpo.data.cache import STORAGE_DTYPES, CacheError, build_cache, read_manifest
from snpo.errors import ConfigError
from snpo.files import is_hub_id
from snpo.methods import get_method
from snpo.training import checkpoint as ckpt
from snpo.training.config import TrainConfig
from snpo.training.data import say, scan_source
from snpo.training.fingerprints import RESAMPLE, cache_fingerprint_for, resume_fingerprint
from snpo.training.job import build_job, load_job_backbone
from snpo.training.optimizers import check_optimizer_available
from snpo.training.trainer import TrainResult, cpu_only_launch


def check_optional_packages(config: TrainConfig) -> None:
    if config.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ConfigError("report_to: wandb is not installed (pip install 'snpo[wandb]')")
    check_optimizer_available(config)


def preflight(config: TrainConfig) -> None:
    """Checks of the settings that need the file system but no model or data (one line each,
    naming the field): required paths, the output folder, the checkpoint to resume from."""
    for name in ("model_name_or_path", "dataset_name", "output_dir"):
        if not str(getattr(config, name)).strip():
            raise ConfigError(f"{name}: expected a path or hub id, got {getattr(config, name)!r}")
    vae = config.pretrained_vae_model_name_or_path
    if vae is not None:
        vae = str(vae)
        path = Path(vae).expanduser()
        if not path.is_dir() and not is_hub_id(vae):
            raise ModelNotFoundError(f"pretrained_vae_model_name_or_path: no such folder {vae!r}")
        if path.is_dir() and not (path / "config.json").is_file():
            raise ModelNotFoundError(f"pretrained_vae_model_name_or_path: {vae!r} has no config.json (not a VAE folder)")
    model = Path(config.model_name_or_path).expanduser()
    if config.variant is not None and model.is_dir() and not any(
        f".{config.variant}." in p.name for p in model.rglob("*") if p.is_file()
    ):
        raise ModelNotFoundError(f"variant: no weight files of variant {config.variant!r} in {str(model)!r}")
    out = Path(config.output_dir).expanduser()
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output_dir: {config.output_dir!r} exists and is not a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise ConfigError(f"output_dir: {config.output_dir!r} cannot be written ({existing} is read-only)")
    if config.resume_from_checkpoint:
        found = ckpt.resolve_checkpoint(out / "checkpoints", config.resume_from_checkpoint)
        if found is not None:  # the model-dependent part of the check runs once it is loaded
            saved = ckpt.read_state(found).get("fingerprint", {})
            mine = {**resume_fingerprint(config), "num_processes": int(os.environ.get("WORLD_SIZE", "1"))}
            ckpt.check_fingerprint(saved, mine)


def run_train(config: TrainConfig, *, show_progress: bool = True) -> TrainResult:
    """``snpo train``: see the module docstring."""
    config.validate()
    preflight(config)
    check_optional_packages(config)
    return build_job(config, show_progress=show_progress).trainer.train()


def run_cache(config: TrainConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """``snpo cache``: encode the dataset once into ``cache_dir`` (resumable); returns the
    manifest. Uses the same config as ``snpo train``."""
    config.validate()
    if not config.cache_dir:
        raise CacheError("cache_dir: expected a folder to write the cache into, got nothing")
    if not config.center_crop:
        raise CacheError("center_crop: a cache needs center_crop=true (a random crop cannot be cached)")
    family = detect_family(config.model_name_or_path, revision=config.revision)
    try:
        source = scan_source(config)
    except DataSourceError as err:
        if get_method(config.method).extra.get("data") != "unpaired":
            raise
        raise DataSourceError(f"{err}; a latent/text cache holds PAIRS (a kto run splits them into "
                              "rows): unpaired feedback rows are not cached, train without cache_dir") from None
    model_path = resolve_model_path(config.model_name_or_path, revision=config.revision, variant=config.variant)
    fingerprint = cache_fingerprint_for(config, family, model_path)
    existing = read_manifest(Path(config.cache_dir))
    if existing and existing.get("complete") and existing["fingerprint"] == fingerprint:
        say(f"cache: {config.cache_dir} is complete ({existing['num_pairs']} pairs); nothing to do")
        return existing  # whatever its shard size or storage dtype: both are fine for training

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu_only_launch())
    dtype = STORAGE_DTYPES[config.mixed_precision]
    backbone = load_job_backbone(config, family, with_encoders=True)
    backbone.to(accelerator.device, frozen_dtype=None if dtype == torch.float32 else dtype)
    for module in backbone.frozen_modules().values():
        module.requires_grad_(False).eval()
    manifest = build_cache(
        config.cache_dir, source, backbone, fingerprint=fingerprint, resolution=config.resolution,
        center_crop=True, random_flip=config.random_flip, resample=RESAMPLE,
        max_pairs=config.max_train_samples, shard_size=config.cache_shard_size,
        batch_size=config.cache_batch_size, num_workers=config.dataloader_num_workers,
        storage_dtype=dtype, accelerator=accelerator, show_progress=show_progress,
    )
    accelerator.end_training()
    say(f"cache: {manifest['num_pairs']} pairs in {config.cache_dir}; {manifest['report_summary']}")
    return manifest
