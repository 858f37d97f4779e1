"""`sinkdlm eval-gsm8k`: one default folder per data set, no silent overwrite, fast synthetic
defaults with an --exact escape, and a line saying what the run will take."""

import argparse
import json
import sys

import pytest

from sinkdlm.cli import main
from sinkdlm.commands import eval_gsm8k as command
from sinkdlm.eval import gsm8k
from tests.test_gsm8k import checkpoint  # noqa: F401  (fixture: a tiny model that answers 7)


def _eval(checkpoint, *extra):
    return main(["eval-gsm8k", "--checkpoint", str(checkpoint), "--limit", "2", "--no-progress", *extra])


@pytest.fixture
def cli(monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))


def test_each_data_set_has_its_own_default_folder_and_results_are_never_replaced_silently(
        checkpoint, tmp_path, cli, capsys):
    data = tmp_path / "mine.jsonl"
    data.write_text(json.dumps({"question": "1", "answer": "#### 7"}) + "\n")
    assert _eval(checkpoint, "--data", "synthetic") == 0
    assert _eval(checkpoint, "--data", str(data)) == 0
    synthetic, mine = checkpoint / "gsm8k-synthetic" / gsm8k.SUMMARY, checkpoint / "gsm8k-mine" / gsm8k.SUMMARY
    assert json.loads(synthetic.read_text())["n"] == 2 and json.loads(mine.read_text())["n"] == 1
    before = synthetic.read_text()
    capsys.readouterr()

    assert _eval(checkpoint, "--data", "synthetic", "--limit", "1") == 2  # refused: one line, result kept
    err = capsys.readouterr().err
    assert "--overwrite" in err and "gsm8k-synthetic" in err and len(err.strip().splitlines()) == 1
    assert synthetic.read_text() == before
    assert _eval(checkpoint, "--data", "synthetic", "--limit", "1", "--overwrite") == 0
    assert json.loads(synthetic.read_text())["n"] == 1


def test_the_gsm8k_test_set_keeps_its_folder(checkpoint):
    assert gsm8k.output_folder(checkpoint, None, None, overwrite=False) == checkpoint / "gsm8k"


def _args(**given):
    fields = {f: None for f in command.SAMPLE_FIELDS}
    return argparse.Namespace(**{**fields, "preset": None, "data": None, "exact": False, "one_stage": False, **given})


def test_synthetic_data_decodes_fast_by_default_and_exact_on_request():
    fast = command.settings_from(_args(data="synthetic"))
    assert all(s.threshold == 0.95 and s.cache == "dual" for s in (fast.first, fast.second))
    exact = command.settings_from(_args(data="synthetic", exact=True))
    assert all(s.threshold is None and s.cache == "none" for s in (exact.first, exact.second))
    assert exact.first.gen_length == fast.first.gen_length and exact.second.steps == fast.second.steps
    gsm8k = command.settings_from(_args())  # GSM8K keeps the demo preset, unchanged
    assert gsm8k.first.threshold is None and gsm8k.first.gen_length == 48
    assert command.settings_from(_args(data="synthetic", cache="prefix")).first.cache == "prefix"  # explicit wins


def test_it_says_what_it_will_take_before_decoding(checkpoint, tmp_path, cli, capsys):
    assert _eval(checkpoint, "--data", "synthetic", "--out", str(tmp_path), "--batch-size", "1") == 0
    err = capsys.readouterr().err
    assert "2 problems in 2 batches of up to 1" in err and "threshold 0.95, dual cache" in err
    assert "here at full cost (64 forwards x" in err and "the threshold and cache cut this" in err
