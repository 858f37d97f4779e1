"""Folders written by the code before the package was reorganised (issue 21) still load: a checkpoint
generates and resumes training, an export converts back, a study resumes without training again.

tests/data/written-before-restructure was written at commit 84bae5c (tiny model, 2 steps) by:
    sinkdlm train --data DATA --out run model.sink_tokens=1 train.max_steps=2 ... (see COMMON)
    sinkdlm export --checkpoint run/step-00000002 --out export
    sinkdlm study --preset demo --data DATA --variants plain,sink --steps 2 --tasks "" --out study ...
(figures and the step-1 checkpoints removed to keep it small)."""

import shutil
from pathlib import Path

import pytest

from sinkdlm.checkpoint import list_checkpoints, load_model
from sinkdlm.cli import main

WRITTEN = Path(__file__).parent / "data" / "written-before-restructure"
COMMON = ["model.preset=tiny", "data.seq_len=32", "data.val_windows=2", "train.global_batch=2",
          "train.micro_batch=2", "train.progress=false", "optim.warmup_min_steps=1", "train.loggers=[]"]


@pytest.fixture
def old(tmp_path) -> Path:
    return Path(shutil.copytree(WRITTEN, tmp_path / "old"))


def test_an_old_checkpoint_loads_generates_and_resumes(old, capsys):
    ckpt = old / "run" / "step-00000002"
    model, cfg = load_model(ckpt)
    assert cfg.model.sink_tokens == 1 and model.sink.shape[0] == 1
    assert main(["generate", "--checkpoint", str(ckpt), "--prompt", "the cat", "--gen-length", "4",
                 "--steps", "4"]) == 0
    assert main(["train", "--data", str(old / "data"), "--out", str(old / "run"), "--resume", "model.sink_tokens=1",
                 "train.max_steps=3", "train.save_every=3", "train.val_every=3", *COMMON]) == 0
    assert [p.name for p in list_checkpoints(old / "run")][-1] == "step-00000003"


def test_an_old_export_converts_back(old, tmp_path):
    assert main(["convert", "--from", str(old / "export"), "--out", str(tmp_path / "back")]) == 0
    back, _ = load_model(list_checkpoints(tmp_path / "back")[-1])
    original, _ = load_model(old / "run" / "step-00000002")
    assert all((back.state_dict()[k] == v).all() for k, v in original.state_dict().items())


@pytest.mark.slow
def test_an_old_study_resumes_without_training_again(old, capsys):
    # the sink metrics changed since (issue 22), so the study analyses the checkpoints again, which reads
    # the held-out text at the data path their configs recorded: point it at the copied data
    for config in (old / "study").glob("*/step-*/config.yaml"):
        config.write_text(config.read_text().replace("/tmp/fx/out/data", str(old / "data")))
    assert main(["study", "--preset", "demo", "--data", str(old / "data"), "--variants", "plain,sink", "--steps", "2",
                 "--tasks", "", "--out", str(old / "study"), "--analysis-texts", "1", *COMMON]) == 0
    said = capsys.readouterr()
    err = said.out + said.err
    assert err.count("already finished at step-00000002") == 2, err
    assert (old / "study" / "study.md").is_file()
