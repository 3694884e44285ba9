"""The toy study's runs: what is trained, in which world and regime, and where its results go.

A study is a list of :class:`RunSpec` per world (a world seed makes its own reference,
generators and pairs). Each run trains one registered method from the world's reference on
the pairs of one regime (a :class:`~snpo.toy.world.PairPool`), through ``build_job`` as a
user's run would, then scores it with :class:`~snpo.toy.evaluator.Evaluator`. Its results go
to ``<output_dir>/worlds/world-<seed>/<pool>/<run>/`` (``result.json`` written last, so a
killed study resumes where it stopped: a run with a ``result.json`` is never redone).

Runs are independent, so they can go to several worker processes (``workers``): the toy
model is too small for two threads to help one process, so two processes of one thread
each nearly halve the wall time on a 2-core machine. Every number is the same either way
(each run seeds itself).
"""

from __future__ import annotations

import copy
import json
import os
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch

from snpo.backbones.toy import ToyBackbone
from snpo.files import atomic_write_json
from snpo.methods import get_method
from snpo.toy.data import stack_batch
from snpo.toy.evaluator import Evaluator, ModelEval
from snpo.toy.world import (
    POOLS,
    ToyWorldConfig,
    load_or_make_pairs,
    load_or_pretrain_reference,
    load_toy,
    split_prompts,
)
from snpo.training.config import TrainConfig
from snpo.training.data import TrainingData
from snpo.training.trainer import Callback

RESULT = "result.json"
ARRAYS = "arrays.npz"


@dataclass(frozen=True)
class RunSpec:
    """One training run of the study (``method`` None: the reference, scored untrained)."""

    name: str
    method: str | None
    pool: str
    group: str = "main"  # reference | main | dual | component | p | mix_scale | lambda | collapse
    overrides: tuple[tuple[str, Any], ...] = ()  # TrainConfig fields that differ from the budget
    trajectory_every: int = 0  # collapse runs: blur and logratio/chosen every N steps
    keep_model: bool = False  # save the trained weights (Diff-NPO's merge needs them)

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in self.name).strip("_")


@dataclass
class RunResult:
    spec: RunSpec
    world: int
    info: dict[str, Any]  # train_seconds, history, trajectory, null accuracy summary, ...
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def run_dir(output_dir: Path, world: int, spec: RunSpec) -> Path:
    return Path(output_dir) / "worlds" / f"world-{world}" / spec.pool / spec.slug


def world_config(config: Any, seed: int) -> ToyWorldConfig:
    return ToyWorldConfig(
        seed=seed, pretrain_steps=config.pretrain_steps, pretrain_images=config.pretrain_images,
        pairs_per_prompt=config.pairs_per_prompt, heldout_prompts=config.heldout_prompts,
        heldout_pairs_per_prompt=config.heldout_pairs_per_prompt,
        pair_sampling_steps=config.pair_sampling_steps, label_temperature=config.label_temperature,
        strong_steps=config.strong_steps, flow=getattr(config, "flow", False),
    )


