"""``snpo bench``: build the assets, run every configuration (interleaved over rounds, each
in a fresh process), and write ``results.json`` and ``results.md`` to ``output_dir``.

Order of a run: the pipeline folder and the parquet (built once, reused from ``work_dir``),
the latent/text cache (built fresh and timed: its cost is part of the comparison), the
probes (matmul rate, AdamW implementations), then ``rounds`` passes over the plan. Each
configuration trains ``warmup_steps + measure_steps`` steps; the medians over the measured
steps of all rounds are reported.
"""

from __future__ import annotations

import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

from snpo.bench.config import QUICK_OVERRIDES, BenchConfig, split_arch, variant
from snpo.bench.timing import PHASES

GiB = 2**30


def work_root(config: BenchConfig) -> Path:
    if config.work_dir:
        return Path(config.work_dir).expanduser()
    root = os.environ.get("SNPO_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "snpo") / "bench"


def _meminfo(field: str) -> int | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_info(config: BenchConfig) -> dict[str, Any]:
    import torch

    cuda = torch.cuda.is_available() and config.device != "cpu"
    return {
        "device": torch.cuda.get_device_name(0) if cuda else f"CPU: {_cpu_model()}",
        "device_type": "cuda" if cuda else "cpu",
        "cpu": _cpu_model(), "cpu_count": os.cpu_count(),
        "threads_per_configuration": config.threads if not cuda else None,
        "torch": torch.__version__, "python": platform.python_version(),
        "load_average_start": list(os.getloadavg()),
        "mem_available_start_gib": (_meminfo("MemAvailable") or 0) / GiB,
        "started": datetime.datetime.now().isoformat(timespec="seconds"),
    }


class Launcher:
    """Runs worker specs, in a fresh process each (``isolate``) or in this one."""

    def __init__(self, config: BenchConfig, folder: Path) -> None:
        self.config, self.folder = config, folder
        self.count = 0

    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if self.config.threads > 0:
            for key in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
                env[key] = str(self.config.threads)
        if self.config.device == "cpu":
            env["CUDA_VISIBLE_DEVICES"] = ""
        env["TOKENIZERS_PARALLELISM"] = "false"
        return env

    def __call__(self, spec: dict[str, Any], *, isolate: bool | None = None) -> dict[str, Any]:
        spec = {"threads": self.config.threads, "device": self.config.device, **spec}
        isolate = self.config.isolate if isolate is None else isolate
        if not isolate:
            from snpo.bench.worker import run_spec

            return run_spec(spec)
        self.count += 1
        label = str(spec.get("name", spec["kind"])).replace("/", "_")  # compare_arch rows: "sd15/dpo"
        spec_path = self.folder / f"spec-{self.count:03d}-{label}.json"
        result_path = spec_path.with_name(spec_path.name.replace("spec-", "result-"))
        spec_path.write_text(json.dumps(spec, indent=1))
        command = [sys.executable, "-m", "snpo.bench.worker", str(spec_path), str(result_path)]
        if spec.get("launch"):  # several processes (DDP / FSDP over gloo ranks): every rank reports
            from snpo.bench.config import LAUNCH_CONFIGS

            config_file = Path(__file__).resolve().parents[3] / "configs" / "accelerate" / LAUNCH_CONFIGS[spec["launch"]]
            command = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config_file),
                       "-m", "snpo.bench.worker", str(spec_path), str(result_path)]
        try:
            proc = subprocess.run(command, env=self.env(), capture_output=True, text=True,
                                  timeout=self.config.timeout_s)
        except subprocess.TimeoutExpired:
            return {"ok": False, "name": spec.get("name"), "error": f"timed out after {self.config.timeout_s} s"}
        if result_path.is_file():
            result = json.loads(result_path.read_text())
            ranks = sorted(result_path.parent.glob(result_path.name + ".rank*"))
            if ranks and result.get("ok"):  # peak memory of every process; the largest is the one that must fit
                peaks = [result["memory"].get("peak_bytes")] + [
                    json.loads(r.read_text())["memory"].get("peak_bytes") for r in ranks]
                result["memory"]["peak_bytes_per_rank"] = peaks
                result["memory"]["peak_bytes"] = max(p for p in peaks if p)
                result["memory"]["live_bytes_per_rank"] = [result["memory"].get("live_bytes")] + [
                    json.loads(r.read_text())["memory"].get("live_bytes") for r in ranks]
                result["processes"] = len(peaks)
            return result
        return {"ok": False, "name": spec.get("name"),
                "error": f"worker exited with {proc.returncode}: {proc.stderr[-2000:]}"}


