"""benchmarks/sft_demo.py's plumbing on the tiny SFT model: train, stop with SIGINT and resume, evaluate,
table, floor check, read back on a rerun. (The benchmark itself is ~30 min per seed: BENCHMARKS.md.)"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_sft_learns import base_checkpoint

ROOT = Path(__file__).resolve().parents[1]
SHORT = ["train.max_steps=40", "train.save_every=2", "train.val_every=40", "train.sink_monitor_every=40"]


def bench(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "benchmarks.sft_demo", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


@pytest.mark.slow
def test_the_sft_benchmark_trains_evaluates_and_checks_its_floor(tmp_path):
    base = base_checkpoint(tmp_path)
    out = tmp_path / "bench"
    done = bench("--out", str(out), "--demo", str(base), "--seeds", "3", "--stop-at", "2", "--floor", "0", *SHORT)
    assert done.returncode == 0, done.stdout + done.stderr[-2000:]
    result = json.loads((out / "result-seed3.json").read_text())
    assert result["n"] == 198 and 0 <= result["correct"] <= 198
    assert Path(result["checkpoint"]).name == "step-00000040"  # resumed to the end after any stop
    assert "| 3 | " in done.stdout and "at or above the floor of 0/198" in done.stdout
    again = bench("--out", str(out), "--demo", str(base), "--seeds", "3", "--floor", "199", *SHORT)
    assert again.returncode == 1 and "FAIL: seed(s) [3] below the floor of 199/198" in again.stdout
    assert json.loads((out / "result-seed3.json").read_text()) == result  # read back, not redone
