"""`sinkdlm study`: variants share data order and budget; one table and plots come out."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sinkdlm.errors import UserError
from sinkdlm.experiments import study, study_report

ROOT = Path(__file__).resolve().parents[1]


def test_variants_are_config_fields_only():
    base = study.base_config("demo")  # the demo recipe itself has a sink: "plain" must not inherit it
    plain = study.variant_config(base, "plain", 3, Path("/tmp/x"), []).model
    assert plain.sink_tokens == 0 and plain.attn_gate == "none"
    for name in study.VARIANTS:
        cfg = study.variant_config(base, name, 3, Path("/tmp/x"), [])
        assert cfg.train.seed == 3 and cfg.train.resume
        changed = {k for k, v in vars(cfg.model).items() if getattr(plain, k) != v}
        assert changed == set(study.variant_fields(name, plain)), name
    with pytest.raises(UserError, match="unknown variant"):
        study.parse_variants("plain,nope")


def test_summary_mean_and_std_over_seeds():
    runs = [study.Run("a", 1, Path("."), {"x": 1.0}), study.Run("a", 2, Path("."), {"x": 3.0}),
            study.Run("b", 1, Path("."), {"x": 5.0, "y": 1.0})]
    columns, table = study_report.summarise(runs)
    assert columns == ["x", "y"]
    assert table["a"]["x"] == (2.0, pytest.approx(2 ** 0.5), 2) and "y" not in table["a"]
    assert "| a | 2 ± 1.4 | - |" in study_report.markdown(columns, table)


@pytest.mark.slow
def test_study_end_to_end_on_tiny_runs(tiny_data, tmp_path):
    out = tmp_path / "study"
    cmd = [sys.executable, "-m", "sinkdlm", "study", "--preset", "demo", "--data", str(tiny_data),
           "--variants", "plain,sink", "--steps", "3", "--tasks", "", "--out", str(out),
           "--analysis-texts", "1", "model.preset=tiny", "data.seq_len=32", "data.val_windows=4",
           "train.global_batch=4", "train.micro_batch=4", "train.progress=false", "optim.warmup_min_steps=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((out / "study.json").read_text())["runs"]
    assert [r["variant"] for r in results] == ["plain", "sink"]
    assert all("val_elbo" in r["metrics"] and "dominant-key stability" in r["metrics"] for r in results)
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
    assert [r["variant"] for r in json.loads((out / "study.json").read_text())["runs"]] == ["plain", "sink"]


def test_study_under_torchrun_refuses_to_prepare_the_demo_corpus_on_every_rank(tmp_path, monkeypatch, capsys):
    from sinkdlm.cli import main

    monkeypatch.chdir(tmp_path)  # no runs/demo-data here
    monkeypatch.setenv("WORLD_SIZE", "2")
    assert main(["study", "--preset", "demo", "--out", str(tmp_path / "s")]) == 2
    assert "sinkdlm prepare --source demo" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# ---- statistics over seeds ------------------------------------------------------------------------


def test_t_quantiles_match_the_tables():
    from sinkdlm.intervals import t_interval, t_quantile

    for df, expected in ((1, 12.7062), (2, 4.3027), (4, 2.7764), (9, 2.2622), (30, 2.0423)):
        assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4), df
    low, high = t_interval([1.0, 2.0, 3.0])  # mean 2, sd 1, n 3: 2 ± 4.3027 / sqrt(3)
    half = 4.3027 / 3 ** 0.5
    assert (low, high) == (pytest.approx(2 - half, abs=1e-4), pytest.approx(2 + half, abs=1e-4))
    assert t_interval([5.0]) is None


def runs_by_hand() -> list:
    """plain and sink over seeds 1-3 (same seeds: paired), gate over seeds 1-2."""
    elbo = {("plain", 1): 6.0, ("plain", 2): 6.2, ("plain", 3): 6.1, ("sink", 1): 5.9, ("sink", 2): 6.05,
            ("sink", 3): 6.0, ("gate", 1): 5.0, ("gate", 2): 6.4}
    return [study.Run(v, s, Path("."), {"val_elbo": x, "absorption": 0.05 * s}, {"absorption": 0.02})
            for (v, s), x in elbo.items()]


def test_paired_differences_use_the_same_seeds_and_say_when_not_resolved():
    diffs = study_report.paired(runs_by_hand())
    assert list(diffs) == ["sink − plain", "gate − plain", "gate − sink"]
    sink = diffs["sink − plain"]["val_elbo"]  # differences -0.1, -0.15, -0.1: mean -0.35 / 3, sd 0.05 / sqrt(3)
    half = 4.3027 * (0.05 / 3 ** 0.5) / 3 ** 0.5
    assert (sink.n, sink.mean) == (3, pytest.approx(-0.35 / 3))
    assert sink.low == pytest.approx(-0.35 / 3 - half, abs=1e-4)
    assert sink.high == pytest.approx(-0.35 / 3 + half, abs=1e-4)
    assert sink.resolved and "not resolved" not in sink.cell()
    gate = diffs["gate − plain"]["val_elbo"]  # seeds 1 and 2 only: -1.0 and +0.2
    assert gate.n == 2 and gate.mean == pytest.approx(-0.4) and not gate.resolved
    assert gate.cell().endswith("not resolved")
    single = study_report.paired([study.Run("plain", 1, Path("."), {"x": 1.0}),
                                  study.Run("sink", 1, Path("."), {"x": 2.0})])
    assert single["sink − plain"]["x"].cell() == "1 (n=1: no interval)"
    same = study_report.Interval.of([0.5 - 0.5, 0.25 - 0.25, 0.0])  # a null that does not depend on the variant
    assert same.cell() == "0 (identical in every seed)"


def test_within_variant_excess_over_the_uniform_baseline():
    within = study_report.excess(runs_by_hand())
    sink = within["sink"]["absorption − uniform"]  # 0.05 s - 0.02 for s = 1, 2, 3: mean 0.08
    assert sink.mean == pytest.approx(0.08) and sink.n == 3
    assert "stability − fixed-text null" not in within["sink"]  # no such column measured


def test_study_markdown_and_json_carry_spread_intervals_and_baselines(tmp_path):
    runs = runs_by_hand()
    for r in runs:
        r.info = {"steps": 10, "tokens": 1280, "epochs": 0.5, "params": 1000}
    text, results = study_report.render("t", "sinkdlm study", runs)
    assert "| uniform baseline | - | 0.02 | |" in text and "| sink − plain | " in text
    assert results["paired"]["gate − plain"]["val_elbo"]["n"] == 2
    assert results["per_variant"]["sink"]["val_elbo"]["n"] == 3 and "Student t" in results["interval"]
    assert "| sink, seed 2 | 10 | 1,280 | 0.50 | 1,000 |" in text


def test_the_baseline_row_shows_a_range_where_variants_have_different_baselines():
    runs = [study.Run("plain", 1, Path("."), {"stability": 0.8}, {"stability": 1 / 48}),  # 48 keys
            study.Run("sink", 1, Path("."), {"stability": 0.7}, {"stability": 1 / 49})]  # + the sink's key
    for r in runs:
        r.info = {"steps": 10, "tokens": 1280, "epochs": 0.5, "params": 1000}
    text, results = study_report.render("t", "sinkdlm study", runs)
    assert "| uniform baseline | 0.02041-0.02083 (by variant) | |" in text  # not their mean, 0.02062
    assert results["uniform_baseline"] == {"plain": {"stability": 1 / 48}, "sink": {"stability": 1 / 49}}


# ---- the parameter-matched gate and the checkpoints a study keeps ----------------------------------


@pytest.mark.parametrize("preset", ["tiny", "demo", "6"])
def test_the_matched_gate_has_the_plain_models_non_embedding_parameters_within_one_percent(preset):
    from sinkdlm.config import gate_params
    from sinkdlm.model import DLM

    base = study.base_config("demo" if preset == "tiny" else preset)  # 6: the paper's recipe at SMDM's 6M size
    overrides = ["model.preset=tiny"] if preset == "tiny" else []
    counts = {}
    for variant in ("plain", "gate", "gate_matched"):
        model = study.variant_config(base, variant, 1, Path("/tmp/x"), ["model.vocab_size=50", *overrides]).model
        net = DLM(model)
        counts[variant] = sum(p.numel() for n, p in net.named_parameters()
                              if not n.startswith(("wte.", "lm_head.")) and n != "sink")  # the gate counted
        assert counts[variant] == model.non_embedding_params() + gate_params(model), variant
    assert counts["gate"] > 1.05 * counts["plain"]  # the unmatched gate is larger ...
    assert abs(counts["gate_matched"] / counts["plain"] - 1) < 0.01  # ... the matched one is not


def test_a_study_keeps_enough_checkpoints_and_trains_every_variant_the_same_steps():
    base = study.base_config("cpu")
    cfg = study.variant_config(base, "sink", 1, Path("/tmp/x"), ["train.max_steps=400"])
    assert cfg.train.save_every == 400 // study.CURVE_POINTS and cfg.train.keep_last == 0
    assert cfg.train.val_every == cfg.train.save_every
    budget = ["model.vocab_size=4096", "train.flops=0.01"]
    steps = {v: study.variant_config(base, v, 1, Path("/tmp/x"), budget).steps() for v in ("plain", "gate_matched")}
    assert steps["plain"] == steps["gate_matched"] > 1
    assert study.variant_config(base, "plain", 1, Path("/tmp/x"), ["train.save_every=7"]).train.save_every == 7


# ---- resuming ---------------------------------------------------------------------------------------


@pytest.mark.slow
def test_a_stopped_study_resumes_the_interrupted_run_and_redoes_nothing_finished(tiny_data, tmp_path, monkeypatch):
    from sinkdlm.analysis import training
    from sinkdlm.checkpoint import list_checkpoints
    from sinkdlm.training import trainer

    out = tmp_path / "study"
    settings = study.StudyConfig(
        preset="demo", variants=["plain", "sink"], seeds=[1], out=out, data=str(tiny_data), tasks="",
        analysis_texts=1, overrides=["model.preset=tiny", "data.seq_len=32", "data.val_windows=4",
                                     "train.global_batch=4", "train.micro_batch=4", "train.progress=false",
                                     "optim.warmup_min_steps=1", "train.max_steps=4"])
    save = trainer.Loop.save

    def stop_after_step_2_of_sink(loop, step):
        save(loop, step)
        if loop.run_dir.name == "sink-seed1" and step == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer.Loop, "save", stop_after_step_2_of_sink)
    with pytest.raises(KeyboardInterrupt):
        study.run_study(settings)
    assert list_checkpoints(out / "sink-seed1")[-1].name == "step-00000002"
    monkeypatch.setattr(trainer.Loop, "save", save)
    trained, train_step = [], trainer.Loop.train_step
    monkeypatch.setattr(trainer.Loop, "train_step", lambda loop, step: trained.append((loop.run_dir.name, step))
                        or train_step(loop, step))
    runs = study.run_study(settings)
    assert trained == [("sink-seed1", 2), ("sink-seed1", 3)]  # plain is not trained again; sink resumes
    assert [len(list_checkpoints(r.out)) for r in runs] == [4, 4]  # one per step: >= 8 curve points at scale
    table = (out / "study.md").read_text()
    # the same command once more: nothing trained, evaluated or analysed again; the same table
    monkeypatch.setattr("sinkdlm.analysis.run_analysis", lambda *a, **k: pytest.fail("evaluated again"))
    monkeypatch.setattr(training, "analyze_checkpoint", lambda *a, **k: pytest.fail("analysed again"))
    study.run_study(settings)
    assert trained == [("sink-seed1", 2), ("sink-seed1", 3)] and (out / "study.md").read_text() == table


def test_holm_adjusts_a_family_of_p_values_by_hand():
    from sinkdlm.intervals import holm

    # sorted 0.01, 0.02, 0.04, 0.3: times 4, 3, 2, 1 = 0.04, 0.06, 0.08, 0.3 (each kept >= the one before)
    adjusted = holm({"P1": 0.04, "P2": 0.01, "P3": 0.3, "P4": 0.02})
    assert adjusted == pytest.approx({"P2": 0.04, "P4": 0.06, "P1": 0.08, "P3": 0.3})
    assert holm({"a": 0.2, "b": 0.5}) == pytest.approx({"a": 0.4, "b": 0.5})  # 0.2 x 2; max(0.4, 0.5 x 1)
    assert holm({"a": 0.6, "b": 0.6}) == pytest.approx({"a": 1.0, "b": 1.0})  # capped at 1
    # a family of 5 registered tests of which 2 have a p-value: they are corrected as the 1st and 2nd of 5
    assert holm({"a": 0.01, "b": 0.04}, family_size=5) == pytest.approx({"a": 0.05, "b": 0.16})


def test_t_test_p_matches_the_t_interval():
    from sinkdlm.intervals import t_interval, t_test_p

    values = [0.1, 0.3, 0.2, 0.25]
    low, _ = t_interval(values)
    shifted = [v - low for v in values]  # the interval's low end now sits at 0: p = 0.05 exactly
    assert t_test_p(shifted) == pytest.approx(0.05, abs=1e-6)
    assert t_test_p([1.0, -1.0]) == pytest.approx(1.0) and t_test_p([0.5]) is None
    scipy_stats = pytest.importorskip("scipy.stats")
    assert t_test_p(values) == pytest.approx(float(scipy_stats.ttest_1samp(values, 0).pvalue), abs=1e-9)


def test_preregistered_comparisons_get_holm_and_the_rest_are_exploratory():
    from sinkdlm.intervals import holm

    runs = runs_by_hand()
    for r in runs:
        r.info = {"steps": 10, "tokens": 1280, "epochs": 0.5, "params": 1000}
    planned = [("P1", "sink − plain", "val_elbo"), ("P2", "gate − plain", "val_elbo"), ("P3", "sink", "absorption − uniform"),
               ("P4", "sink − plain", "not a column")]
    text, results = study_report.render("t", "sinkdlm study", runs, planned)
    rows = {r["label"]: r for r in results["preregistered"]}
    p = {label: rows[label]["interval"]["p"] for label in ("P1", "P2", "P3")}
    # over the 4 registered: P4, not measured, still counts (a partial study is corrected as strictly)
    assert {label: rows[label]["holm_p"] for label in p} == pytest.approx(holm(p, family_size=4))
    assert rows["P4"]["interval"] is None and "| P4 | sink − plain | not a column | not measured |" in text
    assert "## Pre-registered comparisons (Holm over 4)" in text and "exploratory" in text
    # the differences -0.1, -0.15, -0.1 (sd 0.0289): t = -7.0 on 2 df, p = 0.0198; Holm x 4 (smallest p)
    assert p["P1"] == pytest.approx(0.0198, abs=2e-4)
    plain_text, _ = study_report.render("t", "sinkdlm study", runs)
    assert "No comparison was pre-registered" in plain_text and "Pre-registered comparisons" not in plain_text


def test_analysis_noise_sits_beside_the_seed_spread():
    runs = runs_by_hand()
    for r in runs:
        r.info = {"steps": 10, "tokens": 1280, "epochs": 0.5, "params": 1000}
        if r.variant == "sink":
            r.repeat = {"absorption": r.metrics["absorption"] + (0.01 if r.seed == 1 else -0.03)}
    noise = study_report.analysis_noise(runs)
    cell = noise["sink"]["absorption"]  # sqrt(mean(0.01^2 / 2, 0.03^2 / 2, 0.03^2 / 2))
    assert cell["analysis_sd"] == pytest.approx(math.sqrt((0.0001 + 0.0009 * 2) / 6)) and cell["runs"] == 3
    assert cell["seed_sd"] == pytest.approx(0.05) and set(noise) == {"sink"}
    text, results = study_report.render("t", "sinkdlm study", runs)
    assert "## Analysis noise beside seed-to-seed spread" in text and results["analysis_noise"] == noise
    again = study_report.runs_from_results(json.loads(json.dumps(results, default=str)))
    assert [(r.variant, r.seed, r.repeat) for r in again] == [(r.variant, r.seed, r.repeat) for r in runs]


def test_a_finished_study_renders_again_without_the_retired_columns(tmp_path):
    runs = runs_by_hand()
    for r in runs:
        r.info = {"steps": 10, "tokens": 1280, "epochs": 0.5, "params": 1000}
        r.metrics["sink-set IoU"] = 1.0  # measured by the old code
    study_report.write_outputs(tmp_path, "study t", "sinkdlm study --x", runs)
    assert "sink-set IoU" in (tmp_path / "study.md").read_text()
    text = study_report.rerender(tmp_path, [("P1", "sink − plain", "val_elbo")])
    assert text.startswith("# study t\n\n`sinkdlm study --x`") and "left out: `stability, random-attention null`" in text
    assert "| sink-set IoU" not in text and "Holm over 1" in text
    again = json.loads((tmp_path / "study.json").read_text())
    assert all("sink-set IoU" not in r["metrics"] for r in again["runs"])
    assert again["paired"]["sink − plain"]["val_elbo"]["mean"] == pytest.approx(-0.35 / 3)


def test_one_sided_t_and_tost_by_hand():
    from sinkdlm.intervals import t_test_one_sided_p, t_test_p, tost_p

    values = [0.1, 0.3, 0.2, 0.25]  # mean 0.2125 > 0: the one-sided p is half the two-sided
    assert t_test_one_sided_p(values) == pytest.approx(t_test_p(values) / 2, abs=1e-12)
    assert t_test_one_sided_p(values, greater=False) == pytest.approx(1 - t_test_p(values) / 2, abs=1e-12)
    # all equal: certain on the claimed side, never on the other; one value: no test
    assert t_test_one_sided_p([0.4, 0.4], 0.3) == 0.0 and t_test_one_sided_p([0.4, 0.4], 0.5) == 1.0
    assert t_test_one_sided_p([0.4]) is None and tost_p([0.4], 0.02) is None
    # TOST of 0, 0.01, -0.01, 0 within ±0.02: t = 0.02 / (0.008165 / 2) = 4.899 on 3 df both ways, p = 0.00814
    assert tost_p([0.0, 0.01, -0.01, 0.0], 0.02) == pytest.approx(0.0081383, abs=1e-6)
    scipy_stats = pytest.importorskip("scipy.stats")
    for null, greater in ((0.15, True), (0.3, False)):
        expected = scipy_stats.ttest_1samp(values, null, alternative="greater" if greater else "less").pvalue
        assert t_test_one_sided_p(values, null, greater) == pytest.approx(float(expected), abs=1e-9)


def test_the_table_header_names_limit_and_mc_num_only_where_benchmarks_run():
    import argparse

    from sinkdlm.commands.study import _argv

    def argv(preset, tasks):
        return _argv(argparse.Namespace(preset=preset, variants=None, seeds="1", steps=None, flops=None, tasks=tasks,
                                        limit=200, mc_num=16, overrides=[]))

    assert argv("mechanism", None) == ["--preset mechanism", "--seeds 1"]
    assert argv("demo", "") == ["--preset demo", "--seeds 1", "--tasks "]
    assert argv("demo", None)[-2:] == ["--limit 200", "--mc-num 16"]
