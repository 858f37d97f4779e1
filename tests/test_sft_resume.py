"""README's SFT path may involve a stop: `sinkdlm sft` stopped (Ctrl-C) after a checkpoint and run again with
the same command + --resume continues bit for bit, on the synthetic set it writes into the run folder (the
examples, their order, the masks, the lr schedule and AdamW's state are all restored or recomputed)."""

import json
import sys
from pathlib import Path

import torch

from sinkdlm import checkpoint as ckpt
from sinkdlm.cli import main
from sinkdlm.training import trainer
from tests.test_sft_learns import ROOT, base_checkpoint

STEPS, STOP_AFTER = 6, 4


def losses(run: Path) -> list[tuple[int, str, float]]:
    """(step, training or validation, loss) of every record of metrics.jsonl."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], key, r[key]) for r in records for key in ("loss", "val_loss") if key in r]


def test_a_stopped_and_resumed_sft_run_is_the_uninterrupted_run(tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    base = base_checkpoint(tmp_path)

    def sft(out: str, *more: str) -> int:
        return main(["sft", "--config", str(ROOT / "configs" / "sft_demo.yaml"), "--init-from", str(base),
                     "--out", str(tmp_path / out), f"train.max_steps={STEPS}", "train.save_every=2",
                     "train.val_every=2", "train.sink_monitor_every=2", "train.log_every=1",
                     "train.progress=false", *more])

    assert sft("straight") == 0
    save = trainer.Loop.save

    def save_then_stop(loop, step):
        save(loop, step)
        if step == STOP_AFTER:
            raise KeyboardInterrupt  # Ctrl-C a little after a checkpoint

    monkeypatch.setattr(trainer.Loop, "save", save_then_stop)
    assert sft("stopped") != 0
    monkeypatch.setattr(trainer.Loop, "save", save)
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "stopped")][-1] == f"step-{STOP_AFTER:08d}"
    assert sft("stopped", "--resume") == 0
    straight = losses(tmp_path / "straight")
    assert losses(tmp_path / "stopped") == straight and len(straight) == STEPS + STEPS // 2  # exact, no tolerance
    weights = [ckpt.load_weights(ckpt.list_checkpoints(tmp_path / r)[-1]) for r in ("straight", "stopped")]
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
