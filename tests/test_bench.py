"""Smoke test of `snpo bench --quick`: it runs every configuration of the plan on the tiny
architecture and reports every phase, peak memory, FLOPs and the comparisons. No timing is
asserted anywhere: numbers on a shared CPU are whatever they are."""

from __future__ import annotations

import json

import torch

from snpo.bench.config import DEFAULT_PLAN, VARIANTS, BenchConfig
from snpo.bench.timing import PHASES
from snpo.cli import main


def test_bench_quick_reports_every_configuration_and_phase(tmp_path, monkeypatch):
    monkeypatch.setenv("SNPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    assert main(["bench", "--quick", "--output_dir", str(out)]) == 0

    results = json.loads((out / "results.json").read_text())
    assert results["config"]["arch"] == "tiny"
    plan = [n for n in DEFAULT_PLAN if n != "snpo-compile"]  # compile is off in --quick
    assert results["plan"] == plan
    summary = results["summary"]
    assert summary["failures"] == {}
    expected = [n for n in plan if n != "objectives"]
    expected += [f"objectives/{o}" for o in VARIANTS["objectives"]["objectives"]]
    assert set(summary["variants"]) == set(expected)
    for name, entry in summary["variants"].items():
        assert set(entry["phases_s"]) == set(PHASES), name
        assert all(v >= 0 for v in entry["phases_s"].values()), name
        assert entry["step_s"] > 0 and entry["pairs_per_s"] > 0, name
        assert entry["peak_gib"] > 0, name
    v = summary["variants"]
    # what each configuration does shows in its phases, not in its speed
    assert v["reference-script"]["phases_s"]["encode"] > 0  # VAE + text encoder every step
    assert v["dpo"]["flops_per_step"]["total"] < v["reference-script"]["flops_per_step"]["total"]
    assert "encode" not in v["dpo"]["flops_per_step"]  # the cache: no encoder work at all
    assert "reference_forward" not in v["snpo-store-read"]["flops_per_step"]
    assert v["snpo-store-read"]["store"]["hits"] > 0
    assert v["snpo-store-write"]["store"]["recorded"] > 0
    assert v["snpo-full"]["parameters"]["reference_copy"] > 0
    assert v["chats"]["parameters"]["trainable"] == 2 * v["snpo"]["parameters"]["trainable"]
    assert v["snpo"]["mfu"] is not None

    whats = [h["what"] for h in summary["headline"]]
    assert any("reference script" in w for w in whats)
    assert all(h["ratio"] is not None for h in summary["headline"])
    assert {u["after"] for u in summary["speedups"]} >= {"dpo", "snpo", "snpo-channels-last",
                                                         "snpo-store-read"}
    assert results["probe"]["optimizer_lora"]["forloop"] > 0
    md = (out / "results.md").read_text()
    assert "| configuration | pairs/s |" in md and "reference-script" in md


def test_bench_config_plan_and_errors():
    assert "snpo-compile" not in BenchConfig().plan()  # SD-size compiles take many CPU minutes
    assert "snpo-compile" in BenchConfig(arch="tiny").plan()
    assert BenchConfig(variants=["snpo-store-read"]).plan() == ["snpo-store-write", "snpo-store-read"]
    assert "reference-script" not in BenchConfig(arch="sd3").plan()  # the diffusers script trains UNets only
    for bad in (dict(arch="sd4"), dict(arch="sd3", compare_arch="sd3"), dict(variants=["nope"]),
                dict(measure_steps=0)):
        try:
            BenchConfig(**bad).validate()
        except ValueError as err:
            assert str(err).split(":")[0] in bad
        else:
            raise AssertionError(f"{bad} accepted")


def test_bench_flow_arch_next_to_an_sd_arch(tmp_path, monkeypatch):
    """`snpo bench --arch tiny-sd3 --compare_arch tiny`: the flow architecture's rows, the SD
    architecture's rows (prefixed) in the same run, the side-by-side table, and the
    reference script skipped for the flow model with the reason (the real `--arch sd3` is
    SD3.5 Medium's shapes, BENCHMARKS.md)."""
    monkeypatch.setenv("SNPO_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "bench"
    assert main(["bench", "--arch", "tiny-sd3", "--compare_arch", "tiny", "--variants",
                 "reference-script,dpo,snpo", "--resolution", "32", "--warmup_steps", "0",
                 "--measure_steps", "1", "--isolate", "false", "--compile", "never", "--count_flops", "false",
                 "--output_dir", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    summary = results["summary"]
    assert summary["failures"] == {}
    assert set(summary["variants"]) == {"dpo", "snpo", "tiny/reference-script", "tiny/dpo", "tiny/snpo"}
    assert "UNets only" in results["skipped"]["reference-script"]
    assert [a["configuration"] for a in summary["archs"]] == ["dpo", "snpo"]
    assert all(a["step_ratio"] > 0 and a["peak_ratio"] > 0 for a in summary["archs"])
    assert results["compare"]["arch"] == "tiny" and results["compare"]["cache"]["num_pairs"] > 0
    assert summary["variants"]["snpo"]["parameters"]["denoiser"] != summary["variants"]["tiny/snpo"]["parameters"]["denoiser"]
    md = (out / "results.md").read_text()
    assert "| configuration | tiny-sd3 pairs/s | tiny pairs/s |" in md


def test_sd3_bench_arch_is_sd35_medium():
    """The `sd3` bench architecture has SD3.5 Medium's transformer: 24 blocks (13 with dual
    attention), 2.24B parameters (counted on the meta device; nothing is built)."""
    from diffusers import SD3Transformer2DModel

    from snpo.bench.assets import sd3_transformer_config

    with torch.device("meta"):
        transformer = SD3Transformer2DModel(**sd3_transformer_config("sd3"))
    n = sum(p.numel() for p in transformer.parameters())
    assert transformer.config.num_layers == 24 and len(transformer.config.dual_attention_layers) == 13
    assert 2.2e9 < n < 2.6e9, n


def test_isolated_worker_files_of_compare_arch_rows(tmp_path, monkeypatch):
    """A `compare_arch` row ("sd15/dpo") names its worker's spec file without a folder."""
    import subprocess
    from types import SimpleNamespace

    from snpo.bench.runner import Launcher

    calls = []
    monkeypatch.setattr(subprocess, "run", lambda cmd, **kw: calls.append(cmd) or SimpleNamespace(returncode=1, stderr=""))
    result = Launcher(BenchConfig(), tmp_path)({"kind": "snpo", "name": "sd15/dpo"})
    assert (tmp_path / "spec-001-sd15_dpo.json").is_file() and calls
    assert not result["ok"] and result["name"] == "sd15/dpo"
