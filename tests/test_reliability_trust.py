"""Trust boundaries: checkpoints and caches are safetensors or plain data and are never
unpickled; a pickle planted in a checkpoint folder is never opened; a checkpoint written by
another model, objective or batch layout, or a damaged one, is refused with one line.
(A cache built for another model or transform: ``test_cache.py::
test_stale_incomplete_or_missing_cache_is_refused_in_one_line``; a checkpoint of another run
through ``snpo train``: ``test_reliability_config.py``.)"""

from __future__ import annotations

import ast
import copy
import json
import pickle
from pathlib import Path

import pytest
import torch

from conftest import colour_pairs
from snpo.methods.single import SingleNetworkMethod
from snpo.toy.data import stack_batch
from snpo.training import checkpoint as ckpt
from snpo.training.config import TrainConfig
from snpo.training.trainer import Trainer

SRC = Path(__file__).resolve().parents[1] / "src" / "snpo"
UNSAFE_MODULES = {"dill", "cloudpickle", "joblib", "shelve", "marshal", "jsonpickle"}
PLANTED = ["optimizer.bin", "scheduler.bin", "random_states_0.pkl", "pytorch_model.bin", "model.bin",
           "custom_checkpoint_0.pkl", "sampler.bin", "scaler.pt"]


def _unsafe_calls(tree: ast.AST, path: Path) -> list[str]:
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import | ast.ImportFrom):
            names = [a.name for a in node.names]
            module = getattr(node, "module", None) or ""
            roots = {n.split(".")[0] for n in names} | {module.split(".")[0]}
            if roots & UNSAFE_MODULES:
                found.append(f"{path}:{node.lineno}: imports {sorted(roots & UNSAFE_MODULES)}")
            if module in ("torch", "pickle", "numpy") and {"load", "loads", "Unpickler"} & set(names):
                found.append(f"{path}:{node.lineno}: from {module} import {names}")
        if not isinstance(node, ast.Call) or not isinstance(node.func, ast.Attribute):
            continue
        owner = node.func.value.id if isinstance(node.func.value, ast.Name) else None
        keywords = {k.arg: k.value for k in node.keywords}
        if owner == "torch" and node.func.attr == "load":
            weights_only = keywords.get("weights_only")
            if not (isinstance(weights_only, ast.Constant) and weights_only.value is True):
                found.append(f"{path}:{node.lineno}: torch.load without weights_only=True")
        if owner == "pickle" and node.func.attr in ("load", "loads", "Unpickler"):
            found.append(f"{path}:{node.lineno}: pickle.{node.func.attr}")
        if owner in ("np", "numpy") and node.func.attr == "load":
            allow = keywords.get("allow_pickle")
            if allow is not None and not (isinstance(allow, ast.Constant) and allow.value is False):
                found.append(f"{path}:{node.lineno}: np.load with allow_pickle")
        if node.func.attr == "load_state" and path.name != "checkpoint.py":
            found.append(f"{path}:{node.lineno}: accelerator.load_state outside checkpoint.py")
    return found


def test_no_code_in_src_can_unpickle_a_file():
    """torch.load only with weights_only=True (user-supplied scorer weights exist only as .pt),
    no pickle/dill/joblib loading at all, accelerate's loader only for FSDP/DeepSpeed."""
    probe = "import dill\nimport torch, pickle\ntorch.load(f)\ntorch.load(f, weights_only=False)\npickle.loads(b)\n"
    assert len(_unsafe_calls(ast.parse(probe), Path("probe.py"))) == 4  # the scan does find them
    files = sorted(SRC.rglob("*.py"))
    assert len(files) > 20
    found = [hit for path in files for hit in _unsafe_calls(ast.parse(path.read_text()), path.relative_to(SRC))]
    assert found == []


