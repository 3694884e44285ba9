"""Medians, ratios and the markdown tables of a ``snpo bench`` run."""

from __future__ import annotations

import statistics
from typing import Any

from snpo.bench.config import split_arch, variant
from snpo.bench.timing import PHASES

GiB = 2**30
#: Diffusion-DPO on Pick-a-Pic: 2000 steps x 2048 pairs over 851k pairs = 4.8 epochs
PAPER_EPOCHS = 2000 * 2048 / 851_293

SPEEDUPS = (  # (option, before, after)
    ("latent/text cache (`snpo cache`)", "dpo-uncached", "dpo"),
    ("SDPA attention (diffusers default) vs AttnProcessor", "snpo-eager-attention", "snpo"),
    ("`channels_last: true`", "snpo", "snpo-channels-last"),
    ("`torch_compile: true`", "snpo", "snpo-compile"),
    ("fused AdamW (default) vs torch's for-loop AdamW, LoRA", "snpo-forloop-adamw", "snpo"),
    ("fused AdamW (default) vs torch's for-loop AdamW, full fine-tune", "snpo-full-forloop-adamw", "snpo-full"),
    ("`precompute_reference`: first sweep run (records)", "snpo", "snpo-store-write"),
    ("`precompute_reference`: later sweep runs (reads)", "snpo", "snpo-store-read"),
)


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _entry(steps: list[dict[str, Any]], runs: list[dict[str, Any]], batch: int) -> dict[str, Any] | None:
    if not steps:
        return None
    wall = _median([s["wall_s"] for s in steps])
    flops = next((s["flops"] for r in runs for s in r["steps"] if "flops" in s), None)
    peaks = [r["memory"]["peak_bytes"] for r in runs if r["memory"].get("peak_bytes")]
    starts = [r["memory"]["start_bytes"] for r in runs if r["memory"].get("start_bytes")]
    return {
        "measured_steps": len(steps),
        "step_s": wall,
        "step_s_all": [round(s["wall_s"], 4) for s in steps],
        "pairs_per_s": batch / wall,
        "phases_s": {p: _median([s["phases_s"].get(p, 0.0) for s in steps]) for p in PHASES},
        "cpu_step_s": _median([s["cpu_s"] for s in steps if "cpu_s" in s]),
        "phases_cpu_s": {p: _median([s.get("phases_cpu_s", {}).get(p, 0.0) for s in steps]) for p in PHASES},
        "peak_gib": max(peaks) / GiB if peaks else None,
        "start_gib": min(starts) / GiB if starts else None,
        "memory_method": runs[0]["memory"].get("method"),
        "flops_per_step": flops,
        "parameters": runs[0].get("parameters"),
        "store": runs[-1].get("store"),
        # several processes (DDP / FSDP): each rank's peak, the largest over rounds
        "peak_gib_per_rank": ([max(ps) / GiB for ps in zip(*per_rank)]
                              if (per_rank := [r["memory"]["peak_bytes_per_rank"] for r in runs
                                               if r["memory"].get("peak_bytes_per_rank")]) else None),
        "processes": runs[0].get("processes", 1),
        "live_gib": (max(lv) / GiB if (lv := [r["memory"]["live_bytes"] for r in runs
                                               if r["memory"].get("live_bytes")]) else None),
        "live_gib_per_rank": ([max(ps) / GiB for ps in zip(*live)]
                              if (live := [r["memory"]["live_bytes_per_rank"] for r in runs
                                           if r["memory"].get("live_bytes_per_rank")]) else None),
    }


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    config = results["config"]
    warmup, batch = config["warmup_steps"], config["batch_size"]
    variants: dict[str, Any] = {}
    failures: dict[str, str] = {}
    for name, runs in results["runs"].items():
        ok = [r for r in runs if r.get("ok")]
        for r in runs:
            if not r.get("ok"):
                failures[name] = str(r.get("error"))
        if not ok:
            continue
        measured = [s for r in ok for s in r["steps"][warmup:]]
        if variant(name).get("method") == "objectives":
            for objective in variant(name)["objectives"]:
                entry = _entry([s for s in measured if s.get("label") == objective], ok, batch)
                if entry:
                    entry["flops_per_step"] = None if objective != "dpo" else entry["flops_per_step"]
                    variants[f"objectives/{objective}"] = entry
        else:
            entry = _entry(measured, ok, batch)
            if entry:
                variants[name] = entry

    probe = results.get("probe") or {}
    bf16 = config["mixed_precision"] == "bf16"
    peak_rate = probe.get("matmul_bf16_flops" if bf16 else "matmul_fp32_flops")
    for entry in variants.values():
        flops = (entry.get("flops_per_step") or {}).get("total")
        if flops and entry["step_s"]:
            entry["achieved_flops"] = flops / entry["step_s"]
            entry["mfu"] = entry["achieved_flops"] / peak_rate if peak_rate else None

    def step(name: str, key: str = "step_s") -> float | None:
        return variants.get(name, {}).get(key)

    def peak(name: str) -> float | None:
        return variants.get(name, {}).get("peak_gib")

    def ratio(a: float | None, b: float | None) -> float | None:
        return a / b if a and b else None

    def npo(key: str) -> float | None:  # Diff-NPO trains two models on the same pairs
        a, b = step("dpo", key), step("npo-negative", key)
        return a + b if a and b else None

    npo_peak = max(peak("dpo") or 0, peak("npo-negative") or 0) or None
    times = [  # (what, numerator, denominator, target): ratios of step times, wall and CPU
        ("snpo default (dpo from the cache) vs the reference script: speed-up in pairs/s",
         "reference-script", "dpo", ">= 1.3x on CPU"),
        ("snpo without the cache vs the reference script: speed-up in pairs/s",
         "reference-script", "dpo-uncached", "about 1x (same work)"),
        ("SNPO vs DPO step time (interleaved, one process)", "objectives/snpo", "objectives/dpo",
         "within 5%"),
        ("BDPO vs DPO step time (interleaved, one process)", "objectives/bdpo", "objectives/dpo",
         "within 5%"),
        ("SNPO vs DPO step time (separate processes)", "snpo", "dpo", "within 5%"),
        ("Diff-NPO vs SNPO: time per trained pair (two runs: dpo + reversed labels)", "npo", "snpo",
         "paper: about 2x"),
        ("CHATS vs SNPO: time per trained pair", "chats", "snpo", "paper: 1.86x"),
        ("full fine-tune vs LoRA: step time", "snpo-full", "snpo", ""),
    ]
    headline = []
    for what, a, b, target in times:
        pick = (lambda n, k: npo(k)) if a == "npo" else step
        headline.append({"what": what, "target": target,
                         "ratio": ratio(pick(a, "step_s"), step(b)),
                         "ratio_cpu": ratio(pick(a, "cpu_step_s"), step(b, "cpu_step_s"))})
    for what, a, b, target in (  # beyond the paper (docs/method.md): only the rows the run measured
        ("DPO + SDPO safeguard vs DPO step time", "dpo-safeguard", "dpo", "paper: marginal overhead"),
        ("SNPO + SDPO safeguard vs SNPO step time", "snpo-safeguard", "snpo", ""),
        ("Diffusion-KTO vs DPO step time (the same images a step)", "kto", "dpo", ""),
        ("MaPO vs DPO step time (no reference forward)", "mapo", "dpo", "below 1"),
        ("MaPO vs SNPO full fine-tune: step time", "mapo-full", "snpo-full", "below 1"),
    ):
        if step(a) and step(b):
            headline.append({"what": what, "target": target, "ratio": ratio(step(a), step(b)),
                             "ratio_cpu": ratio(step(a, "cpu_step_s"), step(b, "cpu_step_s"))})
    for what, a, b in (
        ("DPO + SDPO safeguard vs DPO: peak memory", peak("dpo-safeguard"), peak("dpo")),
        ("Diffusion-KTO vs DPO: peak memory", peak("kto"), peak("dpo")),
        ("MaPO vs DPO: peak memory", peak("mapo"), peak("dpo")),
        ("MaPO vs SNPO full fine-tune: peak memory (no frozen reference copy)", peak("mapo-full"), peak("snpo-full")),
    ):
        if a and b:
            headline.append({"what": what, "target": "", "ratio": ratio(a, b), "ratio_cpu": None})
    for what, a, b in (
        ("snpo default vs the reference script: peak memory", peak("dpo"), peak("reference-script")),
        ("Diff-NPO vs SNPO: peak memory of its larger run", npo_peak, peak("snpo")),
        ("CHATS vs SNPO: peak memory", peak("chats"), peak("snpo")),
        ("full fine-tune vs LoRA: peak memory", peak("snpo-full"), peak("snpo")),
    ):
        headline.append({"what": what, "target": "", "ratio": ratio(a, b), "ratio_cpu": None})
    speedups = [
        {"option": option, "before": before, "after": after,
         "before_s": step(before), "after_s": step(after), "speedup": ratio(step(before), step(after)),
         "speedup_cpu": ratio(step(before, "cpu_step_s"), step(after, "cpu_step_s"))}
        for option, before, after in SPEEDUPS if step(before) and step(after)
    ]
    cache = results.get("cache") or {}
    amortised = None
    if cache.get("cache_build_s") and cache.get("num_pairs") and step("dpo") and step("reference-script"):
        per_pair = cache["cache_build_s"] / cache["num_pairs"]
        cached_pair = step("dpo") / batch
        ref_pair = step("reference-script") / batch
        amortised = {
            "build_s_per_pair": per_pair, "random_flip": cache.get("random_flip"),
            "speedup_1_epoch": ref_pair / (cached_pair + per_pair),
            "speedup_paper_schedule": ref_pair / (cached_pair + per_pair / PAPER_EPOCHS),
            "paper_epochs": PAPER_EPOCHS,
        }
    compare = config.get("compare_arch")
    archs = []
    if compare:  # the same configuration on both architectures, side by side
        for name, entry in variants.items():
            other = variants.get(f"{compare}/{name}")
            if other is None or "/" in name and name.split("/", 1)[0] == compare:
                continue
            archs.append({
                "configuration": name, "pairs_per_s": entry["pairs_per_s"], "compare_pairs_per_s": other["pairs_per_s"],
                "step_ratio": ratio(entry["step_s"], other["step_s"]),
                "cpu_ratio": ratio(entry.get("cpu_step_s"), other.get("cpu_step_s")),
                "flops_ratio": ratio((entry.get("flops_per_step") or {}).get("total"),
                                     (other.get("flops_per_step") or {}).get("total")),
                "peak_gib": entry["peak_gib"], "compare_peak_gib": other["peak_gib"],
                "peak_ratio": ratio(entry["peak_gib"], other["peak_gib"]),
                "parameters": (entry.get("parameters") or {}).get("denoiser"),
                "compare_parameters": (other.get("parameters") or {}).get("denoiser"),
            })
    return {
        "variants": variants, "failures": failures, "headline": headline,
        "speedups": speedups, "cache_amortised": amortised, "peak_matmul_flops": peak_rate,
        "archs": archs,
    }


