"""One way to set up training: a config in, a ready :class:`TrainingJob` out.

``snpo train``, ``snpo bench`` and the toy demo all call :func:`build_job`, so what is
benchmarked and what the demo runs is what a user's run does: the same backbone loading, the
same method (speed options included, :func:`build_method`) and the same trainer.

    job = build_job(config)                        # data and model from the config
    job = build_job(config, backbone=bb, data=TrainingData(dataset, collate))   # given ones
    result = job.trainer.train()

Order matters: the data is scanned (or the cache's fingerprint checked) before the model is
loaded, so a bad dataset or a stale cache stops in seconds, not after minutes of loading.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from snpo.backbones import (
    Backbone,
    detect_family,
    family_options,
    has_null_branch,
    load_backbone,
    resolve_model_path,
)
from snpo.dtypes import torch_dtype
from snpo.methods import BuiltMethod, check_sampler_fits, get_method
from snpo.training.config import TrainConfig
from snpo.training.data import TrainingData, training_data
from snpo.training.engines import check_engine
from snpo.training.model_card import write_model_card
from snpo.training.trainer import Callback, Trainer
from snpo.training.watch import RunWatch


@dataclass
class TrainingJob:
    config: TrainConfig
    backbone: Backbone
    data: TrainingData
    built: BuiltMethod
    trainer: Trainer

    @property
    def method(self) -> Any:
        return self.built.method


def load_job_backbone(config: TrainConfig, family: str, *, with_encoders: bool = True) -> Backbone:
    """The config's model (its VAE override, revision and variant, the family's options and
    settings: T5, sigma sampling, FLUX guidance); encoders only when needed."""
    vae = config.pretrained_vae_model_name_or_path
    return load_backbone(
        config.model_name_or_path, family=family, with_encoders=with_encoders,
        vae_path=resolve_model_path(vae, revision=config.revision) if vae else None,
        upcast_vae=config.upcast_vae, revision=config.revision, variant=config.variant,
        options=family_options(config),
    )


def backbone_for(config: TrainConfig, data: TrainingData, family: str | None = None) -> Backbone:
    """The backbone for ``data``: without encoders (and with the cache's null condition)
    when training from a cache."""
    family = family or detect_family(config.model_name_or_path, revision=config.revision)
    backbone = load_job_backbone(config, family, with_encoders=not data.cached)
    if data.cached:
        backbone.preset_null_text(data.null_text)
    return backbone


def build_method(config: TrainConfig, backbone: Backbone) -> BuiltMethod:
    """The registered method of ``config.method``, with the opt-in speed options set.

    ``channels_last`` and ``torch_compile`` are flags on the backbone that
    ``prepare_for_training`` applies (before a method like CHATS copies the network, so both
    copies are alike); ``precompute_reference`` gives the method a reference-error store
    (BENCHMARKS.md measures each). A method that trains what the model's sampler never runs
    (the null branch of a FLUX model without true CFG) is refused (``check_sampler_fits``)."""
    spec = get_method(config.method)
    check_sampler_fits(spec, config, has_null_branch=backbone.has_null_branch, family=backbone.family)
    backbone.channels_last = config.channels_last
    backbone.torch_compile = config.torch_compile
    # memory options of a full fine-tune's reference copy (applied by Backbone.to)
    backbone.reference_dtype = None if config.reference_dtype == "auto" else torch_dtype(config.reference_dtype)
    backbone.reference_offload = config.reference_offload
    built = spec.build(config, backbone)
    if config.precompute_reference:
        from snpo.training.reference_errors import open_reference_store

        built.method.reference_store = open_reference_store(config)
    return built


def build_job(
    config: TrainConfig,
    *,
    backbone: Backbone | None = None,
    data: TrainingData | None = None,
    built: BuiltMethod | None = None,
    callbacks: list[Callback] | None = None,
    show_progress: bool = True,
    save_model: bool = True,
    write_logs: bool = True,
) -> TrainingJob:
    """Data, backbone, method and trainer of ``config`` (each may be given instead)."""
    config.validate()
    # the launcher's engine (DDP, FSDP, DeepSpeed) against the config: one line, before the data and model
    check_engine(config)
    watch = RunWatch(config)  # validation images, curves, hub: a bad prompt file stops here
    if data is None:
        family = backbone.family if backbone is not None else detect_family(
            config.model_name_or_path, revision=config.revision)
        # before the data scan and the model load: the family and the config tell it
        check_sampler_fits(get_method(config.method), config, family=family,
                           has_null_branch=has_null_branch(family, family_options(config)))
        data = training_data(config, family)
    elif not data.unpaired and get_method(config.method).extra.get("data") == "unpaired":
        from snpo.training.unpaired import split_pairs_data

        data = split_pairs_data(data, seed=config.seed)  # given pairs (the toy's), as labelled rows
    if backbone is None:
        backbone = backbone_for(config, data)
    built = built or build_method(config, backbone)
    card = None
    if save_model:
        description = backbone.describe()

        def card(out, info):
            info = {**info, **watch.card_info(out)}  # validation grids, curves, hub repository
            write_model_card(out, config, description, info)
            watch.after_save(out, info)  # push_to_hub: once the weights and the card are written

    trainer = Trainer(
        config, backbone, data.dataset, built.method, collate_fn=data.collate_fn,
        trainable_parameters=built.trainable_parameters, model=built.model,
        show_progress=show_progress, save_model=save_model, write_logs=write_logs,
        data_report=data.report, model_card=card, sampler=data.sampler,
        callbacks=[*data.callbacks, *watch.callbacks(backbone, write_logs=write_logs, save_model=save_model),
                   *(callbacks or [])], stateful=data.stateful,
    )
    return TrainingJob(config, backbone, data, built, trainer)