class Planted:
    """A pickle that creates a file when it is unpickled: the classic code-execution hole."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def train(backbone, out: Path, **overrides):
    values = dict(output_dir=str(out), max_steps=4, per_device_train_batch_size=4, learning_rate=1e-3,
                  beta=500.0, method="snpo", cfg_dropout=0.3, report_to="none", checkpointing_steps=2)
    values.update(overrides)
    config = TrainConfig(**values)
    method = SingleNetworkMethod(backbone, config.objective_config, config.cfg_dropout)
    return Trainer(config, backbone, colour_pairs(8), method, collate_fn=stack_batch, show_progress=False,
                   write_logs=False).train()


@pytest.fixture
def checkpointed(tiny_toy, tmp_path):
    """A fresh model, and a run directory holding checkpoint-2 and checkpoint-4."""
    fresh = copy.deepcopy(tiny_toy)
    train(tiny_toy, tmp_path / "run")
    return fresh, tmp_path / "run"


def test_checkpoints_hold_only_safetensors_and_json(checkpointed):
    _, out = checkpointed
    for _, folder in ckpt.list_checkpoints(out / "checkpoints"):
        suffixes = {p.suffix for p in folder.iterdir()}
        assert suffixes <= {".safetensors", ".json"}, suffixes
        assert json.loads((folder / ckpt.STATE_FILE).read_text())["format"] == ckpt.FORMAT


def test_planted_pickles_in_a_checkpoint_are_never_opened(checkpointed, tmp_path, monkeypatch):
    fresh, out = checkpointed
    marker = tmp_path / "pwned"
    latest = ckpt.resolve_checkpoint(out / "checkpoints", "latest")
    for name in PLANTED:  # what accelerate's save_state would have written, now malicious
        (latest / name).write_bytes(pickle.dumps(Planted(marker)))
    pickle.loads((latest / "optimizer.bin").read_bytes()).close()  # it does bite when unpickled
    assert marker.exists()
    marker.unlink()

    def forbidden(*args, **kwargs):
        raise AssertionError("a checkpoint was unpickled")

    for target, name in [(torch, "load"), (pickle, "load"), (pickle, "loads")]:
        monkeypatch.setattr(target, name, forbidden)
    result = train(copy.deepcopy(fresh), out, max_steps=6, resume_from_checkpoint="latest")
    assert result.global_step == 6 and len(result.history) == 2  # resumed from step 4
    assert not marker.exists()


def test_a_checkpoint_without_the_snpo_format_is_refused_not_unpickled(checkpointed, tmp_path):
    """accelerate's own layout (optimizer.bin, random_states_0.pkl: pickles) is not loaded."""
    fresh, out = checkpointed
    marker = tmp_path / "pwned"
    latest = ckpt.resolve_checkpoint(out / "checkpoints", "latest")
    state = json.loads((latest / ckpt.STATE_FILE).read_text())
    del state["format"]
    (latest / ckpt.STATE_FILE).write_text(json.dumps(state))
    (latest / "optimizer.bin").write_bytes(pickle.dumps(Planted(marker)))
    with pytest.raises(ckpt.CheckpointError, match="has no snpo checkpoint format .* it is not loaded"):
        train(copy.deepcopy(fresh), out, max_steps=6, resume_from_checkpoint="latest")
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["truncated weights", "wrong shapes", "garbage optimizer"])
def test_a_damaged_checkpoint_is_refused_with_one_line_naming_an_older_one(checkpointed, damage):
    fresh, out = checkpointed
    latest = ckpt.resolve_checkpoint(out / "checkpoints", "latest")
    if damage == "truncated weights":
        data = (latest / ckpt.MODEL_FILE).read_bytes()
        (latest / ckpt.MODEL_FILE).write_bytes(data[: len(data) // 2])
    elif damage == "wrong shapes":
        from safetensors.torch import load_file, save_file

        tensors = load_file(latest / ckpt.MODEL_FILE)
        name = next(iter(tensors))
        tensors[name] = torch.zeros(3, 3)
        save_file(tensors, latest / ckpt.MODEL_FILE)
    else:
        (latest / ckpt.OPTIMIZER_FILE).write_bytes(b"\x00" * 64)
    with pytest.raises(ckpt.CheckpointError) as err:
        train(copy.deepcopy(fresh), out, max_steps=6, resume_from_checkpoint="latest")
    message = str(err.value)
    assert "\n" not in message and message.startswith(f"resume_from_checkpoint: {latest} cannot be loaded")
    assert message.endswith("resume from an older one (checkpoint-2)")


def test_a_checkpoint_of_another_objective_or_batch_layout_is_refused(checkpointed):
    fresh, out = checkpointed
    for change, expected in [({"method": "dpo"}, "method='snpo', this run has method='dpo'"),
                             ({"per_device_train_batch_size": 2}, "per_device_train_batch_size=4"),
                             ({"gradient_accumulation_steps": 2}, "gradient_accumulation_steps=1"),
                             ({"lora_rank": 2}, "lora_rank=0")]:
        with pytest.raises(ckpt.CheckpointError, match=expected):
            train(copy.deepcopy(fresh), out, max_steps=6, resume_from_checkpoint="latest", **change)


def test_a_checkpoint_of_other_weights_is_refused(checkpointed):
    """Same path, same config, other starting weights: the weights digest differs."""
    fresh, out = checkpointed
    other = copy.deepcopy(fresh)
    with torch.no_grad():
        next(other.denoiser.parameters()).add_(1e-3)
    with pytest.raises(ckpt.CheckpointError, match="written with weights='[0-9a-f]+', this run has weights="):
        train(other, out, max_steps=6, resume_from_checkpoint="latest")