def _say(message: str) -> None:
    print(f"[snpo bench {datetime.datetime.now():%H:%M:%S}] {message}", flush=True)


def variant_spec(name: str, config: BenchConfig, assets: dict[str, Any], out: Path, round_: int) -> dict[str, Any]:
    """The worker spec of configuration ``name`` on the model and data of ``assets``."""
    v = variant(name)
    measure = config.measure_steps
    if v.get("method") == "objectives":
        measure *= len(v["objectives"])
    spec: dict[str, Any] = {
        "kind": v.get("kind", "snpo"), "name": name, "model": assets["model"],
        "dataset": assets["dataset"], "cache_dir": assets["cache_dir"],
        "resolution": config.resolution, "batch_size": config.batch_size * v.get("batch_scale", 1),
        "lora_rank": v.get("lora_rank", config.lora_rank), "mixed_precision": config.mixed_precision,
        "beta": v.get("beta", config.beta), "seed": config.seed,
        "warmup_steps": config.warmup_steps, "measure_steps": measure,
        "count_flops": config.count_flops,
    }
    for key in ("objectives", "method", "cached", "attention", "channels_last",
                "torch_compile", "optimizer", "safeguard", "launch", "optimizer_name", "reference_dtype"):
        if key in v:
            spec[key] = v[key]
    if "store" in v:
        arch = split_arch(name)[0]
        store = out / (f"reference-errors-round{round_}" + (f"-{arch}" if arch else ""))
        if v["store"] == "write":
            shutil.rmtree(store, ignore_errors=True)
        spec["reference_errors_dir"] = str(store)
    return spec


def _full_finetune_fits(config: BenchConfig, probe: dict[str, Any]) -> tuple[bool, str]:
    """On CPU: weights + reference copy + gradients + two AdamW moments (20 bytes a
    parameter in float32) plus 3 GiB must fit in MemAvailable with 10% to spare."""
    if config.full_finetune == "always" or probe.get("device_name"):
        return True, ""
    params = probe.get("optimizer_full", {}).get("full_unet_parameters")
    if not params:
        return True, ""
    need = 20 * params + 3 * GiB
    available = _meminfo("MemAvailable") or 0
    if available < 1.1 * need:
        return False, (f"needs about {need / GiB:.1f} GiB (20 bytes x {params / 1e6:.0f}M parameters + 3 GiB), "
                       f"{available / GiB:.1f} GiB available; run with --full_finetune always to force")
    return True, ""


