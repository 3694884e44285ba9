"""One benchmarked configuration, usually in a fresh process of its own:

    python -m snpo.bench.worker SPEC.json RESULT.json

``SPEC["kind"]`` is ``snpo`` (the snpo trainer, set up as ``snpo train`` sets it up: data,
backbone, method, speed options, ``Trainer``), ``reference-script`` (the public script's
loop, ``snpo.bench.reference_script``), ``assets`` (build the pipeline folder), ``cache``
(``snpo cache``, timed) or ``probe`` (matmul rate and optimizer implementations).
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from snpo.bench.timing import PhaseTimer
from snpo.errors import ConfigError
from snpo.training.trainer import Callback


def _device(spec: dict[str, Any]) -> torch.device:
    if spec.get("device", "auto") == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


# ---- the snpo path -------------------------------------------------------------------------
class TimedDataset(torch.utils.data.Dataset):
    """A dataset whose item reads are timed as the ``data`` phase (other attributes pass
    through, so the trainer still finds ``set_epoch``)."""

    def __init__(self, dataset: Any, timer: PhaseTimer) -> None:
        self._dataset, self._timer = dataset, timer

    def __len__(self) -> int:
        return len(self._dataset)

    def __getitem__(self, index: int) -> Any:
        with self._timer.phase("data"):
            return self._dataset[index]

    def __getattr__(self, name: str) -> Any:
        if name.startswith("_"):
            raise AttributeError(name)
        return getattr(self._dataset, name)


def instrument_backbone(backbone: Any, timer: PhaseTimer) -> None:
    """Time encoding, policy predictions and the reference block on this backbone."""
    backbone.encode_batch = timer.wrap(backbone.encode_batch, "encode")
    backbone.predict = timer.wrap(backbone.predict, "policy_forward")  # no-op inside a phase
    reference = backbone.reference

    @contextmanager
    def timed_reference():
        started = timer.start("reference_forward")
        try:
            with reference() as model:
                yield model
        finally:
            if started:
                timer.stop("reference_forward")

    backbone.reference = timed_reference


class TimingCallback(Callback):
    """The trainer's hooks as phase timers: backward, then clipping + the optimizer step; a
    step ends after ``zero_grad`` (``after_optimizer``)."""

    def __init__(self, timer: PhaseTimer) -> None:
        self.timer = timer

    def on_loop_begin(self, trainer: Any) -> None:
        self.timer.begin()

    def before_backward(self) -> None:
        self.timer.start("policy_backward")

    def after_backward(self) -> None:
        self.timer.stop("policy_backward")

    def before_optimizer(self) -> None:
        self.timer.start("optimizer")

    def after_optimizer(self) -> None:
        self.timer.stop("optimizer")
        self.timer.end_step()


class InterleavedObjectives:
    """Single-network methods for several objectives, taking turns step by step in one
    process: their step costs are compared on the same machine state, step for step."""

    name = "interleaved"

    def __init__(self, methods: dict[str, Any], timer: PhaseTimer) -> None:
        self.methods, self.timer = methods, timer
        self.names = list(methods)
        self.calls = 0

    def compute_loss(self, model: Any, batch: dict[str, Any], pair_seeds: list[int]):
        name = self.names[self.calls % len(self.names)]
        self.calls += 1
        self.timer.step_label = name
        return self.methods[name].compute_loss(model, batch, pair_seeds)


def bench_train_config(spec: dict[str, Any]) -> Any:
    """The ``TrainConfig`` of one benchmarked configuration."""
    from snpo.training.config import TrainConfig

    store_dir = spec.get("reference_errors_dir")
    method = spec.get("method", "snpo")
    optional = {k: spec[k] for k in ("cfg_dropout", "safeguard") if k in spec}  # else TrainConfig's default
    return TrainConfig(
        model_name_or_path=spec["model"], dataset_name=spec["dataset"],
        cache_dir=spec["cache_dir"] if spec.get("cached", True) else None,
        output_dir=spec["output_dir"], resolution=spec["resolution"],
        method="dpo" if method == "objectives" else method,
        beta=spec["beta"],
        max_steps=spec["warmup_steps"] + spec["measure_steps"],
        per_device_train_batch_size=spec["batch_size"], learning_rate=1e-6,
        lr_scheduler="constant", lora_rank=spec["lora_rank"],
        mixed_precision=spec["mixed_precision"], checkpointing_steps=0, report_to="none",
        seed=spec["seed"], channels_last=spec.get("channels_last", False),
        torch_compile=spec.get("torch_compile", False),
        adam_implementation=spec.get("optimizer", "fused"), optimizer=spec.get("optimizer_name", "adamw"),
        reference_dtype=spec.get("reference_dtype", "auto"),
        precompute_reference=bool(store_dir), reference_errors_dir=store_dir, **optional,
    )


def run_snpo(spec: dict[str, Any], timer: PhaseTimer) -> dict[str, Any]:
    """Train ``warmup + measure`` steps with the job ``snpo train`` builds (``build_job``),
    with phase timers on the data, the backbone and the trainer's hooks."""
    from dataclasses import replace

    from snpo.efficiency import count_parameters
    from snpo.methods import BuiltMethod
    from snpo.training.data import training_data
    from snpo.training.job import backbone_for, build_job, build_method

    config = bench_train_config(spec)
    config.validate()
    data = training_data(config, _family(config))
    backbone = backbone_for(config, data)
    if spec.get("attention") == "classic":  # the pre-SDPA attention (bmm + softmax)
        from diffusers.models.attention_processor import AttnProcessor

        backbone.denoiser.set_attn_processor(AttnProcessor())
    instrument_backbone(backbone, timer)
    data = replace(data, dataset=TimedDataset(data.dataset, timer),
                   collate_fn=timer.wrap(data.collate_fn, "data"))
    built = None
    if spec.get("method") == "objectives":  # several objectives, one process, taking turns
        methods = {name: build_method(replace(config, method=name), backbone).method
                   for name in spec["objectives"]}
        built = BuiltMethod(InterleavedObjectives(methods, timer))
    job = build_job(config, backbone=backbone, data=data, built=built,
                    callbacks=[TimingCallback(timer)], show_progress=False, save_model=False,
                    write_logs=False)
    store = getattr(job.method, "reference_store", None)
    if store is not None:
        store.lookup = timer.wrap(store.lookup, "reference_forward")
    result = job.trainer.train()
    out = timer.finish()
    denoiser = job.built.model if job.built.model is not None else backbone.denoiser
    out["parameters"] = {
        "denoiser": count_parameters(denoiser),
        "trainable": count_parameters(denoiser, trainable_only=True),
        "reference_copy": count_parameters(backbone._reference) if backbone._reference is not None else 0,
    }
    out["final_loss"] = result.final_metrics.get("loss")
    if store is not None:
        out["store"] = {"hits": store.hits, "misses": store.misses, "recorded": store.recorded,
                        "stored_before": len(store)}
    return out


