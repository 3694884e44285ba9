"""``BenchConfig`` (every key of ``snpo bench``) and the configurations a run measures."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from snpo.errors import ConfigError

#: Every configuration the benchmark knows. ``kind``: which loop runs it; the rest are
#: differences from the snpo default (``method: dpo`` from the latent/text cache, LoRA,
#: SDPA attention, contiguous memory, the trainer's optimizer, no torch.compile).
VARIANTS: dict[str, dict[str, Any]] = {
    "reference-script": {
        "kind": "reference-script", "method": "dpo",
        "about": "the diffusers diffusion_dpo loop: decode, VAE encode (sample) and text encoder every step"},
    "dpo-uncached": {
        "method": "dpo", "cached": False,
        "about": "snpo trainer, no cache: decode, VAE encode (mean) and text encoder every step"},
    "dpo": {"method": "dpo", "about": "snpo default: latents and text from the cache (`snpo cache`)"},
    "objectives": {
        "method": "objectives",
        "objectives": ["dpo", "bdpo", "snpo-naive", "snpo", "sft"],
        "about": "the five single-network objectives taking turns step by step in one process"},
    "snpo": {"method": "snpo", "about": "Diff-SNPO (bounded), from the cache"},
    "npo-negative": {
        "method": "npo-negative",
        "about": "Diff-NPO's second run: dpo on reversed labels (its first run is `dpo`)"},
    "chats": {"method": "chats",
              "about": "CHATS: win + lose networks trained together, plus the reference"},
    # beyond the paper (docs/method.md): each next to dpo, same data, cache and batch of images
    "dpo-safeguard": {"method": "dpo", "safeguard": True,
                      "about": "dpo + Diffusion-SDPO's safeguard (output-space factor, no second backward)"},
    "snpo-safeguard": {"method": "snpo", "safeguard": True, "about": "snpo + Diffusion-SDPO's safeguard"},
    "kto": {"method": "kto", "batch_scale": 2,
            "about": "Diffusion-KTO: pairs split into labelled images, 2 x batch_size images a step (a pair step's images)"},
    "mapo": {"method": "mapo", "about": "MaPO: reference-free, no reference forward"},
    "mapo-full": {"method": "mapo", "lora_rank": 0,
                  "about": "MaPO full fine-tune: no frozen reference copy (next to snpo-full)"},
    "snpo-eager-attention": {"method": "snpo", "attention": "classic",
                             "about": "before SDPA: diffusers' AttnProcessor (bmm + softmax)"},
    "snpo-channels-last": {"method": "snpo", "channels_last": True,
                           "about": "channels_last: true (NHWC weights and inputs)"},
    "snpo-forloop-adamw": {"method": "snpo", "optimizer": "forloop",
                           "about": "before fused AdamW (snpo's default): torch's for-loop AdamW, its CPU default"},
    "snpo-compile": {"method": "snpo", "torch_compile": True,
                     "about": "torch_compile: true (compile time excluded: warm-up steps)"},
    "snpo-store-write": {"method": "snpo", "store": "write",
                         "about": "precompute_reference: true, first run of a sweep (records e_ref)"},
    "snpo-store-read": {"method": "snpo", "store": "read", "beta": 5000.0,
                        "about": "precompute_reference: true, a later sweep run (beta 5000): no reference forward"},
    "snpo-full": {"method": "snpo", "lora_rank": 0,
                  "about": "full fine-tune (lora_rank 0): frozen reference copy, AdamW over the whole UNet"},
    "snpo-full-forloop-adamw": {"method": "snpo", "lora_rank": 0, "optimizer": "forloop",
                                "about": "full fine-tune with torch's for-loop AdamW (before fused)"},
    # scale-out memory (not in the default plan; bench/cpu_sdxl_memory.sh): peak memory per process
    "snpo-full-adafactor": {"method": "snpo", "lora_rank": 0, "optimizer_name": "adafactor",
                            "about": "full fine-tune, one process, Adafactor (Diffusion-DPO's SDXL optimizer)"},
    "snpo-full-adamw8bit": {"method": "snpo", "lora_rank": 0, "optimizer_name": "adamw8bit",
                            "about": "full fine-tune, one process, 8-bit AdamW (bitsandbytes)"},
    "full-ddp2": {"method": "snpo", "lora_rank": 0, "launch": "ddp",
                  "about": "full fine-tune, 2 gloo processes, DDP (everything replicated), AdamW"},
    "full-ddp2-adafactor": {"method": "snpo", "lora_rank": 0, "launch": "ddp", "optimizer_name": "adafactor",
                            "about": "full fine-tune, 2 processes, DDP, Adafactor"},
    "full-ddp2-bf16-reference": {"method": "snpo", "lora_rank": 0, "launch": "ddp", "reference_dtype": "bf16",
                                 "about": "full fine-tune, 2 processes, DDP, AdamW, reference copy in bf16"},
    "full-fsdp2": {"method": "snpo", "lora_rank": 0, "launch": "fsdp",
                   "about": "full fine-tune, 2 gloo processes, FSDP2 (weights, gradients, AdamW states and the "
                            "reference copy sharded)"},
    "full-fsdp2-bf16-reference": {"method": "snpo", "lora_rank": 0, "launch": "fsdp", "reference_dtype": "bf16",
                                  "about": "full fine-tune, 2 processes, FSDP2, AdamW, sharded bf16 reference"},
}
#: accelerate configs of the multi-process configurations (``launch``), in configs/accelerate/
LAUNCH_CONFIGS = {"ddp": "cpu_2proc.yaml", "fsdp": "fsdp_cpu.yaml"}

DEFAULT_PLAN = (
    "reference-script", "dpo-uncached", "dpo", "objectives", "snpo", "npo-negative", "chats",
    "dpo-safeguard", "kto", "mapo",
    "snpo-eager-attention", "snpo-channels-last", "snpo-store-write", "snpo-store-read",
    "snpo-compile", "snpo-forloop-adamw", "snpo-full", "snpo-full-forloop-adamw", "mapo-full",
)

#: ``snpo bench --quick``: the whole plan on the tiny architecture, in one process (seconds).
QUICK_OVERRIDES: dict[str, Any] = {
    "arch": "tiny", "resolution": 32, "warmup_steps": 1, "measure_steps": 1, "rounds": 1,
    "isolate": False, "compile": "never", "output_dir": "snpo-bench-quick",
}


def variant(name: str) -> dict[str, Any]:
    """The configuration ``name``: one of :data:`VARIANTS`, or any registered method (trained
    from the cache, LoRA, like ``snpo``), so a new method is benchmarked with no edit here.
    ``<arch>/<name>`` is the same configuration on ``compare_arch``."""
    name = split_arch(name)[1]
    if name in VARIANTS:
        return VARIANTS[name]
    from snpo.methods import METHODS

    if name in METHODS:
        return {"method": name, "about": METHODS[name].summary or f"method {name}"}
    raise ConfigError(f"variants: unknown {name!r}; known: {', '.join(VARIANTS)} or a method "
                      f"({', '.join(METHODS)})")


@dataclass
class BenchConfig:
    """``snpo bench``: pairs per second, peak memory and per-phase times per configuration."""

    arch: str = "sd15"  # tiny | sd15 | sdxl | sdxl-quarter (SDXL's UNet at 1/4 width) | sd3 (SD3.5 Medium) | tiny-sd3: random-init copies of the real architectures
    compare_arch: str | None = None  # a second architecture measured in the same run at the same settings (e.g. sd15 next to sd3); its rows are named <arch>/<configuration>
    resolution: int = 128  # image side in pixels
    batch_size: int = 2  # pairs per step
    lora_rank: int = 8  # LoRA rank of the LoRA configurations
    mixed_precision: str = "no"  # no | fp16 | bf16
    device: str = "auto"  # auto | cpu | cuda
    threads: int = 1  # torch threads per configuration on CPU (OMP_NUM_THREADS); 0 = torch's choice
    beta: float = 2000.0  # beta of every objective
    warmup_steps: int = 1  # per configuration, not timed (the first one also counts FLOPs)
    measure_steps: int = 2  # timed steps per configuration and round
    rounds: int = 1  # the plan is run this many times, interleaved; medians over all rounds
    variants: list[str] = field(default_factory=list)  # empty = the default plan
    skip: list[str] = field(default_factory=list)  # configurations to leave out
    compile: str = "auto"  # snpo-compile: auto (tiny only: CPU compile of SD-size UNets takes many minutes) | always | never
    full_finetune: str = "auto"  # snpo-full: auto (only if memory allows) | always | never
    count_flops: bool = True  # count FLOPs in the first warm-up step (torch's FlopCounterMode)
    isolate: bool = True  # one fresh process per configuration (needed for CPU peak memory)
    timeout_s: int = 3600  # per configuration
    output_dir: str = "snpo-bench"  # results.json and results.md
    work_dir: str | None = None  # models and data, reused across runs; default $SNPO_CACHE/bench
    quick: bool = False  # tiny architecture, one process, seconds (QUICK_OVERRIDES)
    seed: int = 0  # model init, data and training seed

    def validate(self) -> None:
        from snpo.bench.assets import ARCHS

        if self.compare_arch is not None and (self.compare_arch not in ARCHS or self.compare_arch == self.arch):
            raise ConfigError(f"compare_arch: expected one of {', '.join(a for a in ARCHS if a != self.arch)} "
                              f"or null, got {self.compare_arch!r}")
        choices = [
            ("arch", self.arch, ARCHS), ("mixed_precision", self.mixed_precision, ("no", "fp16", "bf16")),
            ("device", self.device, ("auto", "cpu", "cuda")), ("compile", self.compile, ("auto", "always", "never")),
            ("full_finetune", self.full_finetune, ("auto", "always", "never")),
        ]
        for name, value, allowed in choices:
            if value not in allowed:
                raise ConfigError(f"{name}: expected one of {', '.join(allowed)}, got {value!r}")
        checks = [
            ("resolution", self.resolution >= 16 and self.resolution % 8 == 0, "a multiple of 8, >= 16"),
            ("batch_size", self.batch_size >= 1, "an integer >= 1"),
            ("lora_rank", self.lora_rank >= 1, "an integer >= 1 (full fine-tune is the snpo-full configuration)"),
            ("threads", self.threads >= 0, "an integer >= 0"),
            ("warmup_steps", self.warmup_steps >= 0, "an integer >= 0"),
            ("measure_steps", self.measure_steps >= 1, "an integer >= 1"),
            ("rounds", self.rounds >= 1, "an integer >= 1"),
        ]
        for name, ok, allowed in checks:
            if not ok:
                raise ConfigError(f"{name}: expected {allowed}, got {getattr(self, name)!r}")
        for name in [*self.variants, *self.skip]:
            variant(name)  # a known configuration, or any registered method

    def plan(self) -> list[str]:
        from snpo.bench.assets import FLOW_ARCHS

        names = list(self.variants) or list(DEFAULT_PLAN)
        if not self.variants and self.arch in FLOW_ARCHS:
            names.remove("reference-script")  # the diffusers Diffusion-DPO script trains UNets only
        if not self.variants:
            if self.compile == "never" or (self.compile == "auto" and self.arch != "tiny"):
                names.remove("snpo-compile")
            if self.full_finetune == "never":
                names.remove("snpo-full")
                names.remove("snpo-full-forloop-adamw")
                names.remove("mapo-full")
        if "snpo-store-read" in names and "snpo-store-write" not in names:
            names.insert(names.index("snpo-store-read"), "snpo-store-write")
        return [n for n in names if n not in self.skip]

    def archs(self) -> list[str]:
        """The architectures of the run: ``arch``, then ``compare_arch``."""
        return [self.arch] + ([self.compare_arch] if self.compare_arch else [])


def split_arch(name: str) -> tuple[str | None, str]:
    """``"sd15/dpo"`` -> ``("sd15", "dpo")`` (a ``compare_arch`` row); ``"dpo"`` -> ``(None, "dpo")``."""
    from snpo.bench.assets import ARCHS

    head, _, rest = name.partition("/")
    return (head, rest) if rest and head in ARCHS else (None, name)
