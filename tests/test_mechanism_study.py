"""The study's `mechanism` preset: its config, its copy-task columns by hand, its evaluators."""

import pytest

from sinkdlm.eval.probes import ELBO_BINS, KEY_TYPES, MASK_LEVELS
from sinkdlm.experiments import study, study_report


def probed(step: int, accuracy: float) -> dict:
    """A probe_run row with the given copy accuracy at every level (2 layers, 2 heads)."""
    layer = {"rate": 0.5, "max_key_attention": 0.4, "sink_share": 0.1, "uniform_share": 1 / 65,
             **{f"rate_{t}": 0.5 if t == "sink" else 0.0 for t in KEY_TYPES}}
    head = {"layer": 1, "head": 0, "active_on_source": 0.8, "active_on_sink": 0.05, "dormant_on_sink": 0.4,
            "dormant_mask_ratio": 1.5, "sink_value_ratio": 0.3}
    heads = {"dormant_mask_ratio": [[1.0, 3.0], [2.0, float("nan")]]}
    level = {"copy_accuracy": accuracy, "active_queries": 10, "layers": [layer, layer], "copy_head": head,
             "heads": heads}
    return {"step": step, "levels": {str(x): level for x in MASK_LEVELS},
            "elbo_bins": [0.5 + b for b in range(ELBO_BINS)]}


def test_mechanism_preset_config():
    cfg = study.base_config("mechanism")
    assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (2, 128, 64)
    assert cfg.train.global_batch == 64 and cfg.optim.lr == 1e-3
    assert study.StudyConfig(preset="mechanism").task_names == ""
    assert study.StudyConfig(preset="demo").task_names == study.DEFAULT_TASKS


def test_probe_columns_by_hand():
    rows = [probed(125, 0.5), probed(250, 0.95), probed(375, 0.99)]
    values, baselines = study.probe_columns(rows, bigram_copy=0.3)
    assert values["steps to 0.9 copy acc"] == 250
    assert values[f"copy acc @{MASK_LEVELS[0]}"] == 0.99 and baselines[f"copy acc @{MASK_LEVELS[1]}"] == 0.3
    assert values[f"dormant [MASK] x uniform L0 @{MASK_LEVELS[0]}"] == 2.0  # mean over heads
    assert values[f"dormant [MASK] x uniform L1 @{MASK_LEVELS[0]}"] == 2.0  # a head without dormant queries skipped
    assert values[f"copy head: sink value ratio @{MASK_LEVELS[1]}"] == pytest.approx(0.3)
    assert values["ELBO t 0.0-0.2"] == 0.5 and values["ELBO t 0.8-1.0"] == 4.5
    never, _ = study.probe_columns([probed(125, 0.5), probed(250, 0.6)], None)
    assert never["steps to 0.9 copy acc"] == 375  # censored: one checkpoint interval past the last
    plain = probed(125, 0.5)
    for level in plain["levels"].values():  # a plain model: no sink, so no sink value ratio (probes give NaN)
        level["copy_head"] = {**level["copy_head"], "sink_value_ratio": float("nan")}
    assert not any(k.startswith("copy head: sink value ratio") for k in study.probe_columns([plain], None)[0])


def test_mechanism_evaluators_are_the_probes_without_benchmarks():
    names = [e.name for e in study.default_evaluators(study.StudyConfig(preset="mechanism"), synthetic_data=True)]
    assert names == ["sinks", "probes"]


# ---- the pre-registered tests P1-P5 on a hand-made 4-seed study (no training) ------------------------

LO, HI = MASK_LEVELS
SEEDS = (1, 2, 3, 4)


