"""No test skips where CI could run it: every optional module a test skips without is one the
test set-up (``make test``: ``pip install -e ".[test]"``) installs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent


def skipped_modules() -> dict[str, list[str]]:
    """Module -> test files that ``pytest.importorskip`` it."""
    found: dict[str, list[str]] = {}
    for path in sorted(TESTS.glob("*.py")):
        for module in re.findall(r"importorskip\(\s*[\"']([\w.]+)[\"']", path.read_text()):
            found.setdefault(module, []).append(path.name)
    return found


def test_every_importorskip_is_satisfied_by_the_test_setup():
    modules = skipped_modules()
    assert "datasets" in modules  # the Hugging Face `datasets` reader test (README's input)
    missing = {m: files for m, files in modules.items() if importlib.util.find_spec(m) is None}
    assert not missing, f"tests would skip: {missing}; add the package to the `test` extra"


def test_the_test_extra_installs_datasets():
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python 3.11+; 3.10 is supported)
    section = text.split("[project.optional-dependencies]", 1)[1]
    specs = re.findall(r"[\"']([^\"']+)[\"']", re.search(r"^test\s*=\s*\[(.*?)\]", section, re.M | re.S).group(1))
    names = {re.split(r"[<>=!~\[ ;]", spec, maxsplit=1)[0].lower() for spec in specs}
    assert {"pytest", "datasets"} <= names


def test_no_test_is_skipped_unconditionally():
    pattern = re.compile(r"pytest\.mark\.skip\b(?!if)|pytest\.skip\(")
    offenders = [p.name for p in sorted(TESTS.glob("test_*.py")) if pattern.search(p.read_text())]
    assert offenders == [], offenders
