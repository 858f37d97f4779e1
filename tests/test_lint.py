"""The tree is clean under the linter configured in pyproject.toml ([tool.ruff]: pyflakes, import
order, pyupgrade, bugbear), so an unused import or a shadowed name fails the suite, not a review."""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_the_tree_is_clean_under_ruff():
    if shutil.which("ruff") is None and subprocess.run([sys.executable, "-m", "ruff", "--version"],
                                                        capture_output=True).returncode != 0:
        pytest.skip("ruff is not installed (the test extra brings it)")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "sinkdlm", "tests", "benchmarks"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-1000:]