def _family(config: Any) -> str:
    from snpo.backbones import detect_family

    return detect_family(config.model_name_or_path)


# ---- assets, cache, probes -----------------------------------------------------------------
def run_assets(spec: dict[str, Any]) -> dict[str, Any]:
    from snpo.bench.assets import pickapic_parquet, pipeline_folder

    folder, build_s = pipeline_folder(Path(spec["work_dir"]), spec["arch"], spec["seed"])
    data = pickapic_parquet(Path(spec["work_dir"]), spec["n_pairs"], spec["image_size"], spec["seed"])
    return {"model": str(folder), "model_build_s": build_s, "dataset": str(data)}


def run_cache(spec: dict[str, Any]) -> dict[str, Any]:
    from snpo.training.config import TrainConfig
    from snpo.training.run import run_cache as build

    config = TrainConfig(
        model_name_or_path=spec["model"], dataset_name=spec["dataset"], cache_dir=spec["cache_dir"],
        resolution=spec["resolution"], mixed_precision=spec["mixed_precision"],
        cache_batch_size=spec["batch_size"], report_to="none", seed=spec["seed"],
    )
    start = time.perf_counter()
    manifest = build(config, show_progress=False)
    return {"cache_build_s": time.perf_counter() - start, "num_pairs": manifest["num_pairs"],
            "random_flip": config.random_flip}