def mechanism_runs() -> list:
    """4 variants x 4 seeds with the probe columns each P reads, numbers chosen so every statistic is
    worked out by hand in the tests below."""
    from pathlib import Path

    from sinkdlm.experiments.study_report import Run

    dormant = {1: (0.40, 0.30), 2: (0.5, 0.5), 3: (0.2, 0.2), 4: (0.6, 0.6)}  # means 0.35, 0.5, 0.2, 0.6
    active = {1: (0.05, 0.05), 2: (0.1, 0.0), 3: (0.0, 0.0), 4: (0.2, 0.2)}  # means 0.05, 0.05, 0, 0.2
    value_ratio = {1: (0.2, 0.4), 2: (0.4, 0.4), 3: (0.5, 0.5), 4: (0.6, 0.6)}  # means 0.3, 0.4, 0.5, 0.6
    mask = {1: (4, 2, 3, 3), 2: (2.5,) * 4, 3: (3.5,) * 4, 4: (2.0,) * 4}  # pooled 3, 2.5, 3.5, 2
    copy = {1: 0.90, 2: 0.92, 3: 0.94, 4: 0.96}
    zero_value_shift = {1: 0.0, 2: 0.01, 3: -0.01, 4: 0.0}
    elbo_shift = {1: 0.001, 2: -0.001, 3: 0.002, 4: -0.002}
    sink_gain = {1: -0.1, 2: -0.2, 3: -0.1, 4: -0.2}
    plain_bins = (2.0, 2.2, 2.4, 2.6, 2.8)

    def bins(shift: float) -> dict:
        return {f"ELBO t {b / ELBO_BINS:.1f}-{(b + 1) / ELBO_BINS:.1f}": v + shift for b, v in enumerate(plain_bins)}

    runs = []
    for s in SEEDS:
        plain = {"val_elbo": 2.5, **bins(0.0), "steps to 0.9 copy acc": 500.0,
                 "event-locked change": (0.1, 0.2, 0.15, 0.15)[s - 1],
                 "event-locked change, one-token-reveal null": (0.0, 0.0, 0.05, 0.05)[s - 1],
                 "dominant-key stability": 0.5, "stability, one-token-reveal null": 0.5}
        for (layer, level), ratio in zip([(0, LO), (1, LO), (0, HI), (1, HI)], mask[s]):
            plain[f"dormant [MASK] x uniform L{layer} @{level}"] = ratio
        sink = {"val_elbo": 2.4, **bins(sink_gain[s]), "steps to 0.9 copy acc": 375.0}
        for i, level in enumerate(MASK_LEVELS):
            sink |= {f"copy acc @{level}": copy[s], f"copy head: dormant on sink @{level}": dormant[s][i],
                     f"copy head: active on sink @{level}": active[s][i],
                     f"copy head: sink value ratio @{level}": value_ratio[s][i]}
        zero = dict(sink) | {f"copy acc @{level}": copy[s] + zero_value_shift[s] for level in MASK_LEVELS}
        zero["val_elbo"] = 2.4 + elbo_shift[s]
        runs += [Run("plain", s, Path("."), plain), Run("sink", s, Path("."), sink),
                 Run("sink_zero_value", s, Path("."), zero), Run("sink_sees_all", s, Path("."), dict(sink))]
    return runs


def test_p1_dormant_minus_active_by_hand():
    p1 = study_report.p1_sink_absorbs(mechanism_runs())
    # per seed (dormant - active), each the mean over the two levels: 0.30, 0.45, 0.20, 0.40; mean 0.3375,
    # sd 0.11087, t = 0.3375 / (0.11087 / 2) = 6.088 on 3 df, one-sided p = 0.00445 (scipy: 0.0044494)
    assert p1.values == pytest.approx([0.30, 0.45, 0.20, 0.40])
    assert p1.p == pytest.approx(0.0044494, abs=1e-6)
    # seeds 1 and 2 pass (>= 0.3, <= 0.1); seed 3's dormant 0.2 and seed 4's active 0.2 do not: 2 of 4 < 3
    assert "2 of 4 seeds" in p1.detail and p1.supported is False and not p1.refuted
    runs = mechanism_runs()
    for run in runs:  # dormant 0.05 on the sink with copy accuracy 0.9-0.96: the refutation clause
        if run.variant == "sink":
            run.metrics |= {f"copy head: dormant on sink @{level}": 0.05 for level in MASK_LEVELS}
    assert study_report.p1_sink_absorbs(runs).refuted


def test_p2_mask_ratio_and_event_locked_by_hand():
    p2 = study_report.p2_moving_mask_sinks(mechanism_runs())
    # pooled over layers and levels: 3, 2.5, 3.5, 2 -> minus 2: 1, 0.5, 1.5, 0; mean 0.75, sd 0.6455,
    # t = 2.324 on 3 df, one-sided p = 0.0514 (scipy: 0.051364)
    assert p2.values == pytest.approx([1.0, 0.5, 1.5, 0.0]) and p2.p == pytest.approx(0.051364, abs=1e-6)
    # event-locked minus its null 0.1, 0.2, 0.1, 0.1: mean 0.125, sd 0.05, low 0.125 - 3.182 x 0.025 = 0.045 > 0
    assert p2.supported and not p2.refuted and "0.125 [0.0454" in p2.detail
    runs = mechanism_runs()
    for run in runs:
        if run.variant == "plain":
            run.metrics["event-locked change, one-token-reveal null"] = run.metrics["event-locked change"]
            run.metrics |= {"dominant-key stability": 0.95, "stability, one-token-reveal null": 0.92}
    again = study_report.p2_moving_mask_sinks(runs)
    assert again.supported is False and again.refuted  # no excess over the null; a fixed position both times


def test_p3_value_ratio_by_hand():
    p3 = study_report.p3_low_value_norm(mechanism_runs())
    # ratios 0.3, 0.4, 0.5, 0.6 (seed 1: mean of 0.2 and 0.4) minus 1: mean -0.55, sd 0.1291,
    # t = -8.52 on 3 df, one-sided (below) p = 0.0017 (scipy: 0.0016979); mean ratio 0.45 < 0.5
    assert p3.values == pytest.approx([-0.7, -0.6, -0.5, -0.4]) and p3.p == pytest.approx(0.0016979, abs=1e-6)
    assert p3.supported and not p3.refuted
    runs = mechanism_runs()
    for run in runs:
        if run.variant == "sink":
            run.metrics |= {f"copy head: sink value ratio @{level}": 1.2 for level in MASK_LEVELS}
    assert study_report.p3_low_value_norm(runs).refuted


