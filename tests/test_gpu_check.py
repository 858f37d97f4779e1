"""benchmarks.gpu_check on the CPU: the whole script on the tiny preset, and its kernel detection."""

import json
import os
import subprocess
import sys
from pathlib import Path

import torch

from benchmarks import gpu_check
from sinkdlm.config import model_preset

ROOT = Path(__file__).resolve().parents[1]


def test_gpu_check_runs_every_check_on_the_cpu(tmp_path):
    cmd = [sys.executable, "-m", "benchmarks.gpu_check", "--device", "cpu", "--preset", "tiny", "--out", str(tmp_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    result = json.loads((tmp_path / "gpu_check.json").read_text())
    assert result["ok"] and (tmp_path / "gpu_check.md").read_text().startswith("## GPU check")
    assert len(result["parity"]) == 2 * len(gpu_check.SINK_OPTIONS) == 96
    assert all(r["relative_error"] <= gpu_check.PARITY_TOLERANCE for r in result["parity"])
    assert max(r["relative_error"] for r in result["parity"]) > 0  # bf16 did round
    fast = next(r for r in result["sdpa"] if r["path"] == "sink-fast")
    assert fast["fused"] and fast["default"] and "MATH" in fast["accepted"]
    assert [r["variant"] for r in result["train_steps"]["rows"]] == ["plain", "sink-fast", "sink-dense", "gated"]
    assert all(0 < r["mfu_measured"] for r in result["train_steps"]["rows"])
    assert [r["forward_calls"] for r in result["sampler"]["rows"]] == [32, 32]
    assert result["fsdp"]["round_trip_exact"] and result["fsdp"]["shards"] == 1


def test_backend_detection_sees_what_sdpa_kernel_forces():
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from benchmarks import bench_train

    cfg = model_preset("tiny", vocab_size=50, sink_tokens=1)
    _, step = bench_train.make_step(cfg, batch=2, device=torch.device("cpu"), dtype=torch.float32)
    with sdpa_kernel([SDPBackend.MATH]):
        assert gpu_check.backends_used(step) == ["math"]
    assert "MATH" in gpu_check.backends_accepted(step)
    assert "EFFICIENT_ATTENTION" not in gpu_check.backends_accepted(step)  # no CPU kernel


def test_a_failed_check_fails_the_run():
    ok = {"parity": [{"ok": True}], "fsdp": {"round_trip_exact": True},
          "sdpa": [{"path": "sink-fast", "fused": True}, {"path": "sink-dense", "fused": False}]}
    assert gpu_check.all_ok(ok)  # the dense path may fall back to math: it is the oracle
    assert not gpu_check.all_ok({**ok, "parity": [{"ok": False}]})
    assert not gpu_check.all_ok({**ok, "sdpa": [{"path": "sink-fast", "fused": False}]})
    assert not gpu_check.all_ok({**ok, "fsdp": {"round_trip_exact": False}})


def test_datasheet_peaks_match_the_more_specific_name_first():
    assert gpu_check.datasheet_peak("NVIDIA H100 PCIe") == 756e12
    assert gpu_check.datasheet_peak("NVIDIA H100 80GB HBM3") == 989.4e12
    assert gpu_check.datasheet_peak("NVIDIA GH200 480GB") == 989.4e12
    assert gpu_check.datasheet_peak("AMD EPYC (x86_64), torch threads: 1") is None
