"""``snpo demo``: the paper's comparison, end to end, on the offline toy world, as an experiment.

1. For each world seed: pretrain (or load from the cache) the toy reference, its weaker and
   stronger siblings, and the pairs of each regime (``pools``: on-policy, Pick-a-Pic-like).
2. In each world and regime, align the reference with every method under ONE budget
   (steps x pairs per step, learning rate, beta, p), chosen on DPO alone by the rule in
   docs/toy.md, through the same job builder a Stable Diffusion run uses.
3. Score every model on held-out prompts (both judges, blur, the null branch's implicit
   accuracy on reversed held-out pairs).
4. Report (``snpo.toy.demo_report``): first the instrument check (does DPO beat the reference
   at all?), then each claim's verdict with its 95% interval and the rule that produced it.

``--quick`` runs everything at toy sizes in about a minute: its numbers carry no evidence and
its report gives no verdicts. ``--worlds 3 --ablations true`` is the full study (about an
hour on a 2-core CPU; docs/toy.md).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from snpo.errors import ConfigError
from snpo.methods import get_method
from snpo.objectives import ObjectiveConfig
from snpo.toy.study import (
    RunSpec,
    load_result,
    npo_rows,
    prepare_world,
    run_all,
    run_dir,
    train_and_evaluate,
)
from snpo.toy.world import POOLS


@dataclass
class DemoConfig:
    """Settings of ``snpo demo``; ``--quick`` shrinks every size (``QUICK_OVERRIDES``)."""

    output_dir: str = "snpo-demo"  # report.md, results.csv/json, curves, sample grids, worlds/ (per-run results)
    cache_dir: str | None = None  # where the pretrained references and pairs are cached; null = $SNPO_CACHE or ~/.cache/snpo/toy
    seed: int = 0  # the first world's seed (worlds: seed, seed+1, ...); also training and evaluation seeds
    worlds: int = 1  # world seeds to run and pool (each: its own reference, generators and pairs)
    workers: int = 0  # worker processes for independent runs; 0 = one per CPU core (at most 4)
    threads: int = 1  # torch threads per process; the toy model gains little from more, and spinning threads on a busy machine cost much (0 = torch's default)
    # the toy world (see ToyWorldConfig)
    pretrain_steps: int = 2500  # denoising steps of the reference's pretraining
    pretrain_images: int = 24_000  # web-like pretraining images
    strong_steps: int = 600  # the stronger generator: the reference trained this long on clean data
    pairs_per_prompt: int = 16  # preference pairs per training prompt
    heldout_prompts: int = 24  # prompts never trained on (evaluation)
    heldout_pairs_per_prompt: int = 4  # held-out pairs per held-out prompt (implicit accuracy)
    pair_sampling_steps: int = 20  # sampler steps (DDIM; Euler with flow) for the pairs' images
    label_temperature: float = 0.03  # Bradley-Terry noise of the label judge (0 = noiseless labels)
    pools: tuple[str, ...] = ("pickapic-like", "on-policy")  # regimes (where the pairs' images come from); the first is primary
    # alignment (the same for every method)
    train_steps: int = 300  # optimizer steps of every method
    batch_size: int = 16  # pairs per step
    learning_rate: float = 3e-5  # chosen on DPO alone by the rule in docs/toy.md (docs/toy/calibration.md)
    beta: float = 1000.0  # chosen on DPO alone by the rule in docs/toy.md (docs/toy/calibration.md)
    mix_lambda: float = 0.9  # lambda of bdpo and snpo
    cfg_dropout: float = 0.2  # p of every single-network method (null-branch share), as the Diffusion-DPO code
    methods: tuple[str, ...] = ("sft", "dpo", "bdpo", "snpo-naive", "snpo")  # single-network methods, in every regime
    dual_baselines: bool = True  # Diff-NPO (before and after merging) and CHATS, in the primary regime
    npo_lora_rank: int = 8  # Diff-NPO's NPO model is a LoRA offset of this rank, as its public code (0 = full fine-tune)
    npo_merge_a: float = 1.0  # merged NPO = ref + a (pos - ref) + b (npo - ref); public code: a = b = 1
    npo_merge_b: float = 1.0  # see npo_merge_a
    chats_guidance_scale: float | None = None  # None: guidance_scale - 1 (same extrapolation as CFG)
    beyond_paper: bool = False  # also snpo and dpo with Diffusion-SDPO's safeguard, Diffusion-KTO and MaPO (primary regime, same budget)
    # ablations (primary regime): p, mix_scale readings, mix_lambda, the long collapse run
    ablations: bool = False  # run the ablations below
    cfg_dropout_ablation: tuple[float, ...] = (0.1, 0.5)  # snpo and dpo again at each of these p
    lambda_sweep: tuple[float, ...] = (0.5, 0.99)  # snpo again at each lambda (with mix_lambda and snpo-naive = 1)
    collapse_steps: int = 900  # naive and bounded SNPO trained this long, blur measured along the way
    # the budget: chosen on DPO alone (snpo.toy.calibrate; docs/toy.md)
    calibrate: bool = False  # instead of the study: train DPO over the grid in the calibration world, pick by the rule
    calibration_seed: int = 1000  # the calibration world (never a study world)
    # verdicts
    noninferiority_margin: float = 0.01  # a "not worse" claim holds when the interval lies above -margin (both judges)
    # evaluation
    eval_seeds: int = 4  # sampling seeds per held-out prompt
    eval_prompts: int | None = None  # None = every held-out prompt
    sampling_steps: int = 50  # sampler steps (DDIM; Euler with flow) of the evaluation samples (the paper: 50 DDIM)
    guidance_scale: float = 7.5  # CFG scale of the evaluation samples (the paper: 7.5)
    implicit_draws: int = 8  # (t, noise) draws per held-out pair for implicit accuracy
    grid_prompts: int = 8  # prompts in the sample grids
    quick: bool = False  # toy sizes: checks the pipeline in about a minute; no evidence, no verdicts
    flow: bool = False  # the flow-matching toy (rectified flow, Euler sampling; how SD3/FLUX train) instead of the DDPM toy
    show_progress: bool = True  # progress bars

    def validate(self) -> None:
        ObjectiveConfig("snpo", self.beta, self.mix_lambda, None)
        for lam in self.lambda_sweep:
            ObjectiveConfig("snpo", self.beta, lam, None)
        for name, p in [("cfg_dropout", self.cfg_dropout)] + [("cfg_dropout_ablation", q) for q in self.cfg_dropout_ablation]:
            if not 0 <= p < 1:
                raise ConfigError(f"{name}: expected a probability in [0, 1), got {p!r}")
        for name in ("train_steps", "batch_size", "eval_seeds", "sampling_steps", "pretrain_steps", "worlds",
                     "collapse_steps", "strong_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}: expected an integer >= 1, got {getattr(self, name)!r}")
        if self.calibration_seed in self.world_seeds:
            raise ConfigError(f"calibration_seed: {self.calibration_seed} is also a study world; the budget "
                              "must be chosen in a world the study does not report")
        if self.workers < 0:
            raise ConfigError(f"workers: expected an integer >= 0 (0 = one per core), got {self.workers!r}")
        if self.noninferiority_margin < 0:
            raise ConfigError(f"noninferiority_margin: expected a number >= 0, got {self.noninferiority_margin!r}")
        for pool in self.pools:
            if pool not in POOLS:
                raise ConfigError(f"pools: expected some of {', '.join(POOLS)}, got {pool!r}")
        if not self.pools:
            raise ConfigError("pools: expected at least one regime")
        for method in self.methods:
            if get_method(method).objective is None:
                raise ConfigError(f"methods: expected single-network methods (the dual-model "
                                  f"baselines run with dual_baselines), got {method!r}")

    @property
    def primary_pool(self) -> str:
        return self.pools[0]

    @property
    def world_seeds(self) -> list[int]:
        return [self.seed + i for i in range(self.worlds)]

    def resolved_workers(self) -> int:
        if self.workers:
            return self.workers
        import os

        return max(1, min(4, os.cpu_count() or 1))

    def runs(self) -> list[RunSpec]:
        """Every run of one world (the reference is scored as a run with no method)."""
        runs = [RunSpec("reference", None, self.primary_pool, "reference")]
        for pool in self.pools:
            for m in self.methods:
                runs.append(RunSpec(m, m, pool, "main", keep_model=(m == "dpo" and self.dual_baselines)))
        primary = self.primary_pool
        if self.dual_baselines:
            # as the public Diff-NPO code: a rank-8 LoRA offset, prompt never dropped (docs/toy.md
            # shows why a fully fine-tuned NPO model cannot serve another network's null branch)
            runs.append(RunSpec("npo-negative", "npo-negative", primary, "component",
                                (("cfg_dropout", 0.0), ("lora_rank", self.npo_lora_rank)),
                                keep_model=True))  # scored as the two diff-npo rows
            runs.append(RunSpec("chats", "chats", primary, "dual", (("cfg_dropout", 0.0),)))
        if self.beyond_paper:  # docs/method.md "Beyond the paper"; KTO: the pairs as 2 x batch labelled images
            runs += [RunSpec("snpo+safeguard", "snpo", primary, "beyond", (("safeguard", True),)),
                     RunSpec("dpo+safeguard", "dpo", primary, "beyond", (("safeguard", True),)),
                     RunSpec("kto", "kto", primary, "beyond", (("per_device_train_batch_size", 2 * self.batch_size),)),
                     RunSpec("mapo", "mapo", primary, "beyond")]
        if not self.ablations:
            return runs
        for p in self.cfg_dropout_ablation:
            if p != self.cfg_dropout:
                for m in ("snpo", "dpo"):
                    runs.append(RunSpec(f"{m} (p={p:g})", m, primary, "p", (("cfg_dropout", p),)))
        # the likelihood scale k of the bound: beta/2 is the main row; 1 (raw per-element MSE);
        # the literal per-pixel-sum scale of the paper's formula, d = T ||eps - eps_theta||^2
        # summed over the latent's D elements: k = T * D
        literal = self.literal_mix_scale()
        runs.append(RunSpec("snpo (mix_scale=1)", "snpo", primary, "mix_scale", (("mix_scale", 1.0),)))
        runs.append(RunSpec("snpo (mix_scale=T*D)", "snpo", primary, "mix_scale", (("mix_scale", literal),)))
        for lam in self.lambda_sweep:
            if lam not in (self.mix_lambda, 1.0):
                runs.append(RunSpec(f"snpo (lambda={lam:g})", "snpo", primary, "lambda", (("mix_lambda", lam),)))
        every = max(1, self.collapse_steps // 6)
        for m in ("snpo-naive", "snpo"):
            runs.append(RunSpec(f"{m} (long)", m, primary, "collapse", (("max_steps", self.collapse_steps),),
                                trajectory_every=every))
        return runs

    @staticmethod
    def literal_mix_scale() -> float:
        """``T * D``: the toy's training timesteps times its latent's elements."""
        from snpo.backbones.toy import ToyModelConfig

        m = ToyModelConfig()
        return float(m.num_train_timesteps * m.latent_channels * m.latent_size ** 2)


#: ``snpo demo --quick``: the whole pipeline in about a minute, numbers meaningless.
QUICK_OVERRIDES = {
    "quick": True, "pretrain_steps": 120, "pretrain_images": 2000, "strong_steps": 20, "pairs_per_prompt": 2,
    "heldout_prompts": 6, "heldout_pairs_per_prompt": 2, "pair_sampling_steps": 8, "train_steps": 8,
    "batch_size": 8, "collapse_steps": 12, "eval_seeds": 2, "eval_prompts": 4, "implicit_draws": 2,
    "grid_prompts": 4, "workers": 1, "sampling_steps": 10,
}


def run_demo(config: DemoConfig) -> Path:
    """Run every world's runs (resumable: finished runs are kept) and write the report."""
    from snpo.toy.demo_report import write_report

    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.calibrate:
        from snpo.toy.calibrate import run_calibration

        return run_calibration(config).parent
    torch.manual_seed(config.seed)
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "demo_config.json").write_text(json.dumps(_config_dict(config), indent=1))
    workers = config.resolved_workers()
    timings: dict[str, float] = {}
    start = time.perf_counter()
    worlds = config.world_seeds
    pools = tuple(config.pools)
    setup = run_all([(prepare_world, config, w, pools) for w in worlds], workers)
    timings["worlds (reference, generators, pairs; cached after the first run)"] = time.perf_counter() - start

    start = time.perf_counter()
    specs = config.runs()
    folders = run_all([(train_and_evaluate, config, w, s) for w in worlds for s in specs], workers)
    if config.dual_baselines:
        folders += [f for fs in run_all([(npo_rows, config, w, config.primary_pool) for w in worlds], workers)
                    for f in fs]
    timings["runs (training and evaluation)"] = time.perf_counter() - start

    results = [load_result(Path(f)) for f in folders]
    start = time.perf_counter()
    write_report(out, config, results, {w: s for w, s in zip(worlds, setup)}, timings, workers)
    timings["report"] = time.perf_counter() - start
    (out / "timings.json").write_text(json.dumps(timings, indent=2))
    return out


def _config_dict(config: DemoConfig) -> dict:
    from dataclasses import asdict

    return json.loads(json.dumps(asdict(config), default=str))


__all__ = ["QUICK_OVERRIDES", "DemoConfig", "RunSpec", "run_demo", "run_dir"]
