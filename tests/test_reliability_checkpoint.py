"""Atomic checkpoints, on the tiny toy model in-process (fast): a crash at every point of a
checkpoint write leaves ``latest`` on a complete checkpoint that loads and resumes exactly;
pruning happens only after the new checkpoint is committed; a damaged ``latest`` pointer
falls back to the newest complete checkpoint; the states round-trip exactly through
safetensors + JSON. (The same faults with a real SIGKILL: ``test_reliability_kill.py``.) The
exact-resume tests also run on a tiny SD3 pipeline (rectified flow: its sigma draws replay)."""

from __future__ import annotations

import copy
import json
import math
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import colour_pairs
from snpo.methods.single import SingleNetworkMethod
from snpo.toy.data import stack_batch
from snpo.training import checkpoint as ckpt
from snpo.training.config import TrainConfig
from snpo.training.trainer import Trainer, truncate_metrics

COMMON = dict(method="snpo", cfg_dropout=0.3, per_device_train_batch_size=4, learning_rate=1e-3,
              lr_scheduler="linear", lr_warmup_steps=2, beta=500.0, max_steps=6, report_to="none", seed=0)


class Crash(Exception):
    """Stands in for a kill: nothing after the raise runs (checkpoint code has no cleanup)."""


def run(backbone, out: Path, data, **overrides):
    config = TrainConfig(output_dir=str(out), **{**COMMON, "checkpointing_steps": 2, **overrides})
    method = SingleNetworkMethod(backbone, config.objective_config, config.cfg_dropout)
    return Trainer(config, backbone, data, method, collate_fn=stack_batch, show_progress=False,
                   save_model=True, write_logs=False).train()


def assert_same_weights(a, b) -> None:
    sa, sb = a.denoiser.state_dict(), b.denoiser.state_dict()
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.fixture
def straight(request, tiny_toy, tmp_path):
    """A copy of the fresh model and the same model trained 6 steps without interruption (the
    tiny toy, or with ``indirect`` parameter "sd3" a tiny SD3 pipeline, full fine-tune)."""
    backbone = tiny_toy
    if getattr(request, "param", "toy") == "sd3":
        from snpo.backbones import load_backbone
        from tiny_pipelines import make_sd3

        # trained as a copy, like the resumed runs: the model loaded from safetensors and a
        # deepcopy of it train equal to about 1e-7, not bitwise (two copies train bitwise)
        backbone = copy.deepcopy(load_backbone(make_sd3(tmp_path / "sd3"), options={"max_sequence_length": 8}))
    fresh = copy.deepcopy(backbone)
    run(backbone, tmp_path / "straight", colour_pairs(12), checkpointing_steps=0)
    return fresh, backbone


def inject(monkeypatch, point: str, step: int) -> None:
    """Raise ``Crash`` at ``point`` of the write of ``checkpoint-<step>``."""
    target = f"checkpoint-{step}"
    save_object, write_text, discard, replace = ckpt.save_object, ckpt.atomic_write_text, ckpt._discard, ckpt.os.replace

    def save_object_or_crash(path, obj):
        if point == "after_model" and path.parent.name == f"{target}.tmp" and path.name == ckpt.OPTIMIZER_FILE:
            raise Crash
        save_object(path, obj)

    def write_text_or_crash(path, text):
        if point == "before_state" and path.parent.name == f"{target}.tmp" and path.name == ckpt.STATE_FILE:
            raise Crash
        if point == "before_latest" and path.name == "latest" and text == target:
            raise Crash
        write_text(path, text)

    def replace_or_crash(src, dst):
        if point == "before_rename" and Path(src).name == f"{target}.tmp":
            raise Crash
        replace(src, dst)

    def discard_or_crash(path):
        if point == "during_prune" and (path.parent / "latest").read_text() == target:
            replace(path, path.with_name(path.name + ".deleting"))  # renamed, not yet deleted
            raise Crash
        discard(path)

    monkeypatch.setattr(ckpt, "save_object", save_object_or_crash)
    monkeypatch.setattr(ckpt, "atomic_write_text", write_text_or_crash)
    monkeypatch.setattr(ckpt.os, "replace", replace_or_crash)
    monkeypatch.setattr(ckpt, "_discard", discard_or_crash)


