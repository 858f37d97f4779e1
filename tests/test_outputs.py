"""What people read: generate's text/JSONL output, analyze's summary and report, the demo's last
lines, and intervals that do not collapse at 0% or 100%."""

import io
import json
import math
import re
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.cli import main
from sinkdlm.config import Config, DataConfig
from sinkdlm.model import DLM
from tests.conftest import tiny

ROOT = Path(__file__).resolve().parents[1]
EOS = 0


class FakeStream(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


# ---- generate ------------------------------------------------------------------------------------


def test_generate_format_is_text_on_a_terminal_and_jsonl_into_files_and_pipes():
    from sinkdlm.commands.generate import output_format

    assert output_format("auto", FakeStream(tty=True)) == "text"
    assert output_format("auto", FakeStream(tty=False)) == "jsonl"
    assert output_format("jsonl", FakeStream(tty=True)) == "jsonl"
    assert output_format("text", FakeStream(tty=False)) == "text"


def test_text_format_keeps_newlines_and_jsonl_round_trips():
    from sinkdlm.commands.generate import format_sample

    text = format_sample("text", 2, "ROMEO:", "Good night,\nsweet prince")
    assert "Good night,\nsweet prince" in text and "\\n" not in text
    assert text.index("--- prompt 2 ---") < text.index("ROMEO:") < text.index("--- completion 2 ---")
    row = json.loads(format_sample("jsonl", 2, "ROMEO:", "a\nb"))
    assert row == {"prompt": "ROMEO:", "completion": "a\nb"}


def word_checkpoint(root: Path) -> Path:
    vocab = {"<|endoftext|>": EOS, "[UNK]": 1, **{f"w{i}": i for i in range(2, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(root / "tok.json"))
    torch.manual_seed(0)
    cfg = tiny(sink_tokens=1)
    return save_checkpoint(root / "run", 1, DLM(cfg).state_dict(), Config(model=cfg), {"eos_id": EOS},
                           root / "tok.json")


def test_generate_writes_text_or_jsonl_as_asked(tmp_path, monkeypatch, capsys):
    import sys

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    ckpt = word_checkpoint(tmp_path)
    common = ["generate", "--checkpoint", str(ckpt), "--prompt", "w3 w4", "--prompt", "w5", "--gen-length", "4",
              "--steps", "4"]
    assert main([*common, "--format", "text", "--output", str(tmp_path / "out.txt")]) == 0
    text = (tmp_path / "out.txt").read_text()
    assert text.startswith("--- prompt 1 ---\nw3 w4\n--- completion 1 ---\n") and "--- prompt 2 ---\nw5\n" in text
    assert main(common) == 0  # stdout captured by pytest is no terminal: JSONL
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == ["w3 w4", "w5"]


# ---- intervals -----------------------------------------------------------------------------------


def test_wilson_interval_matches_hand_computed_values():
    from sinkdlm.intervals import format_share, wilson_interval

    # 0 of 100: upper bound z^2 / (n + z^2) = 3.8415 / 103.8415
    assert wilson_interval(0, 100) == (0.0, pytest.approx(0.036994, abs=1e-6))
    assert wilson_interval(100, 100) == (pytest.approx(1 - 0.036994, abs=1e-6), 1.0)
    # 65 of 200: centre (0.325 + 1.9208 / 200) / 1.019208,
    # half-width 1.96 * sqrt(0.325 * 0.675 / 200 + 0.9604 / 40000) / 1.019208
    lo, hi = wilson_interval(65, 200)
    assert (lo, hi) == (pytest.approx(0.263916, abs=1e-6), pytest.approx(0.392680, abs=1e-6))
    assert format_share(0.0, 100) == "0.0 [0.0, 3.7]" and format_share(0.325, 200) == "32.5 [26.4, 39.3]"
    assert format_share(0.0, 0) == "n/a (no items)"  # an empty run prints, not crashes
    with pytest.raises(ValueError):
        wilson_interval(3, 2)


def test_one_plus_minus_notation_in_code_and_docs():
    """Spreads read `±` everywhere; shares carry a Wilson interval rather than a `+-` standard error."""
    offenders = [f"{p.relative_to(ROOT)}:{i}" for folder in ("sinkdlm", "docs")
                 for p in (ROOT / folder).rglob("*") if p.suffix in (".py", ".md")
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1)
                 if re.search(r"\+-|\+/-", line)]
    assert not offenders, offenders


# ---- demo ----------------------------------------------------------------------------------------


def test_demo_ends_with_the_uniform_reference_and_the_next_commands(tmp_path):
    from sinkdlm.experiments.demo import NEXT_STEPS, ending

    ckpt = save_checkpoint(tmp_path / "run", 1, DLM(tiny()).state_dict(), Config(model=tiny()), {"eos_id": EOS})
    text = ending(ckpt, "runs/mine")
    assert f"ln 50 = {math.log(50):.3f} nats/token" in text
    assert 'sinkdlm generate --checkpoint runs/mine --prompt "ROMEO:"' in text
    readme = (ROOT / "README.md").read_text()
    after = readme[readme.index("## After the demo"):].split("```")[1]
    for command in NEXT_STEPS:  # what the demo prints is what README says, in README's order
        assert command.format(run="runs/demo") in after, command
    positions = [after.index(c.format(run="runs/demo")) for c in NEXT_STEPS]
    assert positions == sorted(positions)


# ---- analyze -------------------------------------------------------------------------------------


def test_every_summary_metric_has_a_definition():
    from sinkdlm.analysis.report import DEFINITIONS, HEADLINE
    from sinkdlm.analysis.stats import SUMMARY_KEYS

    assert set(DEFINITIONS) == set(SUMMARY_KEYS) and set(HEADLINE) <= set(DEFINITIONS)


def test_uniform_baselines_by_hand():
    from sinkdlm.analysis.stats import Trajectory, uniform_baselines

    steps, keys, mask_id = 3, 5, 9  # 1 sink + 4 content keys, one sequence
    tokens = torch.tensor([[[9, 9, 2, 3]], [[9, 2, 2, 3]], [[1, 2, 2, 3]]])  # 3 of 12 inputs are [MASK]
    zeros = torch.zeros(steps, 1, 1, 1, keys)
    tr = Trajectory(layers=[0], n_sink=1, tokens=tokens, key_valid=torch.ones(steps, 1, keys, dtype=torch.bool),
                    query_valid=torch.ones(steps, 1, 4, dtype=torch.bool), colsum=zeros, value_norm=zeros,
                    key_norm=zeros)
    b = uniform_baselines(tr, mask_id)
    assert b["dominant_stability"] == pytest.approx(1 / 5) and b["content_dominant_stability"] == pytest.approx(1 / 4)
    assert b["absorption_rate"] == pytest.approx(1 / 5) and b["mask_share_of_sinks"] == pytest.approx(3 / 12)
    assert b["distinct_dominant_positions"] == pytest.approx(5 * (1 - 0.8 ** 3))  # 2.44 of 3 draws among 5


def analysis_checkpoint(data_path: Path, out: Path) -> Path:
    """A random tiny sink model on the byte-level BPE of `tiny_data`, with a training log beside it."""
    from sinkdlm.data.shards import PackedData

    data = PackedData(data_path)
    cfg = Config(model=tiny(vocab_size=data.vocab_size, sink_tokens=1),
                 data=DataConfig(path=str(data_path), seq_len=32))
    torch.manual_seed(0)
    ckpt = save_checkpoint(out, 5, DLM(cfg.model).state_dict(), cfg, {"eos_id": data.eos_id},
                           tokenizer=data.path / data.meta["tokenizer_file"])
    (out / "metrics.jsonl").write_text(json.dumps({"step": 5, "val_loss": 5.4321}) + "\n")
    return ckpt


def test_analyze_prints_a_summary_and_the_report_defines_metrics_and_decodes_tokens(tiny_data, tmp_path, capsys):
    from sinkdlm.analysis.report import DEFINITIONS

    analysis_checkpoint(tiny_data, tmp_path / "run")
    out = tmp_path / "report"
    assert main(["analyze", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--steps", "4", "--gen-length",
                 "4", "--top-k", "1", "--elbo-samples", "2", "--max-windows", "2", "--rule", "top1"]) == 0
    printed = capsys.readouterr().out
    assert not printed.lstrip().startswith("{") and f"report: {out / 'report.md'}" in printed
    assert "dominant_stability" in printed and DEFINITIONS["dominant_stability"] in printed
    report = (out / "report.md").read_text()
    for key, definition in DEFINITIONS.items():
        assert re.search(rf"\| {key} \| [^|]+ \| [^|]+ \| {re.escape(definition)} \|", report), key
    metrics = json.loads((out / "metrics.json").read_text())
    shown = [t for t, _ in metrics["sinks"]["sink_token_text"]]
    assert not any(glyph in t for t in shown for glyph in "ĠĊ"), shown  # decoded, not byte-level BPE pieces
    assert not re.search("[ĠĊ]", report)
    assert "5.4321" in report and "Why this held-out ELBO differs" in report  # training's value, explained
    assert "2 windows of 32 tokens" in report and "8 windows" not in report


# ---- study figures and table -----------------------------------------------------------------------


def test_study_metric_axes_span_each_metrics_natural_range():
    from sinkdlm.experiments import study_report

    assert study_report.axis_range("arc_easy" + study_report.ACCURACY_SUFFIX, 33.0) == (0.0, 100.0)
    assert study_report.axis_range("sink-set IoU (non-empty pairs)", 0.9) == (0.0, 1.0)
    assert study_report.axis_range("event-locked change", 0.3) == (-1.0, 1.0)  # a difference of two shares
    assert study_report.axis_range("val_elbo", 6.2) == (0.0, pytest.approx(6.2 * study_report.HEADROOM))
    columns, table = study_report.summarise([study_report.Run("a", 1, Path("."), {"val_elbo": 6.0})])
    assert "mean ± standard deviation over seeds" in study_report.markdown(columns, table)