# ---- markdown ---------------------------------------------------------------------------
def _f(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _count(n: int) -> str:
    return f"{n / 1e9:.2f}B" if n >= 1e9 else f"{n / 1e6:.1f}M"


def render_markdown(results: dict[str, Any]) -> str:
    s, config, machine = results["summary"], results["config"], results["machine"]
    probe = results.get("probe") or {}
    compare = config.get("compare_arch")
    lines = [
        f"### {config['arch']} architecture{' next to ' + compare if compare else ''} (random weights), "
        f"{config['resolution']} px, "
        f"{config['batch_size']} pairs/step, LoRA r{config['lora_rank']}, "
        f"precision {config['mixed_precision']}",
        "",
        f"- device: {machine['device']}"
        + (f"; {machine['threads_per_configuration']} torch thread(s) per configuration"
           if machine.get("threads_per_configuration") else ""),
        f"- torch {machine['torch']}; {machine['cpu_count']} CPU cores; load average (1/5/15 min) "
        f"{'/'.join(f'{x:.2f}' for x in machine['load_average_start'])} at start, "
        f"{'/'.join(f'{x:.2f}' for x in machine.get('load_average_end', []))} at end",
        f"- {config['warmup_steps']} warm-up + {config['measure_steps']} measured steps per "
        f"configuration, {config['rounds']} round(s) interleaved; medians over all measured steps",
        f"- started {machine['started']}, finished {machine.get('finished', '?')}",
        "",
        "Step times in seconds (wall clock; `CPU s` is the process's CPU time), phases in wall "
        "seconds, medians over the measured steps.",
        "",
        "| configuration | pairs/s | step s | CPU s | vs ref. script | peak GiB | data | encode "
        "| policy fwd | ref. fwd | policy bwd | optimizer | other | GFLOP/step | MFU |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, e in s["variants"].items():
        arch = split_arch(name)[0]  # a compare_arch row: against that architecture's script
        ref = s["variants"].get(f"{arch}/reference-script" if arch else "reference-script", {}).get("step_s")
        p = e["phases_s"]
        flops = (e.get("flops_per_step") or {}).get("total")
        lines.append(
            f"| {name} | {e['pairs_per_s']:.3f} | {e['step_s']:.2f} | {_f(e.get('cpu_step_s'))} | "
            f"{_f(ref / e['step_s'] if ref else None, '{:.2f}x')} | {_f(e['peak_gib'])} | "
            + " | ".join(_f(p[k]) for k in PHASES)
            + f" | {_f(flops / 1e9 if flops else None, '{:.0f}')} | {_f(e.get('mfu'), '{:.1%}')} |"
        )
    if s.get("archs"):
        arch = config["arch"]
        lines += ["", f"Architectures side by side (rows `{compare}/...` above; same run, same settings, "
                  "interleaved):", "",
                  f"| configuration | {arch} pairs/s | {compare} pairs/s | step time {arch} / {compare} "
                  f"| step CPU time {arch} / {compare} | GFLOP/step {arch} / {compare} "
                  f"| {arch} peak GiB | {compare} peak GiB | peak memory {arch} / {compare} "
                  f"| denoiser parameters {arch} / {compare} |", "|---|---|---|---|---|---|---|---|---|---|"]
        for a in s["archs"]:
            params = (f"{_count(a['parameters'])} / {_count(a['compare_parameters'])}"
                      if a.get("parameters") and a.get("compare_parameters") else "-")
            lines.append(f"| {a['configuration']} | {a['pairs_per_s']:.3f} | {a['compare_pairs_per_s']:.3f} | "
                         f"{_f(a['step_ratio'], '{:.2f}x')} | {_f(a.get('cpu_ratio'), '{:.2f}x')} | "
                         f"{_f(a.get('flops_ratio'), '{:.2f}x')} | {_f(a['peak_gib'])} | {_f(a['compare_peak_gib'])} | "
                         f"{_f(a['peak_ratio'], '{:.2f}x')} | {params} |")
    ranked = {n: e for n, e in s["variants"].items() if e.get("peak_gib_per_rank")}
    if ranked:
        lines += ["", "Peak memory of every process (VmHWM of each rank; the largest is what each GPU must "
                  "hold), full fine-tunes:", "",
                  "| configuration | processes | peak GiB per process | live GiB per process (between steps) | "
                  "trained parameters | reference copy parameters | step s |", "|---|---|---|---|---|---|---|"]
        for name, e in s["variants"].items():
            params = e.get("parameters") or {}
            per = e.get("peak_gib_per_rank") or ([e["peak_gib"]] if e.get("peak_gib") else [])
            live = e.get("live_gib_per_rank") or ([e["live_gib"]] if e.get("live_gib") else [])
            lines.append(f"| {name} | {e.get('processes', 1)} | {' / '.join(f'{x:.2f}' for x in per)} | "
                         f"{' / '.join(f'{x:.2f}' for x in live) or '-'} | "
                         f"{_count(params['trainable']) if params.get('trainable') else '-'} | "
                         f"{_count(params['reference_copy']) if params.get('reference_copy') else '-'} | "
                         f"{e['step_s']:.2f} |")
    lines += ["", "| comparison | wall clock | CPU time | target / paper |", "|---|---|---|---|"]
    for h in s["headline"]:
        lines.append(f"| {h['what']} | {_f(h['ratio'], '{:.2f}x')} | "
                     f"{_f(h.get('ratio_cpu'), '{:.2f}x')} | {h['target']} |")
    if s["speedups"]:
        lines += ["", "| speed option | before (step s) | after (step s) | speed-up (wall) "
                  "| speed-up (CPU) |", "|---|---|---|---|---|"]
        for u in s["speedups"]:
            lines.append(f"| {u['option']} | {u['before']}: {u['before_s']:.2f} | {u['after']}: "
                         f"{u['after_s']:.2f} | {u['speedup']:.2f}x | {_f(u.get('speedup_cpu'), '{:.2f}x')} |")
    a = s.get("cache_amortised")
    if a:
        lines += ["", f"Cache build: {results['cache']['cache_build_s']:.1f} s for "
                  f"{results['cache']['num_pairs']} pairs = {a['build_s_per_pair']:.2f} s/pair "
                  f"(random_flip={a['random_flip']}: both orientations encoded). Speed-up over the "
                  f"reference script counting the build: {a['speedup_1_epoch']:.2f}x for one epoch, "
                  f"{a['speedup_paper_schedule']:.2f}x over the Diffusion-DPO schedule "
                  f"({a['paper_epochs']:.1f} epochs)."]
    other = results.get("compare") or {}
    if (other.get("cache") or {}).get("cache_build_s"):
        lines += ["", f"{other['arch']} cache build: {other['cache']['cache_build_s']:.1f} s for "
                  f"{other['cache']['num_pairs']} pairs."]
    for key, title in (("optimizer_lora", "LoRA adapters"), ("optimizer_full", "full denoiser")):
        o = probe.get(key)
        if o:
            scale = o.get("scale_to_full", 1.0)
            what = f"{o['parameters'] / 1e6:.1f}M parameters" + (
                f", a prefix of the denoiser's tensors, times {scale:.1f} for all of it" if scale > 1.001 else "")
            lines.append(f"- AdamW step, {title} ({what}): " + ", ".join(
                f"{impl} {_f(o.get(impl) * scale * 1e3 if o.get(impl) is not None else None, '{:.1f}')} ms"
                for impl in ("forloop", "foreach", "fused")))
    rate = s.get("peak_matmul_flops")
    if rate:
        lines.append(f"- MFU = counted FLOPs of a step (FlopCounterMode: matmul, conv, attention, "
                     f"forward and backward, encoders included) / step time / measured "
                     f"{'bf16' if config['mixed_precision'] == 'bf16' else 'fp32'} matmul rate "
                     f"{rate / 1e9:.1f} GFLOP/s")
    for name, why in results.get("skipped", {}).items():
        lines.append(f"- skipped {name}: {why}")
    for name, err in s["failures"].items():
        lines.append(f"- FAILED {name}: {err.splitlines()[0] if err else err}")
    mem = next((e.get("memory_method") for e in s["variants"].values()), None)
    if mem:
        lines.append(f"- peak memory: {mem}, per configuration (fresh process each)"
                     if config.get("isolate") else f"- peak memory: {mem} (one process: not isolated)")
    return "\n".join(lines) + "\n"