@pytest.mark.parametrize("point", ["after_model", "before_state", "before_rename", "before_latest", "during_prune"])
def test_crash_anywhere_in_a_checkpoint_write_keeps_a_loadable_checkpoint(straight, tmp_path, monkeypatch, point):
    fresh, trained = straight
    out = tmp_path / "run"
    data = colour_pairs(12)
    with monkeypatch.context() as patch:
        inject(patch, point, step=4)
        with pytest.raises(Crash):
            run(copy.deepcopy(fresh), out, data, checkpoints_total_limit=1)
    root = out / "checkpoints"
    committed = point == "during_prune"
    expected = "checkpoint-4" if committed else "checkpoint-2"
    assert (root / "latest").read_text() == expected
    assert ckpt.resolve_checkpoint(root, "latest") == root / expected
    assert [s for s, _ in ckpt.list_checkpoints(root)] == ([4] if committed else [2, 4] if point == "before_latest" else [2])
    assert ckpt.read_state(root / expected)["global_step"] == int(expected.split("-")[1])

    resumed = copy.deepcopy(fresh)
    result = run(resumed, out, data, checkpoints_total_limit=1, resume_from_checkpoint="latest")
    assert result.global_step == 6
    assert_same_weights(trained, resumed)
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [6]
    assert not [p for p in root.iterdir() if p.name.endswith((".tmp", ".deleting"))]


def test_pruning_happens_only_after_the_new_checkpoint_is_committed(tiny_toy, tmp_path, monkeypatch):
    out = tmp_path / "run"
    root = out / "checkpoints"
    seen = []
    discard = ckpt._discard

    def checked_discard(path):
        latest = (root / "latest").read_text()
        newest = ckpt.list_checkpoints(root)[-1][1].name
        seen.append((path.name, latest))
        assert latest == newest != path.name  # committed, complete, and not the one removed
        assert (root / latest / ckpt.STATE_FILE).is_file()
        discard(path)

    monkeypatch.setattr(ckpt, "_discard", checked_discard)
    run(tiny_toy, out, colour_pairs(12), checkpointing_steps=1, checkpoints_total_limit=2)
    assert seen == [(f"checkpoint-{s}", f"checkpoint-{s + 2}") for s in range(1, 5)]
    assert [s for s, _ in ckpt.list_checkpoints(root)] == [5, 6]


def test_damaged_latest_pointer_falls_back_to_the_newest_complete_checkpoint(tiny_toy, tmp_path):
    out = tmp_path / "run"
    run(tiny_toy, out, colour_pairs(12))
    root = out / "checkpoints"
    (root / "checkpoint-7.tmp").mkdir()  # an interrupted write: never a candidate
    for pointer in ["", "garbage", "../../../etc", "checkpoint-9", "checkpoint-7.tmp"]:
        (root / "latest").write_text(pointer)
        assert ckpt.resolve_checkpoint(root, "latest") == root / "checkpoint-6", pointer
    (root / "latest").unlink()
    assert ckpt.resolve_checkpoint(root, "latest") == root / "checkpoint-6"
    assert ckpt.resolve_checkpoint(tmp_path / "nothing", "latest") is None
    with pytest.raises(ckpt.CheckpointError, match="resume_from_checkpoint: 'checkpoint-7.tmp' is not a complete"):
        ckpt.resolve_checkpoint(root, "checkpoint-7.tmp")


@pytest.mark.parametrize("straight", ["toy", "sd3"], indirect=True)
def test_resume_from_an_older_checkpoint_replays_and_replaces_the_newer_ones(straight, tmp_path):
    fresh, trained = straight
    out = tmp_path / "run"
    data = colour_pairs(12)
    run(copy.deepcopy(fresh), out, data)
    root = out / "checkpoints"
    before = {s: ckpt.load_object(p / ckpt.OPTIMIZER_FILE) for s, p in ckpt.list_checkpoints(root)}
    resumed = copy.deepcopy(fresh)
    run(resumed, out, data, resume_from_checkpoint=str(root / "checkpoint-2"))
    assert_same_weights(trained, resumed)
    after = {s: ckpt.load_object(p / ckpt.OPTIMIZER_FILE) for s, p in ckpt.list_checkpoints(root)}
    assert after.keys() == before.keys() == {2, 4, 6}
    for step in after:  # rewritten by the replay, identical
        for index, state in after[step]["state"].items():
            assert all(torch.equal(v, before[step]["state"][index][k]) for k, v in state.items())