def run_bench(config: BenchConfig) -> Path:
    """Run the benchmark; returns ``output_dir`` (``results.json``, ``results.md``)."""
    from snpo.bench.report import render_markdown, summarize

    if config.quick:  # quick sizes for every key left at its default
        defaults = BenchConfig()
        for key, value in QUICK_OVERRIDES.items():
            if getattr(config, key) == getattr(defaults, key):
                setattr(config, key, value)
    config.validate()
    out = Path(config.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    work = work_root(config)
    work.mkdir(parents=True, exist_ok=True)
    specs_dir = out / "workers"
    specs_dir.mkdir(exist_ok=True)
    launch = Launcher(config, specs_dir)
    info = machine_info(config)
    plan = config.plan()
    _say(f"{info['device']}; {' and '.join(config.archs())} at {config.resolution} px, {config.batch_size} "
         f"pairs/step, LoRA r{config.lora_rank}, precision {config.mixed_precision}; plan: {', '.join(plan)}")

    # ---- assets (built once per work_dir), the caches (timed), the probes ---------------------
    # one epoch of a configuration's steps (longer runs, e.g. `objectives`, go on to more epochs)
    n_pairs = max(4, (config.warmup_steps + config.measure_steps) * config.batch_size)
    per_arch: dict[str, dict[str, Any]] = {}
    for arch in config.archs():
        image_size = 64 if arch.startswith("tiny") else 512
        assets = launch({"kind": "assets", "name": "assets", "work_dir": str(work), "arch": arch,
                         "seed": config.seed, "n_pairs": n_pairs, "image_size": image_size})
        if not assets.get("ok"):
            raise RuntimeError(f"bench: building the {arch} assets failed: {assets.get('error')}")
        _say(f"model {assets['model']}" + (f" (built in {assets['model_build_s']:.0f} s)" if assets["model_build_s"] else ""))
        cache_dir = out / ("cache" if arch == config.arch else f"cache-{arch}")
        shutil.rmtree(cache_dir, ignore_errors=True)
        cache = launch({"kind": "cache", "name": "cache", "model": assets["model"], "dataset": assets["dataset"],
                        "cache_dir": str(cache_dir), "resolution": config.resolution,
                        "mixed_precision": config.mixed_precision, "batch_size": config.batch_size,
                        "seed": config.seed})
        if not cache.get("ok"):
            raise RuntimeError(f"bench: building the {arch} latent/text cache failed: {cache.get('error')}")
        assets["cache_dir"] = str(cache_dir)
        _say(f"{arch} cache: {cache['num_pairs']} pairs in {cache['cache_build_s']:.1f} s")
        probe = launch({"kind": "probe", "name": "probe", "model": assets["model"],
                        "lora_rank": config.lora_rank, "mixed_precision": config.mixed_precision})
        if probe.get("ok"):
            _say(f"matmul: {probe.get('matmul_fp32_flops', 0) / 1e9:.1f} GFLOP/s fp32"
                 + (f", {probe['matmul_bf16_flops'] / 1e12:.1f} TFLOP/s bf16" if "matmul_bf16_flops" in probe else ""))
        per_arch[arch] = {"assets": {**assets, "image_size": image_size}, "cache": cache, "probe": probe}
    main = per_arch[config.arch]
    assets, cache, probe = main["assets"], main["cache"], main["probe"]

    # ---- the configurations, interleaved over rounds (and architectures) ----------------------
    from snpo.bench.assets import FLOW_ARCHS

    names = [name if arch == config.arch else f"{arch}/{name}" for name in plan for arch in config.archs()]
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in names}
    skipped: dict[str, str] = {}
    for round_ in range(config.rounds):
        for name in names:
            if name in skipped:
                continue
            arch, base = split_arch(name)
            arch = arch or config.arch
            if base == "reference-script" and arch in FLOW_ARCHS:
                skipped[name] = f"the diffusers Diffusion-DPO script trains SD1.5/SDXL UNets only ({arch} is a flow model)"
                _say(f"skip {name}: {skipped[name]}")
                continue
            if (base.startswith("snpo-full") or base == "mapo-full") and info["device_type"] == "cpu":
                arch_probe = per_arch[arch]["probe"]
                fits, why = _full_finetune_fits(config, arch_probe if arch_probe.get("ok") else {})
                if not fits:
                    skipped[name] = why
                    _say(f"skip {name}: {why}")
                    continue
            spec = variant_spec(name, config, per_arch[arch]["assets"], out, round_)
            result = launch(spec)
            runs[name].append(result)
            if result.get("ok"):
                walls = [s["wall_s"] for s in result["steps"][config.warmup_steps:]]
                _say(f"round {round_ + 1}/{config.rounds} {name}: steps "
                     + ", ".join(f"{w:.2f}" for w in walls) + " s; peak "
                     + f"{result['memory']['peak_bytes'] / GiB:.2f} GiB")
            else:
                _say(f"round {round_ + 1}/{config.rounds} {name}: FAILED: {result.get('error')}")

    info["load_average_end"] = list(os.getloadavg())
    info["finished"] = datetime.datetime.now().isoformat(timespec="seconds")
    results = {
        "config": {k: getattr(config, k) for k in config.__dataclass_fields__},
        "machine": info, "assets": {**assets, "n_pairs": n_pairs},
        "cache": cache, "probe": probe, "plan": plan, "skipped": skipped, "runs": runs,
    }
    if config.compare_arch:
        other = per_arch[config.compare_arch]
        results["compare"] = {"arch": config.compare_arch, "assets": {**other["assets"], "n_pairs": n_pairs},
                              "cache": other["cache"], "probe": other["probe"]}
    results["summary"] = summarize(results)
    (out / "results.json").write_text(json.dumps(results, indent=1, default=str))
    markdown = render_markdown(results)
    (out / "results.md").write_text(markdown)
    print(markdown, flush=True)
    _say(f"results in {out / 'results.json'} and {out / 'results.md'}")
    return out


__all__ = ["PHASES", "BenchConfig", "run_bench"]
