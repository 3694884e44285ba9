"""``snpo bench``: training speed and memory of snpo against the public Diffusion-DPO script,
per objective and per method, on random-init copies of real architectures.

    snpo bench                                   # SD1.5 architecture, 128 px, CPU (BENCHMARKS.md)
    snpo bench --quick                           # tiny architecture, one process, seconds
    snpo bench --device cuda --mixed_precision bf16 --resolution 512 --rounds 3

See ``snpo.bench.config`` for the configurations measured, ``snpo.bench.timing`` for how
phases, memory and FLOPs are measured, and ``snpo.bench.reference_script`` for the baseline.
"""

from snpo.bench.config import DEFAULT_PLAN, QUICK_OVERRIDES, VARIANTS, BenchConfig
from snpo.bench.runner import run_bench

__all__ = ["DEFAULT_PLAN", "QUICK_OVERRIDES", "VARIANTS", "BenchConfig", "run_bench"]
