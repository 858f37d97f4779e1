"""`sinkdlm study`: variants share data order and budget; one table and plots come out."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinkdlm import study
from sinkdlm.errors import UserError

ROOT = Path(__file__).resolve().parents[1]


def test_variants_are_config_fields_only():
    base = study.base_config("demo")  # the demo recipe itself has a sink: "plain" must not inherit it
    plain = study.variant_config(base, "plain", 3, Path("/tmp/x"), []).model
    assert plain.sink_tokens == 0 and plain.attn_gate == "none"
    for name in study.VARIANTS:
        cfg = study.variant_config(base, name, 3, Path("/tmp/x"), [])
        assert cfg.train.seed == 3 and cfg.train.resume
        changed = {k for k, v in vars(cfg.model).items() if getattr(plain, k) != v}
        assert changed == set(study.VARIANTS[name]), name
    with pytest.raises(UserError, match="unknown variant"):
        study.parse_variants("plain,nope")


def test_summary_mean_and_std_over_seeds():
    runs = [study.Run("a", 1, Path("."), {"x": 1.0}), study.Run("a", 2, Path("."), {"x": 3.0}),
            study.Run("b", 1, Path("."), {"x": 5.0, "y": 1.0})]
    columns, table = study.summarise(runs)
    assert columns == ["x", "y"]
    assert table["a"]["x"] == (2.0, pytest.approx(2 ** 0.5), 2) and "y" not in table["a"]
    assert "| a | 2 ± 1.4 | - |" in study.markdown(columns, table)


@pytest.mark.slow
def test_study_end_to_end_on_tiny_runs(tiny_data, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "sinkdlm", "study", "--preset", "demo", "--data", str(tiny_data),
           "--variants", "plain,sink", "--steps", "3", "--tasks", "", "--out", str(out),
           "--analysis-texts", "1", "model.preset=tiny", "data.seq_len=32", "data.val_windows=4",
           "train.global_batch=4", "train.micro_batch=4", "train.progress=false", "optim.warmup_min_steps=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "study.json").read_text())
    assert [r["variant"] for r in results] == ["plain", "sink"]
    assert all("val_elbo" in r["metrics"] and "dominant-sink stability" in r["metrics"] for r in results)
    assert "dedicated-sink capture" in results[1]["metrics"]
    for name in ("loss_curves.png", "metrics.png", "study.md"):
        assert (out / name).stat().st_size > 0
    assert (out / "sink-seed1" / "analysis" / "report.md").is_file()
    # a second call resumes the finished runs instead of training again
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert again.returncode == 0 and "already holds" not in again.stderr


@pytest.mark.slow
def test_study_under_torchrun_trains_on_two_processes_and_rank_zero_alone_reports(tiny_data, tmp_path):
    """The documented multi-GPU launch, on 2 gloo CPU processes: every rank trains, one writes."""
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "sinkdlm", "study", "--preset", "demo", "--data", str(tiny_data), "--variants", "plain,sink",
           "--steps", "2", "--tasks", "", "--out", str(out), "--analysis-texts", "1", "model.preset=tiny",
           "data.seq_len=32", "data.val_windows=4", "train.global_batch=4", "train.micro_batch=2",
           "train.progress=false", "optim.warmup_min_steps=1", "train.accelerator=cpu", "train.devices=2",
           "train.strategy=ddp"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("table, plots and results in") == 1
    assert [r["variant"] for r in json.loads((out / "study.json").read_text())] == ["plain", "sink"]


def test_study_under_torchrun_refuses_to_prepare_the_demo_corpus_on_every_rank(tmp_path, monkeypatch, capsys):
    from sinkdlm.cli import main

    monkeypatch.chdir(tmp_path)  # no runs/demo-data here
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["study", "--preset", "demo", "--out", str(tmp_path / "s")]) == 2
    assert "sinkdlm prepare --source demo" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
