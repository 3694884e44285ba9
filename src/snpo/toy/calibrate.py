"""Choosing the study's shared budget on DPO alone, on training prompts alone, by a fixed rule.

``snpo demo --calibrate true`` trains DPO at every (learning rate, beta) of the grid in a
CALIBRATION world (its own seed, never one the study reports), scores each against the
reference on TRAINING prompts of that world (the study's evaluation prompts are held out in
every world), and picks by the rule written in docs/toy.md before any comparison was run:

    choose the setting whose DPO - reference gain is largest on the WORSE of the two judges
    (estimates of the paired differences); among settings within ``tie`` of the best, the
    larger beta (the stronger anchor to the reference), then the smaller learning rate.

No other method is trained here, and nothing here is looked at per method. The chosen values
become ``DemoConfig``'s defaults by hand, with this file's output quoted in docs/toy.md.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from snpo.evaluate.aggregate import markdown_table
from snpo.toy import stats as S
from snpo.toy.evaluator import Evaluator
from snpo.toy.study import RunSpec, prepare_world, run_all, world_config

GRID = ((3e-6, 50.0), (3e-6, 200.0), (3e-6, 1000.0), (1e-5, 50.0), (1e-5, 200.0), (1e-5, 1000.0),
        (3e-5, 50.0), (3e-5, 200.0), (3e-5, 1000.0))
TIE = 0.002


def choose(gains: dict[tuple[float, float], dict[str, float]], tie: float = TIE) -> tuple[float, float]:
    """The rule (module docstring): ``gains[(lr, beta)] = {judge: DPO - reference}``."""
    worst = {setting: min(g.values()) for setting, g in gains.items()}
    best = max(worst.values())
    near = [s for s, w in worst.items() if w >= best - tie]
    return sorted(near, key=lambda s: (-s[1], s[0]))[0]


def calibration_run(config: Any, lr: float, beta: float) -> dict[str, Any]:
    """DPO at (lr, beta) in the calibration world, scored on training prompts."""
    import torch

    from snpo.toy.data import stack_batch
    from snpo.toy.world import (
        POOLS,
        load_or_make_pairs,
        load_or_pretrain_reference,
        load_toy,
        split_prompts,
    )
    from snpo.training.data import TrainingData
    from snpo.training.job import build_job

    world = world_config(config, config.calibration_seed)
    cache = Path(config.cache_dir) if config.cache_dir else None
    backbone, reference_dir = load_or_pretrain_reference(world, cache, show_progress=False)
    pairs, heldout_pairs = load_or_make_pairs(reference_dir, world, POOLS[config.primary_pool], show_progress=False)
    train_prompts, _ = split_prompts(world)
    prompts = list(np.random.default_rng(config.calibration_seed).permutation(train_prompts)[: config.heldout_prompts])
    reference = copy.deepcopy(backbone.denoiser).eval().requires_grad_(False)
    evaluator = Evaluator(backbone, reference, prompts, list(range(2)), heldout_pairs,
                          steps=config.sampling_steps, guidance_scale=config.guidance_scale,
                          implicit_draws=1, seed=config.seed)
    ref_eval = evaluator.evaluate(reference, with_null_accuracy=False)
    from snpo.toy.study import alignment_config

    spec = RunSpec(f"dpo lr={lr:g} beta={beta:g}", "dpo", config.primary_pool)
    out = Path(config.output_dir) / "calibration" / spec.slug
    policy = load_toy(reference_dir)
    train_config = alignment_config(replace(config, learning_rate=lr, beta=beta), reference_dir, out, spec)
    job = build_job(train_config, backbone=policy, data=TrainingData(pairs.dataset(), stack_batch),
                    show_progress=False, save_model=False, write_logs=False)
    job.trainer.train()
    policy.denoiser.eval()
    evaluator.backbone = policy
    with torch.no_grad():
        ev = evaluator.evaluate(policy.denoiser, with_null_accuracy=False)
    gains = {j: S.bootstrap_interval(S.paired_differences([getattr(ev, j)], [getattr(ref_eval, j)])).as_dict()
             for j in ("label", "heldout")}
    return {"lr": lr, "beta": beta, "gains": gains}


def run_calibration(config: Any) -> Path:
    """Every grid setting (in worker processes), then the rule's choice; writes
    ``<output_dir>/calibration.md`` and ``.json``."""
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    prepare_world(config, config.calibration_seed, (config.primary_pool,))
    results = run_all([(calibration_run, config, lr, beta) for lr, beta in GRID], config.resolved_workers())
    gains = {(r["lr"], r["beta"]): {j: r["gains"][j]["estimate"] for j in r["gains"]} for r in results}
    lr, beta = choose(gains)
    rows = [[f"{r['lr']:g}", f"{r['beta']:g}",
             *(str(S.Interval(**{k: r["gains"][j][k] for k in ("estimate", "low", "high", "worlds", "units")}))
               for j in ("label", "heldout")),
             f"{min(gains[(r['lr'], r['beta'])].values()):+.4f}"] for r in results]
    md = ["# Calibration of the toy study's budget (DPO alone, training prompts alone)\n",
          f"World seed {config.calibration_seed} (not a study world), regime {config.primary_pool}, "
          f"{config.train_steps} steps of {config.batch_size} pairs, p = {config.cfg_dropout:g}. Scores on "
          f"{config.heldout_prompts} TRAINING prompts x 2 seeds; DPO - reference, paired, 95% interval.\n",
          markdown_table(["lr", "beta", "label judge gain [95%]", "held-out judge gain [95%]", "worse of the two"],
                         rows), "",
          f"Rule: the largest gain on the worse judge; within {TIE} of the best, the larger beta, then the "
          f"smaller learning rate. **Chosen: learning rate {lr:g}, beta {beta:g}.**\n"]
    (out / "calibration.md").write_text("\n".join(md))
    (out / "calibration.json").write_text(json.dumps({"results": results, "chosen": {"lr": lr, "beta": beta}},
                                                     indent=1))
    return out / "calibration.md"
