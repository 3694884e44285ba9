"""Scale-out invariance with real processes: two gloo ranks (``accelerate launch`` with the
shipped CPU config) with batch 1 each train the same weights as one process with batch 1 and
gradient accumulation 2, for a single-network objective and for CHATS (two networks in one
DDP module), on SD1.5 and (the single-network objective) on SD3."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from fixtures_data import make_pickapic_parquet
from snpo.cli import main
from tiny_pipelines import RESOLUTION, make_sd3, make_sd15

ROOT = Path(__file__).resolve().parents[1]
METHODS = {  # method -> (its settings, the weight files it writes)
    "single": (["--objective", "snpo", "--cfg_dropout", "0.5"], ["pytorch_lora_weights.safetensors"]),
    "chats": (["--method", "chats", "--objective", "dpo"],
              ["win/pytorch_lora_weights.safetensors", "lose/pytorch_lora_weights.safetensors"]),
}


FAMILIES = {"sd15": (make_sd15, []), "sd3": (make_sd3, ["--max_sequence_length", "24"])}


@pytest.mark.parametrize("method, family", [("single", "sd15"), ("chats", "sd15"), ("single", "sd3")])
def test_two_processes_equal_one_process_with_accumulation(tmp_path, method, family):
    make_model, family_args = FAMILIES[family]
    model = make_model(tmp_path / family)
    data = tmp_path / "train.parquet"
    # 12 rows: 2 ties, one unreadable image (substituted, counted on whichever rank meets it)
    make_pickapic_parquet(data, 12, bad_rows={"unreadable_image": 1})
    args = ["train", "--model_name_or_path", str(model), "--dataset_name", str(data),
            "--resolution", str(RESOLUTION), "--lora_rank", "4", *METHODS[method][0],
            "--per_device_train_batch_size", "1", "--max_steps", "3", "--learning_rate", "1e-2",
            "--lr_scheduler", "constant", "--beta", "500", "--report_to", "none", "--seed", "3", *family_args]
    # no ACCELERATE_USE_CPU: the trainer itself asks accelerate for gloo ranks on a CPU machine
    env = {k: v for k, v in os.environ.items() if k != "ACCELERATE_USE_CPU"}
    env.update(OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    two = tmp_path / "two"
    # the shipped accelerate config for two CPU processes (torchrun works the same way)
    launch = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
              str(ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"), "-m", "snpo.cli"]
    proc = subprocess.run([*launch, *args, "--output_dir", str(two), "--checkpointing_steps", "2"],
                          env=env, capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (two / "checkpoints" / "checkpoint-2").is_dir()  # save_state with two ranks
    assert len((two / "metrics.jsonl").read_text().splitlines()) == 3  # written once, by rank 0

    one = tmp_path / "one"
    assert main([*args, "--output_dir", str(one), "--gradient_accumulation_steps", "2", "--checkpointing_steps", "0"]) == 0
    for weights in METHODS[method][1]:
        a = load_file(two / weights)
        b = load_file(one / weights)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)  # bitwise equal here

    # control: without accumulation, one process sees half the pairs a step: other weights
    control = tmp_path / "control"
    assert main([*args, "--output_dir", str(control), "--checkpointing_steps", "0"]) == 0
    a = load_file(two / METHODS[method][1][0])
    c = load_file(control / METHODS[method][1][0])
    assert max((a[k] - c[k]).abs().max().item() for k in a) > 1e-3
