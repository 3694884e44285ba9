"""`snpo demo --quick` end to end at its smallest: the pipeline runs, the report says it carries
no evidence and gives no verdicts, its numbers come from the per-run result files, and a
second run resumes from them. (The verdict rules themselves are unit-tested with constructed
numbers in test_toy_study.py.)"""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from snpo.cli import main
from snpo.toy.study import load_result


@pytest.fixture(scope="module")
def demo_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("demo")
    # the quick sizes, smaller still: one regime, the dual baselines on
    code = main(["demo", "--quick", "--output_dir", str(root / "out"), "--cache_dir", str(root / "cache"),
                 "--show_progress", "false", "--pools", "pickapic-like", "--pretrain_steps", "40",
                 "--methods", "dpo,snpo"])
    assert code == 0
    return root / "out"


def test_a_quick_run_says_it_carries_no_evidence_and_gives_no_verdicts(demo_dir):
    report = (demo_dir / "report.md").read_text()
    assert "carry NO evidence" in report and "no verdicts" in report.lower()
    assert "**HOLDS**" not in report and "**REVERSED**" not in report and "**NOT SHOWN**" not in report
    results = json.loads((demo_dir / "results.json").read_text())
    assert results["claims"] == []
    for name in ("curves.png", "samples.png", "results.csv", "timings.json"):
        assert (demo_dir / name).is_file(), name


def test_the_tables_come_from_the_run_files(demo_dir):
    results = json.loads((demo_dir / "results.json").read_text())
    world = demo_dir / "worlds" / "world-0" / "pickapic-like"
    for name in ("reference", "dpo", "snpo", "chats", "diff-npo__before_merging", "diff-npo__merged"):
        run = load_result(world / name)
        row = results["rows"][f"pickapic-like/{run.spec.name}"]
        assert row["label"] == pytest.approx(float(np.mean(run.arrays["label"])))
        assert row["heldout"] == pytest.approx(float(np.mean(run.arrays["heldout"])))
        if "null_per_pair" in run.arrays:
            assert row["null_accuracy"] == pytest.approx(float(np.mean(run.arrays["null_per_pair"])))
    with open(demo_dir / "results.csv") as f:
        for line in csv.DictReader(f):
            assert float(line["label"]) == pytest.approx(results["rows"][f"{line['regime']}/{line['method']}"]["label"])


def test_a_second_run_resumes_from_the_run_files(demo_dir):
    cache = demo_dir.parent / "cache"
    assert not any(p.name.endswith(".tmp") for p in cache.rglob("*"))  # never half-written
    stamps = {p: p.stat().st_mtime_ns for p in demo_dir.rglob("result.json")}
    assert main(["demo", "--quick", "--output_dir", str(demo_dir), "--cache_dir", str(cache),
                 "--show_progress", "false", "--pools", "pickapic-like", "--pretrain_steps", "40",
                 "--methods", "dpo,snpo"]) == 0
    assert {p: p.stat().st_mtime_ns for p in demo_dir.rglob("result.json")} == stamps
