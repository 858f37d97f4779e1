"""eval-length: ELBO and sink monitor at multiples of the training length, on tiny random models."""

from __future__ import annotations

import json
import math

import pytest
import torch

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.cli import main
from sinkdlm.data.shards import PackedData, fixed_windows
from sinkdlm.eval.likelihood import LikelihoodConfig, score_pairs
from sinkdlm.experiments import length
from sinkdlm.model import DLM
from tests.conftest import tiny_train_config

BATCH_TOL = 1e-5  # float32 forwards of the same rows in batches of different sizes


def make(tiny_data, root, sink_tokens, seq_len=32):
    cfg = tiny_train_config(tiny_data, root)
    cfg.data.seq_len = seq_len
    cfg.model.sink_tokens, cfg.model.vocab_size = sink_tokens, PackedData(tiny_data).vocab_size
    torch.manual_seed(0)
    return save_checkpoint(root, 1, DLM(cfg.model).state_dict(), cfg, {"eos_id": 0},
                           tokenizer=tiny_data / PackedData(tiny_data).meta["tokenizer_file"])


@pytest.fixture(scope="module")
def checkpoints(tiny_data, tmp_path_factory):
    root = tmp_path_factory.mktemp("length")
    return make(tiny_data, root / "sink", 1), make(tiny_data, root / "plain", 0)


def test_rows_are_the_likelihood_estimator_and_the_monitor_at_each_length(checkpoints, tiny_data):
    s = length.LengthConfig(multiples=[1, 2], windows=3, mc_num=4, batch_size=5)
    model, tokens, train_len, _ = length.held_out(checkpoints[0])
    assert train_len == 32
    row = length.measure(model, tokens, 2 * train_len, s)  # past the training length
    windows = fixed_windows(PackedData(tiny_data).tokens("val"), 64, 3)
    direct = score_pairs(model, [([], w.tolist()) for w in windows], LikelihoodConfig(mc_num=4, seed=s.seed))
    nll = [-e.loglik / 64 for e in direct]
    assert row["elbo"] == pytest.approx(sum(nll) / 3, abs=BATCH_TOL)  # another batch size, the same numbers
    assert row["elbo_lo"] < row["elbo"] < row["elbo_hi"] and row["windows"] == 3
    assert row["uniform_mass"] == pytest.approx(1 / 65)
    assert 0 < row["sink_mass"] < 1 and len(row["layers"]) == model.cfg.n_layer
    assert all(math.isfinite(r["sink_value_norm"]) for r in row["layers"])


def test_command_writes_the_table_and_continues_where_it_stopped(checkpoints, tmp_path, monkeypatch, capsys):
    out = tmp_path / "len"
    argv = ["eval-length", "--checkpoint", str(checkpoints[0]), "--checkpoint", str(checkpoints[1]),
            "--labels", "sink,plain", "--out", str(out), "--windows", "2", "--mc-num", "2"]
    assert main([*argv, "--multiples", "1,2"]) == 0
    rows = json.loads((out / length.ROWS_FILE).read_text())["rows"]
    assert [(r["label"], r["length"]) for r in rows] == [("sink", 32), ("sink", 64), ("plain", 32), ("plain", 64)]
    assert (out / length.FIGURE_FILE).is_file() and "| plain | 64 (2x)" in (out / length.TABLE_FILE).read_text()
    diffs = length.paired_differences(rows)  # plain - sink, window by window, by hand below
    by = {(r["label"], r["length"]): r["window_elbo"] for r in rows}
    assert [(d["label"], d["length"]) for d in diffs] == [("plain", 32), ("plain", 64)]
    for d in diffs:
        hand = [p - s for p, s in zip(by["plain", d["length"]], by["sink", d["length"]])]
        assert d["mean"] == pytest.approx(sum(hand) / len(hand), abs=1e-12) and d["lo"] <= d["mean"] <= d["hi"]
    assert main([*argv, "--multiples", "1,2", "--windows", "3"]) == 2  # other settings: refused, one line
    assert "--overwrite" in capsys.readouterr().err
    calls = []
    real = length.measure
    monkeypatch.setattr(length, "measure", lambda *a: calls.append(a[2]) or real(*a))
    assert main([*argv, "--multiples", "1,2,4"]) == 0
    assert calls == [128, 128]  # only the new length (past block_size 64), of each model


def test_a_split_too_short_for_the_length_is_one_line(checkpoints, tmp_path, capsys):
    assert main(["eval-length", "--checkpoint", str(checkpoints[0]), "--out", str(tmp_path / "x"),
                 "--multiples", "1000"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "drop multiple 1000" in err[0]


def test_the_training_length_defaults_to_block_size(tiny_data, tmp_path):
    """data.seq_len unset (the demo config): the model's block_size is the length it trained at."""
    _, _, train_len, _ = length.held_out(make(tiny_data, tmp_path / "ck", 1, seq_len=None))
    assert train_len == 64
