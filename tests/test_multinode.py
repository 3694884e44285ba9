"""Several machines, checked on one: ``examples/slurm/launch-node.sh`` (what the Slurm batch
script runs on every node) started twice on localhost as two "machines" of one process each
(``--num_machines 2``, machine ranks 0 and 1, static rendezvous at 127.0.0.1) trains the same
weights, bitwise, with the same metrics, as the same two processes on one machine."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_reliability_kill import child_env, logged_steps, make_world, train_args

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = ROOT / "examples" / "slurm"
CPU_2PROC = ROOT / "configs" / "accelerate" / "cpu_2proc.yaml"
UNET = "unet/diffusion_pytorch_model.safetensors"
SETTINGS = dict(lora_rank=0, gradient_accumulation_steps=1, learning_rate=1e-3, max_steps=4, cfg_dropout=0.3)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_the_slurm_scripts_parse_and_agree_on_their_variables():
    for script in ("launch-node.sh", "snpo-multinode.sbatch"):
        subprocess.run(["bash", "-n", str(SCRIPTS / script)], check=True)
    node, batch = (SCRIPTS / "launch-node.sh").read_text(), (SCRIPTS / "snpo-multinode.sbatch").read_text()
    for name in ("NNODES", "MAIN_ADDR", "MAIN_PORT", "GPUS_PER_NODE", "ACCELERATE_CONFIG"):
        assert f"export {name}=" in batch and name in node
    assert 'NODE_RANK="$SLURM_NODEID"' in batch and "--resume_from_checkpoint latest" in batch
    # the node script alone tells what is missing
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "NNODES", "NODE_RANK"))}
    done = subprocess.run(["bash", str(SCRIPTS / "launch-node.sh")], env=env, capture_output=True, text=True)
    assert done.returncode != 0 and "set NNODES" in done.stderr


@pytest.mark.slow
def test_two_machines_of_one_process_equal_two_processes_on_one_machine(tmp_path_factory):
    root, model, data = make_world(tmp_path_factory, "sd15")
    one_machine = root / "one-machine"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CPU_2PROC),
                           "-m", "snpo.cli", *train_args(model, data, one_machine, **SETTINGS)],
                          env=child_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]

    two_machines = root / "two-machines"
    args = train_args(model, data, two_machines, **SETTINGS)[1:]  # launch-node.sh adds `train`
    port = free_port()
    nodes = []
    for rank in (1, 0):
        env = child_env(NNODES="2", NODE_RANK=str(rank), MAIN_ADDR="127.0.0.1", MAIN_PORT=str(port),
                        GPUS_PER_NODE="1", ACCELERATE_CONFIG=str(CPU_2PROC), PYTHON=sys.executable)
        nodes.append(subprocess.Popen(["bash", str(SCRIPTS / "launch-node.sh"), *args], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    outputs = [node.communicate(timeout=400) for node in nodes]
    for node, (_, err) in zip(nodes, outputs):
        assert node.returncode == 0, err[-3000:]

    a, b = load_file(one_machine / UNET), load_file(two_machines / UNET)
    assert a.keys() == b.keys() and a
    for key in a:
        assert torch.equal(a[key], b[key]), key
    timing = ("pairs_per_second", "peak_memory_gb")
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]  # noqa: E731
    assert strip(logged_steps(two_machines / "metrics.jsonl")) == strip(logged_steps(one_machine / "metrics.jsonl"))
    assert {"rng-0.safetensors", "rng-1.safetensors"} <= {p.name for p in (two_machines / "checkpoints" / "checkpoint-4").iterdir()}