def matmul_rate(device: torch.device, dtype: torch.dtype, n: int, seconds: float = 2.0) -> float:
    """Measured dense matmul FLOP/s (``2 n^3`` per product) at this process's thread count."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    for _ in range(3):
        a @ b
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    count, start = 0, time.perf_counter()
    while True:
        for _ in range(5):
            a @ b
        count += 5
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return 2 * n**3 * count / elapsed


def _unet_shapes(model: str, lora_rank: int) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """Parameter shapes of the denoiser (the UNet, or SD3/FLUX's transformer: full fine-tune)
    and of its LoRA adapters on the family's target modules (meta device)."""
    import diffusers

    from snpo.backbones import BACKBONES, detect_family, read_model_index

    index = read_model_index(model)
    subfolder = "transformer" if "transformer" in index else "unet"
    klass = getattr(diffusers, index[subfolder][1])
    config = klass.load_config(model, subfolder=subfolder)
    with torch.device("meta"):
        unet = klass.from_config(config)
    targets = BACKBONES[detect_family(model)].lora_target_modules
    full = [tuple(p.shape) for p in unet.parameters()]
    lora = []
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and any(name.endswith(t) for t in targets):
            lora += [(lora_rank, module.in_features), (module.out_features, lora_rank)]
    return full, lora


def optimizer_timings(shapes: list[tuple[int, ...]], device: torch.device, steps: int = 3) -> dict[str, Any]:
    """Seconds per AdamW step for the for-loop, foreach and fused implementations."""
    params = [torch.nn.Parameter(torch.randn(s, device=device) * 0.01) for s in shapes]
    for p in params:
        p.grad = torch.randn_like(p) * 1e-3
    out: dict[str, Any] = {"parameters": sum(p.numel() for p in params)}
    for impl, flags in (("forloop", {"foreach": False, "fused": False}), ("foreach", {"foreach": True}),
                        ("fused", {"fused": True})):
        try:
            opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=1e-2, **flags)
            opt.step()  # allocates the state
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times = []
            for _ in range(steps):
                start = time.perf_counter()
                opt.step()
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                times.append(time.perf_counter() - start)
            out[impl] = sorted(times)[len(times) // 2]
            del opt
        except (RuntimeError, TypeError, ValueError) as err:  # an implementation this build lacks
            out[impl] = None
            out[f"{impl}_error"] = str(err).splitlines()[0]
    return out


def run_probe(spec: dict[str, Any]) -> dict[str, Any]:
    device = _device(spec)
    out: dict[str, Any] = {"threads": torch.get_num_threads()}
    if device.type == "cuda":
        out["device_name"] = torch.cuda.get_device_name(device)
        out["matmul_bf16_flops"] = matmul_rate(device, torch.bfloat16, 8192)
        out["matmul_fp32_flops"] = matmul_rate(device, torch.float32, 8192)
    else:
        out["matmul_fp32_flops"] = matmul_rate(device, torch.float32, spec.get("matmul_n", 1024))
        if spec["mixed_precision"] == "bf16":
            out["matmul_bf16_flops"] = matmul_rate(device, torch.bfloat16, spec.get("matmul_n", 1024))
    full, lora = _unet_shapes(spec["model"], spec["lora_rank"])
    out["optimizer_lora"] = optimizer_timings(lora, device)
    budget = spec.get("optimizer_full_budget", 60_000_000 if device.type == "cpu" else 10**12)
    subset, total = [], 0
    for shape in full:  # a prefix of the UNet's own tensors, up to the budget
        n = int(torch.Size(shape).numel())
        if total + n > budget:
            break
        subset.append(shape)
        total += n
    timings = optimizer_timings(subset, device, steps=2)
    full_count = sum(int(torch.Size(s).numel()) for s in full)
    timings["full_unet_parameters"] = full_count
    timings["scale_to_full"] = full_count / max(timings["parameters"], 1)
    out["optimizer_full"] = timings
    return out


# ---- entry point -----------------------------------------------------------------------------
def run_spec(spec: dict[str, Any]) -> dict[str, Any]:
    """Run one spec in this process; never raises (errors are reported in the result)."""
    threads = int(spec.get("threads", 0))
    if threads > 0:
        torch.set_num_threads(threads)
    kind = spec["kind"]
    start = time.perf_counter()
    try:
        if kind == "assets":
            out = run_assets(spec)
        elif kind == "cache":
            out = run_cache(spec)
        elif kind == "probe":
            out = run_probe(spec)
        else:
            device = _device(spec)
            count = 0 if (spec.get("count_flops", True) and spec["warmup_steps"] > 0
                          and not spec.get("torch_compile")) else None
            timer = PhaseTimer(device, count_flops_step=count)
            with tempfile.TemporaryDirectory() as tmp:
                spec = {**spec, "output_dir": spec.get("output_dir") or tmp}
                if kind == "snpo":
                    out = run_snpo(spec, timer)
                elif kind == "reference-script":
                    from snpo.bench.reference_script import run_reference_script

                    out = run_reference_script(spec, timer)
                else:
                    raise ConfigError(f"kind: unknown {kind!r}")
            out["device"] = str(device)
            out["threads"] = torch.get_num_threads()
        out["ok"] = True
    except Exception as err:  # reported, so one failing configuration does not stop the run
        out = {"ok": False, "error": f"{type(err).__name__}: {err}",
               "traceback": traceback.format_exc()[-4000:]}
    out["elapsed_s"] = time.perf_counter() - start
    out["name"] = spec.get("name", kind)
    return out


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(Path(argv[0]).read_text())
    result = run_spec(spec)
    rank = int(os.environ.get("RANK", "0"))  # several processes (spec "launch"): one file per rank
    out = Path(argv[1]) if rank == 0 else Path(f"{argv[1]}.rank{rank}")
    out.write_text(json.dumps(result, indent=1, default=str))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
