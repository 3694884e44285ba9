"""``snpo demo``: the paper's comparison, end to end, on the offline toy world.

1. Pretrain (or load from the cache) the toy reference on web-like data.
2. Make Pick-a-Pic-style pairs from reference samples, labelled by the label judge.
3. Align with every method under the same budget (steps x pairs per step, learning rate,
   beta, p), through the same trainer a Stable Diffusion run uses.
4. Sample held-out prompts (DDIM 50 steps, CFG 7.5, several seeds), score with both judges,
   measure blur and the null branch's implicit accuracy on reversed held-out pairs.
5. Write the report folder (``snpo.toy.demo_report``).
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from snpo.backbones.toy import ToyBackbone
from snpo.efficiency import Footprint, method_footprint, npo_footprint
from snpo.errors import ConfigError
from snpo.evaluate.implicit_accuracy import implicit_accuracy
from snpo.merging import merge_denoisers
from snpo.methods import get_method
from snpo.objectives import ObjectiveConfig
from snpo.sampling import SamplerSettings, sample_images
from snpo.toy import scenes as S
from snpo.toy.data import stack_batch
from snpo.toy.judges import (
    edge_sharpness,
    high_frequency_energy,
    make_heldout_judge,
    make_label_judge,
)
from snpo.toy.world import (
    ToyWorldConfig,
    load_or_make_pairs,
    load_or_pretrain_reference,
    split_prompts,
)
from snpo.training.config import TrainConfig
from snpo.training.data import TrainingData
from snpo.training.job import build_job


@dataclass
class RunSpec:
    """One alignment run of the comparison."""

    name: str
    method: str  # a single-network method (snpo.methods)
    mix_lambda: float = 0.9
    mix_scale: float | None = None
    group: str = "main"  # main | mix_scale | lambda | cfg_dropout
    cfg_dropout: float | None = None  # None: the demo's cfg_dropout


@dataclass
class DemoConfig:
    """Settings of ``snpo demo``; ``--quick`` shrinks every size (``quick_overrides``)."""

    output_dir: str = "snpo-demo"  # report.md, results.csv/json, curves, sample grids
    cache_dir: str | None = None  # where the pretrained reference and pairs are cached; null = $SNPO_CACHE or ~/.cache/snpo/toy
    seed: int = 0  # the world: reference pretraining, pairs, labels, training and evaluation seeds
    # the toy world (see ToyWorldConfig)
    pretrain_steps: int = 2500  # denoising steps of the reference's pretraining
    pretrain_images: int = 24_000  # web-like pretraining images
    pairs_per_prompt: int = 16  # preference pairs per training prompt
    heldout_prompts: int = 24  # prompts never trained on (evaluation)
    heldout_pairs_per_prompt: int = 4  # held-out pairs per held-out prompt (implicit accuracy)
    pair_sampling_steps: int = 20  # DDIM steps when sampling the pairs' images
    label_temperature: float = 0.03  # Bradley-Terry noise of the label judge (0 = noiseless labels)
    # alignment (the same for every method)
    train_steps: int = 300  # optimizer steps of every method
    batch_size: int = 16  # pairs per step
    learning_rate: float = 1e-5  # chosen on the DPO baseline (docs/toy.md)
    beta: float = 100.0  # chosen on the DPO baseline (docs/toy.md)
    mix_lambda: float = 0.9  # lambda of bdpo and snpo
    cfg_dropout: float = 0.1  # p of every single-network method (null-branch share)
    methods: tuple[str, ...] = ("sft", "dpo", "bdpo", "snpo-naive", "snpo")  # the single-network methods compared
    lambda_sweep: tuple[float, ...] = (0.5, 0.99)  # with mix_lambda (0.9) and snpo-naive (1.0)
    cfg_dropout_ablation: tuple[float, ...] = (0.5,)  # snpo and dpo again at each of these p
    mix_scale_ablation: bool = True  # snpo again with mix_scale 1 (the raw-MSE reading of the bound)
    dual_baselines: bool = True  # Diff-NPO (before and after merging) and CHATS
    npo_merge_a: float = 1.0  # merged NPO = ref + a (pos - ref) + b (npo - ref); public code: a = b = 1
    npo_merge_b: float = 1.0  # see npo_merge_a
    chats_guidance_scale: float | None = None  # None: guidance_scale - 1 (same extrapolation as CFG)
    # evaluation
    eval_seeds: int = 4  # sampling seeds per held-out prompt
    eval_prompts: int | None = None  # None = every held-out prompt
    sampling_steps: int = 50  # DDIM steps of the evaluation samples (the paper: 50)
    guidance_scale: float = 7.5  # CFG scale of the evaluation samples (the paper: 7.5)
    implicit_draws: int = 8  # (t, noise) draws per held-out pair for implicit accuracy
    grid_prompts: int = 8  # prompts in the sample grids
    show_progress: bool = True  # progress bars

    def validate(self) -> None:
        ObjectiveConfig("snpo", self.beta, self.mix_lambda, None)
        for lam in self.lambda_sweep:
            ObjectiveConfig("snpo", self.beta, lam, None)
        for name, p in [("cfg_dropout", self.cfg_dropout)] + [("cfg_dropout_ablation", q) for q in self.cfg_dropout_ablation]:
            if not 0 <= p < 1:
                raise ConfigError(f"{name}: expected a probability in [0, 1), got {p!r}")
        for name in ("train_steps", "batch_size", "eval_seeds", "sampling_steps", "pretrain_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        for method in self.methods:
            if get_method(method).objective is None:
                raise ConfigError(f"methods: expected single-network methods (the dual-model "
                                  f"baselines run with dual_baselines), got {method!r}")

    def world(self) -> ToyWorldConfig:
        return ToyWorldConfig(
            seed=self.seed, pretrain_steps=self.pretrain_steps, pretrain_images=self.pretrain_images,
            pairs_per_prompt=self.pairs_per_prompt, heldout_prompts=self.heldout_prompts,
            heldout_pairs_per_prompt=self.heldout_pairs_per_prompt,
            pair_sampling_steps=self.pair_sampling_steps, label_temperature=self.label_temperature,
        )

    def runs(self) -> list[RunSpec]:
        runs = [RunSpec(m, m, self.mix_lambda) for m in self.methods]
        if self.mix_scale_ablation and "snpo" in self.methods:
            runs.append(RunSpec("snpo (mix_scale=1)", "snpo", self.mix_lambda, 1.0, "mix_scale"))
        for lam in self.lambda_sweep:
            if lam not in (self.mix_lambda, 1.0):
                runs.append(RunSpec(f"snpo (lambda={lam:g})", "snpo", lam, None, "lambda"))
        for p in self.cfg_dropout_ablation:
            if p != self.cfg_dropout:
                for method in ("snpo", "dpo"):
                    if method in self.methods:
                        runs.append(RunSpec(f"{method} (p={p:g})", method, self.mix_lambda, None,
                                            "cfg_dropout", cfg_dropout=p))
        return runs


#: ``snpo demo --quick``: the whole pipeline in about a minute, numbers meaningless.
QUICK_OVERRIDES = {
    "pretrain_steps": 120, "pretrain_images": 2000, "pairs_per_prompt": 2, "heldout_prompts": 6,
    "heldout_pairs_per_prompt": 2, "pair_sampling_steps": 8, "train_steps": 8, "batch_size": 8,
    "lambda_sweep": (0.5,), "cfg_dropout_ablation": (), "eval_seeds": 2, "eval_prompts": 4, "implicit_draws": 2, "grid_prompts": 4,
}


@dataclass
class ModelEval:
    """Scores of one model on the evaluation prompts x seeds."""

    images: torch.Tensor  # (seeds * prompts, 3, H, W), seed-major
    label: np.ndarray  # (seeds, prompts)
    heldout: np.ndarray  # (seeds, prompts)
    hf_ratio: float  # high-frequency energy / renders: detail AND noise
    sharpness: np.ndarray  # (seeds,) edge sharpness / renders, mean over prompts: lower = blurrier
    null_accuracy: dict | None = None
    sampling_seconds: float = 0.0


class Evaluator:
    """Samples and scores any toy denoiser on the same prompts, seeds and pairs."""

    def __init__(self, backbone: ToyBackbone, reference: torch.nn.Module, prompts: list[str],
                 seeds: list[int], heldout_pairs, config: DemoConfig) -> None:
        self.backbone, self.reference = backbone, reference
        self.prompts, self.seeds, self.config = prompts, seeds, config
        self.heldout_pairs = heldout_pairs
        self.label_judge, self.heldout_judge = make_label_judge(), make_heldout_judge()
        self.all_prompts = [p for _ in seeds for p in prompts]
        self.all_seeds = [s * 10_007 + i for s in seeds for i in range(len(prompts))]
        renders = S.render([S.Scene.from_caption(p) for p in prompts], backbone.config.resolution)
        self.render_hf = float(high_frequency_energy(renders).mean())
        self.sampling = SamplerSettings(config.sampling_steps, config.guidance_scale, "ddim", batch_size=128)

    def images(self, model: torch.nn.Module, guide=None) -> tuple[torch.Tensor, float]:
        c = self.backbone.config
        guide = guide or guide_for("snpo", self.backbone, {"policy": model}, self.config)
        start = time.perf_counter()
        images = sample_images(self.backbone, guide, self.all_prompts, self.all_seeds,
                               (c.latent_channels, c.latent_size, c.latent_size), self.sampling)
        return images, time.perf_counter() - start

    def evaluate(self, model: torch.nn.Module, *, null_model: torch.nn.Module | None = None,
                 guide=None, with_null_accuracy: bool = True) -> ModelEval:
        images, seconds = self.images(model, guide)
        shape = (len(self.seeds), len(self.prompts))
        label = np.asarray(self.label_judge(images, self.all_prompts)).reshape(shape)
        heldout = np.asarray(self.heldout_judge(images, self.all_prompts)).reshape(shape)
        hf = float(high_frequency_energy(images).mean()) / self.render_hf
        sharpness = np.asarray(edge_sharpness(images)).reshape(shape).mean(axis=1)
        null_acc = None
        if with_null_accuracy:
            null_acc = self.null_accuracy(null_model if null_model is not None else model)
        return ModelEval(images, label, heldout, hf, sharpness, null_acc, seconds / len(self.all_prompts))

    def null_accuracy(self, model: torch.nn.Module) -> dict:
        pairs = self.heldout_pairs.dataset()
        batches = [stack_batch([pairs[i] for i in range(s, min(s + 64, len(pairs)))]) for s in range(0, len(pairs), 64)]
        return implicit_accuracy(self.backbone, model, self.reference, batches, branch="null",
                                 reverse=True, draws=self.config.implicit_draws, seed=self.config.seed + 99)


def alignment_config(config: DemoConfig, reference_dir: Path, out_dir: Path, *, method: str = "dpo",
                     mix_lambda: float = 0.9, mix_scale: float | None = None,
                     cfg_dropout: float | None = None) -> TrainConfig:
    """The one training budget every method of the comparison gets."""
    return TrainConfig(
        model_name_or_path=str(reference_dir), output_dir=str(out_dir), method=method,
        beta=config.beta, mix_lambda=mix_lambda, mix_scale=mix_scale,
        cfg_dropout=config.cfg_dropout if cfg_dropout is None else cfg_dropout,
        max_steps=config.train_steps, per_device_train_batch_size=config.batch_size,
        learning_rate=config.learning_rate, lr_scheduler="constant_with_warmup",
        lr_warmup_steps=min(20, config.train_steps // 10), adam_weight_decay=0.0, max_grad_norm=1.0,
        checkpointing_steps=0, report_to="none", seed=config.seed,
    )


@dataclass
class TrainedRun:
    backbone: ToyBackbone
    model: torch.nn.Module  # the trained denoiser, or CHATS' dual module
    history: list[dict]
    seconds: float
    skipped_nonfinite: int

    def networks(self) -> dict[str, torch.nn.Module]:
        """The trained networks by role (``policy``, or CHATS' ``win`` and ``lose``)."""
        if isinstance(self.model, torch.nn.ModuleDict):
            return dict(self.model.items())
        return {"policy": self.model}


def train_method(train_config: TrainConfig, reference_dir: Path, pairs, config: DemoConfig) -> TrainedRun:
    """Align a fresh copy of the reference with ``train_config.method``, through the job
    ``snpo train`` builds (same method registry, speed options and trainer)."""
    backbone = ToyBackbone.from_pretrained(reference_dir)
    job = build_job(train_config, backbone=backbone, data=TrainingData(pairs.dataset(), stack_batch),
                    show_progress=config.show_progress, save_model=False, write_logs=True)
    model = job.built.model if job.built.model is not None else backbone.denoiser
    start = time.perf_counter()
    result = job.trainer.train()
    seconds = time.perf_counter() - start
    model.eval()
    return TrainedRun(backbone, model, result.history, seconds, result.skipped_nonfinite)


def train_single(spec: RunSpec, reference_dir: Path, pairs, config: DemoConfig, out_dir: Path) -> TrainedRun:
    """Align a fresh copy of the reference with one single-network method."""
    train_config = alignment_config(config, reference_dir, out_dir, method=spec.method,
                                    mix_lambda=spec.mix_lambda, mix_scale=spec.mix_scale,
                                    cfg_dropout=spec.cfg_dropout)
    return train_method(train_config, reference_dir, pairs, config)


def guide_for(method: str, backbone: ToyBackbone, networks: dict, config: DemoConfig):
    """The method's own sampling guide (``snpo sample`` uses the same), at the demo's scale."""
    chats_scale = config.chats_guidance_scale if config.chats_guidance_scale is not None else config.guidance_scale - 1
    settings = SimpleNamespace(guidance_scale=config.guidance_scale, chats_guidance_scale=chats_scale,
                               chats_proxy_alpha=0.5)
    return get_method(method).make_guide(backbone, networks, settings)


def run_demo(config: DemoConfig) -> Path:
    """Run the whole comparison and write the report folder; returns its path."""
    from snpo.toy.demo_report import write_report

    config.validate()
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    world = config.world()
    backbone, reference_dir = load_or_pretrain_reference(
        world, Path(config.cache_dir) if config.cache_dir else None, show_progress=config.show_progress)
    timings["reference (pretrain or cache)"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    train_pairs, heldout_pairs = load_or_make_pairs(backbone, reference_dir, world, show_progress=config.show_progress)
    timings["pairs (make or cache)"] = time.perf_counter() - t0

    _, heldout_prompts = split_prompts(world)
    eval_prompts = heldout_prompts[: config.eval_prompts] if config.eval_prompts else heldout_prompts
    seeds = list(range(config.eval_seeds))
    reference = copy.deepcopy(backbone.denoiser).eval().requires_grad_(False)
    evaluator = Evaluator(backbone, reference, eval_prompts, seeds, heldout_pairs, config)

    t0 = time.perf_counter()
    evals: dict[str, ModelEval] = {"reference": evaluator.evaluate(reference, with_null_accuracy=False)}
    timings["evaluation"] = time.perf_counter() - t0
    histories: dict[str, list[dict]] = {}
    run_info: dict[str, dict] = {}
    footprints: dict[str, Footprint] = {}
    trained: dict[str, TrainedRun] = {}

    def record(name: str, run: TrainedRun, ev: ModelEval, info: dict) -> None:
        evals[name] = ev
        if run is not None:
            if info.get("method") != "diff-npo":  # NPO's own run logs by reversed labels
                histories[name] = run.history
            timings["training"] = timings.get("training", 0.0) + run.seconds
        run_info[name] = {"train_seconds": run.seconds if run else None,
                          "pairs_per_second": config.train_steps * config.batch_size / run.seconds if run else None,
                          "skipped_nonfinite": run.skipped_nonfinite if run else 0, **info}

    for spec in config.runs():
        t0 = time.perf_counter()
        run = train_single(spec, reference_dir, train_pairs, config, out / "runs" / _slug(spec.name))
        evaluator.backbone = run.backbone
        record(spec.name, run, evaluator.evaluate(run.model), asdict(spec))
        evaluator.backbone = backbone
        footprints[spec.name] = method_footprint(spec.method, [run.model], run.backbone._reference,
                                                 label=spec.name)
        if spec.name == "dpo" and config.dual_baselines:
            trained["dpo"] = run  # Diff-NPO's positive model
        timings["evaluation"] += time.perf_counter() - t0 - run.seconds

    if config.dual_baselines and "dpo" in trained:
        t0 = time.perf_counter()
        positive = trained["dpo"]
        npo_config = alignment_config(config, reference_dir, out / "runs" / "diff-npo-negative",
                                      method="npo-negative", cfg_dropout=0.0)  # as the public script
        npo_run = train_method(npo_config, reference_dir, train_pairs, config)
        merged = merge_denoisers(reference, positive.model, npo_run.model, config.npo_merge_a, config.npo_merge_b)
        npo_seconds = positive.seconds + npo_run.seconds
        for name, npo_model in [("diff-npo (before merging)", npo_run.model), ("diff-npo (merged)", merged)]:
            guide = guide_for("npo-negative", backbone, {"policy": positive.model, "npo": npo_model}, config)
            ev = evaluator.evaluate(positive.model, null_model=npo_model, guide=guide)
            run = TrainedRun(backbone, npo_model, npo_run.history, npo_seconds, npo_run.skipped_nonfinite)
            record(name, run, ev, {"group": "dual", "method": "diff-npo", "mix_lambda": None,
                                   "merge_a": 0.0 if "before" in name else config.npo_merge_a,
                                   "merge_b": 1.0 if "before" in name else config.npo_merge_b})
        timings["training"] -= positive.seconds  # counted once, with the dpo row
        footprints["diff-npo"] = npo_footprint(
            footprints["dpo"], method_footprint("npo-negative", [npo_run.model], npo_run.backbone._reference),
            positive.model, merged)
        chats_config = alignment_config(config, reference_dir, out / "runs" / "chats", method="chats",
                                        cfg_dropout=0.0)
        chats = train_method(chats_config, reference_dir, train_pairs, config)
        guide = guide_for("chats", backbone, chats.networks(), config)
        ev = evaluator.evaluate(chats.model["win"], guide=guide, with_null_accuracy=False)
        scale = config.chats_guidance_scale if config.chats_guidance_scale is not None else config.guidance_scale - 1
        record("chats", chats, ev, {"group": "dual", "method": "chats", "mix_lambda": None,
                                    "guidance_scale": scale})
        footprints["chats"] = method_footprint("chats", [chats.model["win"], chats.model["lose"]], reference)
        timings["evaluation"] += time.perf_counter() - t0 - npo_run.seconds - chats.seconds
        del trained

    t0 = time.perf_counter()
    write_report(out, config, world, train_pairs, heldout_pairs, evals, histories, run_info, timings,
                 eval_prompts, footprints)
    timings["report"] = time.perf_counter() - t0
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    return out


def _slug(name: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in name).strip("_")
