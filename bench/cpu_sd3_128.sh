#!/usr/bin/env bash
# The SD3 CPU benchmark of BENCHMARKS.md: the SD3.5 Medium architecture (random weights, no
# T5: see src/snpo/bench/assets.py) next to SD1.5 in the same run, at 128 px, LoRA r8, 1 pair
# a step, fp32, one torch thread per configuration, every configuration in a fresh process,
# the two architectures interleaved configuration by configuration.
#
#   bench/cpu_sd3_128.sh [OUTPUT_DIR] [ROUNDS]        # about 15 minutes a round on 2 cores
#
# The random-init pipeline folders (SD3.5 Medium: 13 GB, about 6 minutes to build once) and
# the parquet are built once under $SNPO_CACHE/bench (default ~/.cache/snpo/bench); the
# latent/text caches are rebuilt and timed every run. Needs about 13 GB of free memory (the
# sd3 configurations peak at 12.4 GiB); BENCHMARKS.md has a run.
set -euo pipefail
OUT=${1:-bench-results/cpu-sd3-128}
ROUNDS=${2:-1}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
uptime
snpo bench --arch sd3 --compare_arch sd15 --variants dpo,snpo \
    --resolution 128 --batch_size 1 --lora_rank 8 --mixed_precision no \
    --device cpu --threads 1 --warmup_steps 1 --measure_steps 2 --rounds "$ROUNDS" \
    --output_dir "$OUT"
uptime
