"""The ``snpo train`` and ``snpo cache`` jobs: config -> data -> model -> trainer -> model.

Order matters: everything that can fail cheaply fails before a model is loaded.

1. the config is validated (``load_config``: types and ranges), then what needs the file
   system but no model (``preflight``: paths, the output folder, the checkpoint to resume
   from), then the model's family is read from its ``model_index.json`` (no weights) and
   optional packages are checked;
2. the data is scanned: a dataset with no usable pair stops here with one line; with
   ``cache_dir`` the cache's fingerprint is checked instead (a stale cache stops here);
3. the backbone is loaded (without VAE and text encoders when training from a cache);
4. the trainer runs; LoRA weights or the UNet are saved with a model card.

Unreadable images found while training are SUBSTITUTED by the next readable pair (counted
and reported, as every skipped row): batches keep their size, so no process ever meets an
empty batch and per-pair seeds do not depend on which pairs were bad.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from snpo.backbones import ModelNotFoundError, detect_family, load_backbone, resolve_model_path
from snpo.data import (
    DataSourceError,
    GroupedShuffleSampler,
    PairedTransform,
    PreferencePairDataset,
    SkippedItem,
    collate_pairs,
    load_preference_source,
)
from snpo.data.cache import (
    STORAGE_DTYPES,
    CachedGroupSampler,
    CacheError,
    build_cache,
    cache_fingerprint,
    collate_cached,
    dataset_fingerprint,
    open_cache,
    read_manifest,
)
from snpo.methods.single import SingleNetworkMethod
from snpo.training import checkpoint as ckpt
from snpo.training.config import TrainConfig
from snpo.training.model_card import write_model_card
from snpo.training.trainer import Trainer, TrainResult, cpu_only_launch

RESAMPLE = "bicubic"


def _is_main_process() -> bool:
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", "0"))) == 0


def _say(message: str) -> None:
    if _is_main_process():
        print(message, flush=True)


class FirstPairs(Dataset):
    """The first ``n`` pairs of a dataset (``max_train_samples``), keeping ``set_epoch``."""

    def __init__(self, dataset: Dataset, n: int) -> None:
        self.dataset, self.n = dataset, min(n, len(dataset))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> Any:
        if not 0 <= index < self.n:
            raise IndexError(index)
        return self.dataset[index]

    def set_epoch(self, epoch: int) -> None:
        self.dataset.set_epoch(epoch)


def check_optional_packages(config: TrainConfig) -> None:
    if config.report_to in ("wandb", "all") and importlib.util.find_spec("wandb") is None:
        raise ValueError("report_to: wandb is not installed (pip install 'snpo[wandb]')")


def fingerprint_for(config: TrainConfig, family: str, model_path: Path) -> dict[str, Any]:
    vae = config.pretrained_vae_model_name_or_path
    vae_path = resolve_model_path(vae, revision=config.revision) if vae else None
    return cache_fingerprint(
        family=family, model_path=model_path, vae_path=vae_path, resolution=config.resolution,
        center_crop=config.center_crop, random_flip=config.random_flip, resample=RESAMPLE,
        dataset=dataset_fingerprint(config.dataset_name, config.dataset_split, config.drop_ties,
                                    config.max_train_samples, config.max_caption_chars),
    )


def _load(config: TrainConfig, family: str, *, with_encoders: bool):
    vae = config.pretrained_vae_model_name_or_path
    return load_backbone(
        config.model_name_or_path, family=family, with_encoders=with_encoders,
        vae_path=resolve_model_path(vae, revision=config.revision) if vae else None,
        upcast_vae=config.upcast_vae, revision=config.revision, variant=config.variant,
    )


def _scan(config: TrainConfig):
    try:
        source = load_preference_source(config.dataset_name, split=config.dataset_split, drop_ties=config.drop_ties,
                                        max_caption_chars=config.max_caption_chars)
        report = source.scan()  # DataSourceError (one line) when no pair is usable
    except DataSourceError as err:
        # name the setting to fix: the split when the split is what is missing
        field = "dataset_split" if "split" in str(err) else "dataset_name"
        raise DataSourceError(f"{field}: {err}") from None
    for path, reason in getattr(source.store, "unreadable_files", ()):
        _say(f"data: skipped unreadable shard {path}: {reason}")
    _say(f"data: {source.name}: {report.summary()}")
    return source


def preflight(config: TrainConfig) -> None:
    """Checks of the settings that need the file system but no model or data (one line each,
    naming the field): required paths, the output folder, the checkpoint to resume from."""
    for name in ("model_name_or_path", "dataset_name", "output_dir"):
        if not str(getattr(config, name)).strip():
            raise ValueError(f"{name}: expected a path or hub id, got {getattr(config, name)!r}")
    vae = config.pretrained_vae_model_name_or_path
    if vae is not None:
        vae = str(vae)
        path = Path(vae).expanduser()
        hub_id = vae.count("/") == 1 and not vae.startswith((".", "/", "~"))
        if not path.is_dir() and not hub_id:
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
        raise ValueError(f"output_dir: {config.output_dir!r} exists and is not a folder")
    existing = next(p for p in [out, *out.absolute().parents] if p.exists())
    if not os.access(existing, os.W_OK):
        raise ValueError(f"output_dir: {config.output_dir!r} cannot be written ({existing} is read-only)")
    if config.resume_from_checkpoint:
        found = ckpt.resolve_checkpoint(out / "checkpoints", config.resume_from_checkpoint)
        if found is not None:  # the model-dependent part of the check runs once it is loaded
            saved = ckpt.read_state(found).get("fingerprint", {})
            mine = {**ckpt.config_fingerprint(config), "num_processes": int(os.environ.get("WORLD_SIZE", "1"))}
            ckpt.check_fingerprint(saved, mine)


class SkipCounter:
    """Counts the pairs skipped while training, on every process, and gathers them at the end
    so the model card reports all of them."""

    def __init__(self, dataset: PreferencePairDataset) -> None:
        self.dataset = dataset
        self.items: list[SkippedItem] = []

    def on_batch(self, batch: dict[str, Any]) -> None:
        seen = {(i.kind, i.key) for i in self.items}
        for item in batch.get("skipped", ()):
            if (item.kind, item.key) not in seen:  # a bad pair met again (next epoch) counts once
                seen.add((item.kind, item.key))
                self.items.append(item)
                _say(f"data: skipped {item.kind} at {item.key}: {item.detail}")

    # saved in checkpoints, so a resumed run still reports the pairs skipped before the kill
    def state_dict(self) -> dict[str, Any]:
        return {"skipped": [[i.kind, i.key, i.detail] for i in self.items]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.items = [SkippedItem(*entry) for entry in state.get("skipped", [])]

    def on_train_end(self, accelerator: Any) -> None:
        items = self.items
        if accelerator.num_processes > 1:
            from accelerate.utils import gather_object

            items = gather_object(items)
        self.dataset.report.record_skipped(items)
        _say(f"data: after training: {self.dataset.report.summary()}")

    def report(self) -> dict[str, Any]:
        return {**self.dataset.report.as_dict(), "summary": self.dataset.report.summary()}


def run_train(config: TrainConfig, *, show_progress: bool = True) -> TrainResult:
    """``snpo train``: see the module docstring."""
    config.validate()
    preflight(config)
    check_optional_packages(config)
    family = detect_family(config.model_name_or_path, revision=config.revision)
    extra: dict[str, Any] = {}
    if config.cache_dir:
        model_path = resolve_model_path(config.model_name_or_path, revision=config.revision, variant=config.variant)
        dataset = open_cache(config.cache_dir, fingerprint_for(config, family, model_path), seed=config.seed)
        _say(f"data: cache {config.cache_dir}: {len(dataset)} pairs; {dataset.report.summary()}")
        backbone = _load(config, family, with_encoders=False)
        backbone.preset_null_text(dataset.null_text)
        collate = collate_cached
        extra["sampler"] = CachedGroupSampler(dataset, seed=config.seed)  # the uncached run's order
        summary = dataset.report.summary()
        extra["data_report"] = lambda: {**dataset.report.as_dict(), "summary": summary, "cache_dir": config.cache_dir}
    else:
        source = _scan(config)
        backbone = _load(config, family, with_encoders=True)
        transform = PairedTransform(config.resolution, center_crop=config.center_crop,
                                    random_flip=config.random_flip, resample=RESAMPLE)
        pairs = PreferencePairDataset(source, transform, seed=config.seed, on_unreadable="substitute")
        sampler = GroupedShuffleSampler(source, seed=config.seed)  # row-group-local reads
        dataset: Dataset = pairs
        if config.max_train_samples is not None:
            dataset = FirstPairs(pairs, config.max_train_samples)
            sampler.groups = sampler.groups[: len(dataset)]  # the order is built from these only
        counter = SkipCounter(pairs)
        collate = collate_pairs
        extra.update(sampler=sampler, on_batch=counter.on_batch, on_train_end=counter.on_train_end,
                     data_report=counter.report, stateful=[counter])
    method = build_method(config, backbone, extra)
    description = backbone.describe()
    trainer = Trainer(
        config, backbone, dataset, method, collate_fn=collate, show_progress=show_progress,
        model_card=lambda out, info: write_model_card(out, config, description, info), **extra,
    )
    return trainer.train()


def build_method(config: TrainConfig, backbone: Any, extra: dict[str, Any]) -> Any:
    """The method of ``config.method``. CHATS trains two networks: its dual module and their
    parameters go to the trainer through ``extra`` (``model``, ``trainable_parameters``).
    The opt-in speed options are set here too (see BENCHMARKS.md)."""
    from snpo.training.speed import apply_speed_options

    if config.method == "chats":
        from accelerate.utils import set_seed

        from snpo.methods.chats import ChatsMethod, prepare_chats

        set_seed(config.seed)  # LoRA factors drawn here, not in the trainer: same seed, same start
        apply_speed_options(config, backbone, None)  # before the copy: both networks alike
        dual, params = prepare_chats(backbone, lora_rank=config.lora_rank,
                                     gradient_checkpointing=config.gradient_checkpointing)
        extra.update(model=dual, trainable_parameters=params)
        return ChatsMethod(backbone, config.beta, config.chats_lose_prompt_dropout)
    if config.method == "npo-negative":
        from snpo.methods.npo import npo_negative_method

        method = npo_negative_method(backbone, config.beta, cfg_dropout=config.cfg_dropout)
    else:
        method = SingleNetworkMethod(backbone, config.objective_config, config.cfg_dropout)
    apply_speed_options(config, backbone, method)
    return method


def run_cache(config: TrainConfig, *, show_progress: bool = True) -> dict[str, Any]:
    """``snpo cache``: encode the dataset once into ``cache_dir`` (resumable); returns the
    manifest. Uses the same config as ``snpo train``."""
    config.validate()
    if not config.cache_dir:
        raise CacheError("cache_dir: expected a folder to write the cache into, got nothing")
    if not config.center_crop:
        raise CacheError("center_crop: a cache needs center_crop=true (a random crop cannot be cached)")
    family = detect_family(config.model_name_or_path, revision=config.revision)
    source = _scan(config)
    model_path = resolve_model_path(config.model_name_or_path, revision=config.revision, variant=config.variant)
    fingerprint = fingerprint_for(config, family, model_path)
    existing = read_manifest(Path(config.cache_dir))
    if existing and existing.get("complete") and existing["fingerprint"] == fingerprint:
        _say(f"cache: {config.cache_dir} is complete ({existing['num_pairs']} pairs); nothing to do")
        return existing  # whatever its shard size or storage dtype: both are fine for training

    from accelerate import Accelerator

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=cpu_only_launch())
    dtype = STORAGE_DTYPES[config.mixed_precision]
    backbone = _load(config, family, with_encoders=True)
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
    _say(f"cache: {manifest['num_pairs']} pairs in {config.cache_dir}; {manifest['report_summary']}")
    return manifest
