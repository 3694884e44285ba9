#!/usr/bin/env bash
# GPU figures: SD1.5 architecture (random weights) at 512 px in bf16 on one GPU (H100/H200),
# the same comparison as the CPU run, plus torch.compile and the full fine-tune, pairs/s,
# peak memory (torch.cuda.max_memory_allocated) and MFU against the bf16 matmul rate the
# probe measures on this GPU (8192^3 matmuls), with every phase synchronised.
#
# NOT RUN in the session that wrote it (no GPU was lent to it): ready to run.
#
#   bench/gpu_sd15_512.sh [OUTPUT_DIR] [BATCH]          # about 10 minutes on one H100
#
# Then paste OUTPUT_DIR/results.md into BENCHMARKS.md under "GPU" with the device's name.
set -euo pipefail
OUT=${1:-bench-results/gpu-sd15-512}
BATCH=${2:-8}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
snpo bench --arch sd15 --resolution 512 --batch_size "$BATCH" --lora_rank 8 \
    --mixed_precision bf16 --device cuda --warmup_steps 3 --measure_steps 10 --rounds 3 \
    --compile always --full_finetune always --output_dir "$OUT"
