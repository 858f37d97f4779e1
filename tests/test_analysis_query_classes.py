"""Query classes of the copy task inside `sinkdlm analyze` (sinkdlm.analysis.query_classes): a hand-made
recording with hand-computed numbers, no split off the synthetic task, and `analyze` end to end."""

import json
import shutil

import pytest
import torch

from sinkdlm.analysis import query_classes as qc
from sinkdlm.analysis.stats import Trajectory
from sinkdlm.data.synthetic import CopyRule

TASK = CopyRule("bigram-backcopy", triggers=[1], eos=9)
M = 10  # the [MASK] id
ACTIVE, DORMANT, VISIBLE = (qc.QUERY_CLASSES.index(c) for c in ("active", "dormant", "visible"))


def near(x: float):
    """metrics.json rounds to 6 decimals (stats.to_py)."""
    return pytest.approx(x, abs=1e-6)


def test_classes_by_hand_from_the_canvas_or_the_true_text():
    # position 2: after a visible trigger (1) whose copy source (4 at 0) is visible -> active; 4: after 5, not a
    # trigger -> dormant; 5: after a mask -> dormant; 7: after a trigger, but its source (5) is masked -> dormant
    canvas = torch.tensor([[4, 1, M, 5, M, M, 1, M]])
    valid = torch.ones_like(canvas, dtype=torch.bool)
    classes = qc.classify(canvas, canvas == M, valid, TASK)
    assert classes.tolist() == [[VISIBLE, VISIBLE, ACTIVE, VISIBLE, DORMANT, DORMANT, VISIBLE, DORMANT]]
    # the true text knows that position 2 holds EOS, which the rule never copies into: dormant there
    text = torch.tensor([[4, 1, 9, 5, 2, 3, 1, 3]])
    assert qc.classifier(TASK, M, text)(canvas, valid)[0, 2] == DORMANT
    assert qc.classifier(TASK, M)(canvas, valid)[0, 2] == ACTIVE
    valid[0, :2] = False  # padding queries belong to no class
    assert qc.classify(canvas, canvas == M, valid, TASK)[0, :3].tolist() == [qc.NO_CLASS, qc.NO_CLASS, ACTIVE]


# one layer, one head, one dedicated sink; keys [sink, c0, c1, c2, c3]
STEP0 = torch.tensor([[0.2, 0.2, 0.2, 0.2, 0.2],         # q0 visible
                      [0.1, 0.5, 0.2, 0.1, 0.1],         # q1 visible (the trigger)
                      [0.05, 0.85, 0.05, 0.025, 0.025],  # q2 active: 0.85 on its copy source, content 0
                      [0.6, 0.1, 0.1, 0.1, 0.1]])        # q3 dormant: 0.6 on the sink
STEP1 = torch.full((4, 5), 0.2)  # everything decoded, uniform attention
CANVASES = torch.tensor([[[4, 1, M, M]], [[4, 1, 4, 3]]])  # (S, B, T): step 0 masks 2 (active) and 3 (dormant)


def hand_recording(steps: list[int]) -> Trajectory:
    """A Trajectory as the recorder writes it, from the probabilities above."""
    probs = [STEP0, STEP1]
    tokens = CANVASES[steps]
    valid = torch.ones_like(tokens, dtype=torch.bool)
    classes = torch.stack([qc.classify(tokens[i], tokens[i] == M, valid[i], TASK) for i in range(len(steps))])
    class_colsum = torch.stack([qc.class_column_sums(probs[s][None, None], classes[i])
                                for i, s in enumerate(steps)])[:, None]  # (S, L=1, B=1, H=1, C, K)
    colsum = class_colsum.sum(-2)
    ones = torch.ones_like(colsum)
    return Trajectory(layers=[0], n_sink=1, tokens=tokens, key_valid=torch.ones(len(steps), 1, 5, dtype=torch.bool),
                      query_valid=valid, colsum=colsum, value_norm=ones, key_norm=ones, query_class=classes,
                      class_colsum=class_colsum)


def test_class_metrics_by_hand():
    tr = hand_recording([0, 1])
    assert tr.query_class[0, 0].tolist() == [VISIBLE, VISIBLE, ACTIVE, DORMANT]
    assert torch.allclose(tr.class_colsum[0, 0, 0, 0, VISIBLE], STEP0[:2].sum(0))
    out = qc.class_metrics(tr, M, gu_threshold=0.3, source="canvas")
    active, dormant, visible = (out["classes"][c] for c in qc.QUERY_CLASSES)
    assert (active["queries"], dormant["queries"], visible["queries"]) == (1, 1, 6)
    assert visible["queries_per_sequence_step"] == 3.0  # 2 at step 0, 4 at step 1
    a = active["summary"]  # step 1 has no masked query: only step 0's cell counts
    assert a["gu_sink_rate"] == 1.0 and a["gu_sink_rate_first"] == 1.0 and a["gu_sink_rate_dedicated"] == 0.0
    assert a["absorption_rate"] == near(0.05) and a["absorption_uniform"] == near(1 / 5)
    assert a["absorption_ratio"] == near(0.25)
    assert a["mask_absorption"] == near(0.05) and a["mask_absorption_ratio"] == near(0.05 / 0.4)
    d = dormant["summary"]
    assert d["gu_sink_rate_dedicated"] == 1.0 and d["absorption_ratio"] == near(3.0)
    assert d["mask_absorption_ratio"] == near(0.2 / 0.4)
    v = visible["summary"]  # step 0: mean 0.35 on content 0 (a Gu sink); step 1: 0.2 everywhere (none)
    assert v["gu_sink_rate"] == 0.5 and v["gu_sink_rate_first"] == 0.5
    assert v["absorption_rate"] == near((0.3 + 0.8) / 6) and v["absorption_uniform"] == near(0.2)
    assert v["mask_absorption"] == near(0.6 / 6)
    assert v["mask_absorption_uniform"] == near((2 * 2 / 5) / 6)  # 2 of 5 keys masked for 2 of 6 queries
    assert v["mask_absorption_ratio"] == near(0.75)
    assert visible["per_layer"]["gu_sink_rate"] == [0.5]  # one layer: per layer = pooled