def test_p4_tost_by_hand():
    p4 = study_report.p4_zero_value_is_enough(mechanism_runs())
    # copy acc differences 0, 0.01, -0.01, 0: mean 0, sd 0.008165, se 0.0040825; each one-sided test
    # t = 0.02 / 0.0040825 = 4.899 on 3 df, p = 0.00814 (scipy: 0.0081383); the ELBO differences
    # (±0.001, ±0.002: se 0.000913, t = 21.9) give a far smaller p, so p = the copy accuracy's
    assert p4.values == pytest.approx([0.0, 0.01, -0.01, 0.0], abs=1e-12)
    assert p4.p == pytest.approx(0.0081383, abs=1e-6) and p4.supported
    runs = mechanism_runs()
    for run in runs:
        if run.variant == "sink_zero_value":
            run.metrics["val_elbo"] += 0.05  # 0.05 nats worse in every seed: outside the margin
    far = study_report.p4_zero_value_is_enough(runs)
    assert far.supported is False and far.p > 0.999  # mean 0.05 above +0.02 by 33 standard errors


def test_p5_elbo_gain_by_hand():
    p5 = study_report.p5_where_the_gain_is(mechanism_runs())
    # pooled over the 5 bins, sink - plain = the shift: -0.1, -0.2, -0.1, -0.2; mean -0.15, sd 0.05774,
    # t = -5.196 on 3 df, two-sided p = 0.0138 (scipy: 0.013847); steps to 90%: 375 - 500 = -125 in each seed
    assert p5.values == pytest.approx([-0.1, -0.2, -0.1, -0.2]) and p5.p == pytest.approx(0.013847, abs=1e-6)
    assert p5.supported is None and "0.0-0.2 -0.15" in p5.detail and "difference -125" in p5.detail


def test_mechanism_family_is_holm_corrected_over_p1_to_p5():
    runs = mechanism_runs()
    for run in runs:
        run.info = {"steps": 10, "tokens": 1280, "epochs": 0.5, "params": 1000}
    text, results = study_report.render("t", "sinkdlm study --preset mechanism", runs, study_report.mechanism_family(runs))
    rows = {row["label"]: row for row in results["preregistered"]}
    # p: P3 0.0017, P1 0.00445, P4 0.00814, P5 0.01385, P2 0.05136 -> x5, x4, x3, x2, x1 (kept increasing)
    expected = {"P3": 5 * 0.0016979, "P1": 4 * 0.0044494, "P4": 3 * 0.0081383, "P5": 2 * 0.013847, "P2": 0.051364}
    assert {k: row["holm_p"] for k, row in rows.items()} == pytest.approx(expected, abs=1e-5)
    assert {k: row["outcome"] for k, row in rows.items()} == {
        "P1": "not supported", "P2": "not supported", "P3": "supported", "P4": "supported", "P5": ""}
    assert "## Pre-registered comparisons (Holm over 5)" in text and "| P3 | sink | copy head: sink value-norm" in text
    # a study without sink_zero_value: P4 not measured, but it still counts in the registered family of 5
    partial = [run for run in runs if run.variant != "sink_zero_value"]
    _, results = study_report.render("t", "c", partial, study_report.mechanism_family(partial))
    rows = {row["label"]: row for row in results["preregistered"]}
    assert rows["P4"]["interval"] is None and rows["P4"]["outcome"] == "not tested"
    assert rows["P3"]["holm_p"] == pytest.approx(5 * 0.0016979, abs=1e-5)


def test_old_sink_metrics_are_not_reused(tmp_path, monkeypatch):
    import json

    from sinkdlm import checkpoint
    from sinkdlm.experiments.study_report import Run

    monkeypatch.setattr(checkpoint, "resolve", lambda path: tmp_path / "step-10")
    (tmp_path / study.EVAL_CACHE).write_text(json.dumps({"checkpoint": "step-10", "evaluations": {
        "sinks": {"key": {"texts": 16}, "metrics": {"x": 1.0}, "baselines": {}}}}))  # before the version
    key = study.sink_evaluator(16).key
    assert key == {"texts": 16, "metrics_version": study.SINK_METRICS_VERSION}
    run = Run("sink", 1, tmp_path)
    study.evaluate_runs([run], [study.Evaluator("sinks", key, lambda run: ({"x": 2.0}, {}))])
    assert run.metrics == {"x": 2.0} and study.StudyConfig().analysis_texts >= 16


def test_a_synthetic_study_writes_the_family(tmp_path, monkeypatch):
    for figure in ("plot_metric_bars", "plot_paired"):  # the figures have their own tests; ~10 s here
        monkeypatch.setattr(study_report, figure, lambda *args: None)
    runs = mechanism_runs()
    for run in runs:
        run.info = {"steps": 10, "tokens": 1280, "epochs": 0.5, "params": 1000}
    text = study.write_study(tmp_path, "t", "sinkdlm study --preset mechanism", runs, synthetic_data=True)
    assert "(Holm over 5)" in text and "| P5 | sink − plain |" in (tmp_path / "study.md").read_text()
    assert "Pre-registered comparisons" not in study.write_study(tmp_path, "t", "c", runs)
