#!/usr/bin/env bash
# The CPU benchmark of BENCHMARKS.md: SD1.5 architecture (random weights) at 128 px, LoRA r8,
# 2 pairs a step, fp32, one torch thread per configuration (OMP_NUM_THREADS=1: on a shared
# 2-core machine a second thread waits on busy neighbours more than it helps), every
# configuration in a fresh process, the plan interleaved over ROUNDS rounds.
#
#   bench/cpu_sd15_128.sh [OUTPUT_DIR] [ROUNDS]        # about 15 minutes a round on 2 cores
#
# The random-init pipeline folder and the parquet are built once under $SNPO_CACHE/bench
# (default ~/.cache/snpo/bench); the latent/text cache is rebuilt and timed every run.
set -euo pipefail
OUT=${1:-bench-results/cpu-sd15-128}
ROUNDS=${2:-2}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
uptime
snpo bench --arch sd15 --resolution 128 --batch_size 2 --lora_rank 8 --mixed_precision no \
    --device cpu --threads 1 --warmup_steps 1 --measure_steps 2 --rounds "$ROUNDS" \
    --output_dir "$OUT"
uptime