def test_a_class_without_queries_reads_no_queries():
    from sinkdlm.analysis.report import _query_classes_md

    out = qc.class_metrics(hand_recording([1]), M, 0.3, "canvas")  # nothing masked
    assert out["classes"]["active"]["queries"] == 0
    assert all(v is None for v in out["classes"]["active"]["summary"].values())
    assert out["classes"]["visible"]["summary"]["absorption_ratio"] == near(1.0)
    text = "\n".join(_query_classes_md(out, [0]))
    assert "| active | no queries | all | no queries |" in text and "| dormant | no queries |" in text
    assert "nan" not in text.lower() and "| visible | 4 (4.00) | 0 | 0.000 |" in text


# ---- through analyze ------------------------------------------------------------------------------


def test_a_non_synthetic_checkpoint_has_no_split(tiny_data, tmp_path):
    from sinkdlm.analysis import AnalysisConfig, run_analysis
    from sinkdlm.analysis.report import render_markdown
    from tests.test_analysis import tiny_checkpoint

    tiny_checkpoint(tiny_data, tmp_path / "run", sink_tokens=1)
    settings = AnalysisConfig(mode="masked", levels=(0.5,), interventions=False, nulls=False, progress=False)
    metrics, tr = run_analysis(tmp_path / "run", texts=["the cat sat on a mat " * 20], settings=settings)
    assert "query_classes" not in metrics and tr.query_class is None and tr.class_colsum is None
    assert "Query classes" not in render_markdown(metrics, {})
    data = shutil.copytree(tiny_data, tmp_path / "data")  # a checkpoint whose training data is gone
    tiny_checkpoint(data, tmp_path / "orphan")
    shutil.rmtree(data)
    assert "query_classes" not in run_analysis(tmp_path / "orphan", texts=["the cat sat " * 20], settings=settings)[0]


@pytest.fixture
def synthetic_run(tmp_path, monkeypatch):
    """A tiny sink model trained 4 steps on a small bigram-backcopy corpus."""
    from sinkdlm.training.trainer import train
    from tests.conftest import small_synthetic_corpus, tiny_train_config

    data = small_synthetic_corpus(tmp_path, monkeypatch)
    run = tmp_path / "run"
    train(tiny_train_config(data, run, steps=4, save_every=4, val_every=4, keep_last=0, sink_monitor_every=0))
    return run


def same_except(a: dict, b: dict, ignored: set[str]) -> bool:
    return {k: v for k, v in a.items() if k not in ignored} == {k: v for k, v in b.items() if k not in ignored}


def test_analyze_splits_a_synthetic_checkpoint_and_changes_nothing_else(synthetic_run, tmp_path, monkeypatch):
    from sinkdlm import checkpoint as ckpt
    from sinkdlm.analysis import AnalysisConfig, run_analysis
    from sinkdlm.analysis.pipeline import held_out_windows
    from sinkdlm.cli import main
    from sinkdlm.data.synthetic import NO_SOURCE, active_sources

    out = tmp_path / "report"
    assert main(["analyze", "--checkpoint", str(synthetic_run), "--out", str(out), "--steps", "4",
                 "--gen-length", "8", "--max-windows", "4", "--no-interventions"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    split = metrics["query_classes"]
    assert split["source"] == "canvas" and set(split["classes"]) == set(qc.QUERY_CLASSES)
    assert split["classes"]["visible"]["queries"] > 0 and split["classes"]["dormant"]["queries"] > 0
    assert len(split["classes"]["visible"]["per_layer"]["gu_sink_rate"]) == 2
    assert "## Query classes of the copy task" in (out / "report.md").read_text()

    settings = AnalysisConfig(mode="masked", levels=(0.5, 0.15), max_windows=4, nulls=False, interventions=False,
                              progress=False)
    metrics, tr = run_analysis(synthetic_run, settings=settings)
    assert metrics["query_classes"]["source"] == "text"
    assert torch.allclose(tr.class_colsum.sum(-2), tr.colsum, atol=1e-5)  # every real query in one class
    assert sum(c["queries"] for c in metrics["query_classes"]["classes"].values()) == int(tr.query_valid.sum())
    # masked mode classifies on the true text, as the probes do: their active queries under the same masks
    model, cfg = ckpt.load_model(synthetic_run)
    windows = held_out_windows(synthetic_run, cfg, None, None, 0, settings.max_prompts)[:settings.max_windows]
    task = CopyRule.from_meta(json.loads((tmp_path / "data" / "meta.json").read_text()))
    for step in range(2):
        active = active_sources(windows, tr.tokens[step] == model.mask_id, task) != NO_SOURCE
        assert torch.equal(active, tr.query_class[step] == ACTIVE)
    assert (tr.query_class == ACTIVE).any()
    monkeypatch.setattr(qc, "data_task", lambda path: None)  # the same analysis without the split
    unsplit, plain = run_analysis(synthetic_run, settings=settings)
    assert plain.class_colsum is None and same_except(metrics, unsplit, {"query_classes", "record_seconds", "seconds"})
