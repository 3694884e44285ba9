#!/usr/bin/env bash
# The scale-out memory benchmark of BENCHMARKS.md ("Full fine-tunes: memory per process"):
# a random-init copy of SDXL's UNet layout at 1/4 width (sdxl-quarter: 0.17B parameters; the
# real 2.6B UNet with AdamW and a reference copy needs about 52 GB a process, more than this
# 24 GB machine), full fine-tune, 128 px, 2 pairs a step per process, fp32, on CPU:
# one process (AdamW, Adafactor, 8-bit AdamW) and two gloo processes under DDP and FSDP2
# (configs/accelerate/cpu_2proc.yaml, fsdp_cpu.yaml), AdamW vs Adafactor, reference in fp32 vs
# bf16. Peak memory is each process's VmHWM; BENCHMARKS.md scales it to SD1.5 and SDXL.
#
#   bench/cpu_sdxl_memory.sh [OUTPUT_DIR]        # about 20 minutes on 2 cores
set -euo pipefail
OUT=${1:-bench-results/cpu-sdxl-quarter-memory}
export OMP_NUM_THREADS=1 MKL_NUM_THREADS=1
uptime
snpo bench --arch sdxl-quarter --resolution 128 --batch_size 2 --mixed_precision no \
    --device cpu --threads 1 --warmup_steps 1 --measure_steps 1 --rounds 1 --full_finetune always \
    --variants snpo-full,snpo-full-adafactor,snpo-full-adamw8bit,full-ddp2,full-ddp2-adafactor,full-ddp2-bf16-reference,full-fsdp2,full-fsdp2-bf16-reference \
    --output_dir "$OUT"
uptime