def alignment_config(config: Any, reference_dir: Path, out_dir: Path, spec: RunSpec) -> TrainConfig:
    """The one training budget every method of the study gets (plus the run's overrides)."""
    values = dict(
        model_name_or_path=str(reference_dir), output_dir=str(out_dir), method=spec.method,
        beta=config.beta, mix_lambda=config.mix_lambda, cfg_dropout=config.cfg_dropout,
        max_steps=config.train_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=min(20, config.train_steps // 10), adam_weight_decay=0.0, max_grad_norm=1.0,
        checkpointing_steps=0, report_to="none", seed=config.seed,
    )
    values.update(dict(spec.overrides))
    return TrainConfig(**values)


def guide_for(method: str, backbone: ToyBackbone, networks: dict, config: Any):
    """The method's own sampling guide (``snpo sample`` uses the same), at the study's scale."""
    chats_scale = config.chats_guidance_scale if config.chats_guidance_scale is not None else config.guidance_scale - 1
    settings = SimpleNamespace(guidance_scale=config.guidance_scale, chats_guidance_scale=chats_scale,
                               chats_proxy_alpha=0.5)
    return get_method(method).make_guide(backbone, networks, settings)


class Trajectory(Callback):
    """Every ``every`` steps: the edge sharpness of a few samples and the mean
    ``logratio/chosen`` since the last record (the collapse claim needs both along the way)."""

    def __init__(self, evaluator: Evaluator, model: torch.nn.Module, every: int) -> None:
        self.evaluator, self.model, self.every = evaluator, model, every
        self.points: list[dict[str, float]] = []
        self._logratios: list[float] = []

    def on_step_end(self, step: int, logs: dict) -> None:
        value = logs.get("logratio/chosen", float("nan"))
        if np.isfinite(value):
            self._logratios.append(value)
        if step % self.every:
            return
        was_training = self.model.training
        self.model.eval()
        sharp = self.evaluator.sharpness_of(self.model)
        self.model.train(was_training)
        self.points.append({"step": step, "sharpness": sharp,
                            "logratio_chosen": float(np.mean(self._logratios)) if self._logratios else float("nan")})
        self._logratios = []


def _evaluator(config: Any, backbone: ToyBackbone, reference: torch.nn.Module, world: ToyWorldConfig,
               heldout_pairs: Any) -> Evaluator:
    _, heldout_prompts = split_prompts(world)
    prompts = heldout_prompts[: config.eval_prompts] if config.eval_prompts else heldout_prompts
    return Evaluator(backbone, reference, prompts, list(range(config.eval_seeds)), heldout_pairs,
                     steps=config.sampling_steps, guidance_scale=config.guidance_scale,
                     implicit_draws=config.implicit_draws, seed=config.seed)


def _history(history: list[dict]) -> list[dict]:
    return [{k: (v if isinstance(v, int | float) and np.isfinite(v) else None) for k, v in h.items()}
            for h in history]


def _write(folder: Path, info: dict, ev: ModelEval, grid: int, prompts: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    arrays = ev.arrays()
    if ev.images is not None:  # a few images for the report's grid: the first 2 seeds
        cols = [s * prompts + j for s in range(min(2, ev.label.shape[0])) for j in range(min(grid, prompts))]
        arrays["grid"] = ev.images[cols].numpy()
    tmp = folder / (ARRAYS + ".tmp.npz")
    np.savez(tmp, **arrays)
    os.replace(tmp, folder / ARRAYS)
    info = {**info, "hf_ratio": ev.hf_ratio, "sampling_seconds_per_image": ev.sampling_seconds}
    if ev.null_accuracy is not None:
        info["null_accuracy"] = {k: v for k, v in ev.null_accuracy.items() if k != "per_pair"}
    atomic_write_json(folder / RESULT, info, default=str)


def train_and_evaluate(config: Any, world_seed: int, spec: RunSpec) -> str:
    """One run: train ``spec.method`` from the world's reference on its regime's pairs, score
    it, write its folder. Returns the folder (skips work already done)."""
    from snpo.training.job import build_job

    folder = run_dir(Path(config.output_dir), world_seed, spec)
    if (folder / RESULT).is_file():
        return str(folder)
    world = world_config(config, world_seed)
    backbone, reference_dir = load_or_pretrain_reference(world, _cache(config), show_progress=False)
    train_pairs, heldout_pairs = load_or_make_pairs(reference_dir, world, POOLS[spec.pool], show_progress=False)
    reference = copy.deepcopy(backbone.denoiser).eval().requires_grad_(False)
    evaluator = _evaluator(config, backbone, reference, world, heldout_pairs)
    info: dict[str, Any] = {"name": spec.name, "method": spec.method, "pool": spec.pool, "group": spec.group,
                            "world": world_seed, "overrides": dict(spec.overrides)}
    if spec.method is None:
        ev = evaluator.evaluate(reference, with_null_accuracy=True, keep_images=True)
        _write(folder, {**info, "train_seconds": 0.0}, ev, config.grid_prompts, len(evaluator.prompts))
        return str(folder)
    train_config = alignment_config(config, reference_dir, folder / "logs", spec)
    policy_backbone = load_toy(reference_dir)
    job = build_job(train_config, backbone=policy_backbone, data=TrainingData(train_pairs.dataset(), stack_batch),
                    show_progress=config.show_progress and config.workers <= 1, save_model=False,
                    write_logs=False)
    model = job.built.model if job.built.model is not None else policy_backbone.denoiser
    trajectory = None
    if spec.trajectory_every:
        evaluator.backbone = policy_backbone
        trajectory = Trajectory(evaluator, model, spec.trajectory_every)
        job.trainer.callbacks.append(trajectory)
    start = time.perf_counter()
    result = job.trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    info.update({"train_seconds": seconds, "history": _history(result.history),
                 "skipped_nonfinite": result.skipped_nonfinite,
                 "trajectory": trajectory.points if trajectory else None})
    if spec.keep_model:
        from snpo.files import atomic_save_safetensors
        from snpo.merging import effective_state_dict

        folder.mkdir(parents=True, exist_ok=True)  # LoRA folded in: base + scale B A
        atomic_save_safetensors(effective_state_dict(model), folder / "model.safetensors")
    networks = dict(model.items()) if isinstance(model, torch.nn.ModuleDict) else {"policy": model}
    if not set(get_method(spec.method).sampling_roles) <= set(networks):
        # a part of a method that samples with networks of other runs (Diff-NPO's NPO model):
        # scored in npo_rows, once its partner is trained
        folder.mkdir(parents=True, exist_ok=True)
        np.savez(folder / ARRAYS)
        atomic_write_json(folder / RESULT, info, default=str)
        return str(folder)
    evaluator.backbone = policy_backbone
    guide = guide_for(spec.method, policy_backbone, networks, config)
    null_model = networks.get("policy")  # CHATS has no null branch of its own to measure
    ev = evaluator.evaluate(next(iter(networks.values())), guide=guide, null_model=null_model,
                            with_null_accuracy=null_model is not None, keep_images=True)
    _write(folder, info, ev, config.grid_prompts, len(evaluator.prompts))
    return str(folder)


def npo_rows(config: Any, world_seed: int, pool: str) -> list[str]:
    """Diff-NPO's two rows from its runs (positive = the dpo run, NPO = the npo-negative run):
    sampled with the NPO model before merging and after the Diff-NPO merge."""
    from safetensors.torch import load_file

    from snpo.merging import merge_denoisers

    out = Path(config.output_dir)
    dpo = RunSpec("dpo", "dpo", pool)
    npo = RunSpec("npo-negative", "npo-negative", pool, "component")
    rows = [RunSpec("diff-npo (before merging)", "npo-negative", pool, "dual", (("merge_a", 0.0), ("merge_b", 1.0))),
            RunSpec("diff-npo (merged)", "npo-negative", pool, "dual",
                    (("merge_a", config.npo_merge_a), ("merge_b", config.npo_merge_b)))]
    if all((run_dir(out, world_seed, r) / RESULT).is_file() for r in rows):
        return [str(run_dir(out, world_seed, r)) for r in rows]
    world = world_config(config, world_seed)
    backbone, reference_dir = load_or_pretrain_reference(world, _cache(config), show_progress=False)
    _, heldout_pairs = load_or_make_pairs(reference_dir, world, POOLS[pool], show_progress=False)
    reference = copy.deepcopy(backbone.denoiser).eval().requires_grad_(False)
    evaluator = _evaluator(config, backbone, reference, world, heldout_pairs)

    def load(spec: RunSpec) -> torch.nn.Module:
        net = copy.deepcopy(reference)
        net.load_state_dict(load_file(str(run_dir(out, world_seed, spec) / "model.safetensors")))
        return net.eval()

    positive, npo_model = load(dpo), load(npo)
    dpo_info = json.loads((run_dir(out, world_seed, dpo) / RESULT).read_text())
    npo_info = json.loads((run_dir(out, world_seed, npo) / RESULT).read_text())
    folders = []
    for row in rows:
        a, b = dict(row.overrides)["merge_a"], dict(row.overrides)["merge_b"]
        null_net = npo_model if a == 0 and b == 1 else merge_denoisers(reference, positive, npo_model, a, b)
        guide = guide_for("npo-negative", backbone, {"policy": positive, "npo": null_net}, config)
        ev = evaluator.evaluate(positive, guide=guide, null_model=null_net, keep_images=True)
        info = {"name": row.name, "method": "diff-npo", "pool": pool, "group": "dual", "world": world_seed,
                "overrides": dict(row.overrides), "merge_a": a, "merge_b": b,
                "train_seconds": dpo_info["train_seconds"] + npo_info["train_seconds"]}
        folder = run_dir(out, world_seed, row)
        _write(folder, info, ev, config.grid_prompts, len(evaluator.prompts))
        folders.append(str(folder))
    return folders


def prepare_world(config: Any, world_seed: int, pools: tuple[str, ...]) -> dict[str, float]:
    """The world's reference, generators and pairs (cached); returns the seconds each took."""
    world = world_config(config, world_seed)
    timings = {}
    start = time.perf_counter()
    _, reference_dir = load_or_pretrain_reference(world, _cache(config), show_progress=config.show_progress)
    timings["reference"] = time.perf_counter() - start
    for pool in pools:
        start = time.perf_counter()
        load_or_make_pairs(reference_dir, world, POOLS[pool], show_progress=config.show_progress)
        timings[f"pairs {pool}"] = time.perf_counter() - start
    return timings


def _cache(config: Any) -> Path | None:
    return Path(config.cache_dir) if config.cache_dir else None


# ---- running many --------------------------------------------------------------------------
def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def run_all(calls: list[tuple[Any, ...]], workers: int) -> list[Any]:
    """``fn(*args)`` for each ``(fn, *args)``; in worker processes of one thread each when
    ``workers > 1`` (spawned: no state leaks between runs), else here, in order."""
    if workers <= 1 or len(calls) <= 1:
        return [fn(*args) for fn, *args in calls]
    import multiprocessing

    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                             initializer=_init_worker, initargs=(1,)) as pool:
        futures = [pool.submit(fn, *args) for fn, *args in calls]
        return [f.result() for f in futures]


def load_result(folder: Path, spec: RunSpec | None = None) -> RunResult:
    info = json.loads((Path(folder) / RESULT).read_text())
    with np.load(Path(folder) / ARRAYS) as data:
        arrays = {k: data[k] for k in data.files}
    spec = spec or RunSpec(info["name"], info["method"], info["pool"], info["group"],
                           tuple(info.get("overrides", {}).items()))
    return RunResult(spec, int(info["world"]), info, arrays)


def config_dict(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(config), default=str))