@pytest.mark.parametrize("straight", ["toy", "sd3"], indirect=True)
def test_exact_replay_does_not_need_the_global_rng(straight, tmp_path, monkeypatch):
    """Noise, timesteps, branch labels and data order come from per-pair seeds: a resumed
    run whose global RNG is NOT restored (and scrambled) still replays bitwise."""
    fresh, trained = straight
    out = tmp_path / "run"
    data = colour_pairs(12)

    class Stop(Exception):
        pass

    class KillAfterCheckpoint(Trainer):
        def _save_checkpoint(self, accelerator, root, step):
            super()._save_checkpoint(accelerator, root, step)
            if step == 2:
                raise Stop

    config = TrainConfig(output_dir=str(out), checkpointing_steps=2, **COMMON)
    first = copy.deepcopy(fresh)
    with pytest.raises(Stop):
        KillAfterCheckpoint(config, first, data, SingleNetworkMethod(first, config.objective_config, 0.3),
                            collate_fn=stack_batch, show_progress=False, write_logs=False).train()
    def scramble(state):  # instead of restoring the saved states, at the moment of the resume
        torch.manual_seed(12345)
        np.random.seed(54321)
        random.seed(999)

    monkeypatch.setattr(ckpt, "set_rng_state", scramble)
    resumed = copy.deepcopy(fresh)
    run(resumed, out, data, resume_from_checkpoint="latest")
    assert_same_weights(trained, resumed)


def test_training_states_round_trip_exactly_as_safetensors_and_json(tmp_path):
    param = torch.nn.Parameter(torch.randn(3, 2))
    optimizer = torch.optim.AdamW([param], lr=1e-3, betas=(0.9, 0.99))
    param.grad = torch.randn(3, 2)
    optimizer.step()
    state = {"optimizer": optimizer.state_dict(), "tuple": (1, 2.5, None), "ints": {0: "a", 7: [1, 2]},
             "nan": math.nan, "inf": -math.inf, "array": np.arange(4, dtype=np.uint32),
             "rng": ckpt.rng_state()}
    ckpt.save_object(tmp_path / "state.safetensors", state)
    back = ckpt.load_object(tmp_path / "state.safetensors")
    assert back["tuple"] == (1, 2.5, None) and back["ints"] == {0: "a", 7: [1, 2]}
    assert math.isnan(back["nan"]) and back["inf"] == -math.inf
    assert back["array"].dtype == np.uint32 and back["array"].tolist() == [0, 1, 2, 3]
    saved, loaded = optimizer.state_dict(), back["optimizer"]
    assert loaded["param_groups"] == saved["param_groups"]
    assert all(torch.equal(v, saved["state"][0][k]) for k, v in loaded["state"][0].items())
    ckpt.set_rng_state(back["rng"])  # restores what it saved
    assert torch.equal(torch.get_rng_state(), state["rng"]["torch"])
    with pytest.raises(TypeError, match="cannot save a object"):
        ckpt.save_object(tmp_path / "bad.safetensors", {"x": object()})  # would need pickle


def test_metrics_log_keeps_each_step_once_after_a_kill(tmp_path):
    metrics = tmp_path / "metrics.jsonl"
    lines = [json.dumps({"step": s, "loss": 0.1 * s}) for s in range(1, 6)]
    metrics.write_text("\n".join(lines) + '\n{"step": 6, "lo')  # killed while writing step 6
    truncate_metrics(metrics, 4)  # resumed from checkpoint-4: steps 5 and 6 are replayed
    assert [json.loads(line)["step"] for line in metrics.read_text().splitlines()] == [1, 2, 3, 4]
