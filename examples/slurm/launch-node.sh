#!/usr/bin/env bash
# One machine's share of a multi-node snpo run: starts `accelerate launch` for this node with
# the rank and rendezvous settings every node must agree on. snpo-multinode.sbatch runs it once
# per node through srun; any other scheduler (or a shell on each machine) can run it with:
#
#   NNODES            number of machines                      (Slurm: SLURM_NNODES)
#   NODE_RANK         this machine's rank, 0 on the main one   (Slurm: SLURM_NODEID)
#   MAIN_ADDR         address of machine 0, reachable by all   (Slurm: first host of the job)
#   MAIN_PORT         a free TCP port on machine 0             (default 29500)
#   GPUS_PER_NODE     processes per machine                    (default 8)
#   ACCELERATE_CONFIG engine: multi_gpu.yaml (DDP), fsdp.yaml, deepspeed_zero2.yaml, ...
#                     its num_machines / num_processes / machine_rank are overridden here
#   PYTHON            the interpreter of snpo's environment    (default python)
#
# Everything after the script's name goes to `snpo train`, e.g.
#   bash examples/slurm/launch-node.sh --config configs/sdxl-snpo.yaml --output_dir /shared/runs/sdxl
# output_dir (checkpoints) must be on a file system every machine sees; rank 0 writes the
# weights and checkpoint files, each rank its own rng-<rank>.safetensors.
set -euo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
NNODES="${NNODES:-${SLURM_NNODES:?set NNODES (or run under Slurm)}}"
NODE_RANK="${NODE_RANK:-${SLURM_NODEID:?set NODE_RANK (or run under Slurm)}}"
MAIN_ADDR="${MAIN_ADDR:?set MAIN_ADDR to the address of machine 0}"
MAIN_PORT="${MAIN_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-8}"
ACCELERATE_CONFIG="${ACCELERATE_CONFIG:-$here/configs/accelerate/multi_node.yaml}"
exec "${PYTHON:-python}" -m accelerate.commands.launch --config_file "$ACCELERATE_CONFIG" \
    --num_machines "$NNODES" --machine_rank "$NODE_RANK" \
    --num_processes "$((NNODES * GPUS_PER_NODE))" \
    --main_process_ip "$MAIN_ADDR" --main_process_port "$MAIN_PORT" \
    --rdzv_backend static --same_network \
    -m snpo.cli train "$@"
