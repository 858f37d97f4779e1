"""The mechanism study's probes over training (sinkdlm.experiments.probe_plots) on made-up probes.json
files: the table's means by hand, the figures written, runs without complete probes left out."""

import json
from pathlib import Path

import pytest

from sinkdlm.config import load_config, save_config
from sinkdlm.eval.probes import KEY_TYPES, MASK_LEVELS, PROBE_CACHE
from sinkdlm.experiments import probe_plots, study, study_report
from sinkdlm.experiments.study_report import Run

LO, HI = MASK_LEVELS
STEPS = (100, 200, 300)
UNIFORM_SHARE = 0.25  # exact in binary, so sink_share / uniform is the chosen multiple exactly
NAN = float("nan")
# (variant, seed) -> per step: copy accuracy at (LO, HI), then per layer the sink share x uniform at (LO, HI)
# (None: no dedicated sink), then per layer the dormant [MASK] ratio of each head at (LO, HI)
COPY = {("plain", 1): [(0.2, 0.4), (0.5, 0.7), (0.8, 1.0)],  # level means 0.3, 0.6, 0.9
        ("plain", 2): [(0.1, 0.1), (0.4, 0.6), (0.7, 0.7)],  # 0.1, 0.5, 0.7 -> seed means 0.2, 0.55, 0.8
        ("sink", 1): [(0.4, 0.4), (0.6, 0.6), (0.9, 0.9)],  # 0.4, 0.6, 0.9
        ("sink", 2): [(0.2, 0.2), (0.6, 0.8), (1.0, 1.0)]}  # 0.2, 0.7, 1.0 -> seed means 0.3, 0.65, 0.95
SINK = {("sink", 1): [[(1.0, 3.0), (0.5, 0.5)]] * 3,  # L0 2.0, L1 0.5
        ("sink", 2): [[(2.0, 2.0), (0.0, 1.0)], [(3.0, 5.0), (0.5, 0.5)], [(4.0, 4.0), (0.5, 0.5)]]}
# L0 seed means: 2.0, 3.0, 3.0; L1: 0.5, 0.5, 0.5
MASK = {1: [[(1.0, 3.0), (2.0, 2.0)], [(NAN, 1.0), (1.0, 1.0)]],  # L0 (2 + 2) / 2 = 2; L1 (1 + 1) / 2 = 1
        2: [[(4.0, 4.0), (2.0, 2.0)], [(0.5, 0.5), (1.5, 1.5)]]}  # L0 (4 + 2) / 2 = 3; L1 (0.5 + 1.5) / 2 = 1
# the [MASK] ratio depends on the seed only: seed means L0 2.5, L1 1.0 at every step


def probed(step: int, copy: tuple[float, float], sink: list | None, mask: list) -> dict:
    """A probe_run row of 2 layers at the two mask levels."""
    levels = {}
    for i, level in enumerate(MASK_LEVELS):
        layers = [{"rate": 0.0, "max_key_attention": 0.1, "uniform_share": UNIFORM_SHARE,
                   "sink_share": None if sink is None else sink[layer][i] * UNIFORM_SHARE,
                   **{f"rate_{t}": 0.0 for t in KEY_TYPES}} for layer in range(2)]
        head = {"layer": 0, "head": 0, "active_on_source": 0.5, "active_on_sink": 0.0, "dormant_on_sink": 0.0,
                "dormant_mask_ratio": 1.0, "sink_value_ratio": 1.0}
        levels[str(level)] = {"copy_accuracy": copy[i], "active_queries": 10, "layers": layers, "copy_head": head,
                              "heads": {"dormant_mask_ratio": [[h[i] for h in layer] for layer in mask]}}
    return {"step": step, "levels": levels, "elbo_bins": [1.0] * 5, "checkpoint": f"step-{step:08d}"}


def make_run(folder: Path, variant: str, seed: int, probed_steps: tuple[int, ...] | None = STEPS,
             numbers: str | None = None) -> Run:
    """A run folder with a checkpoint per STEPS and a probes.json of `probed_steps` (None: no probes.json)
    holding the numbers above of variant `numbers` (default: its own)."""
    out, like = folder / f"{variant}-seed{seed}", (numbers or variant, seed)
    for step in STEPS:
        (out / f"step-{step:08d}").mkdir(parents=True)
    if probed_steps is not None:
        rows = {f"step-{step:08d}": probed(step, COPY[like][i], SINK[like][i] if like in SINK else None, MASK[seed])
                for i, step in enumerate(probed_steps)}
        key = {"windows": 64, "levels": list(MASK_LEVELS), "seed": 0}
        (out / PROBE_CACHE).write_text(json.dumps({"key": key, "checkpoints": rows}))
    return Run(variant, seed, out)


@pytest.fixture
def runs(tmp_path) -> list[Run]:
    return [make_run(tmp_path, variant, seed) for variant in ("plain", "sink") for seed in (1, 2)]


def test_table_means_over_levels_then_seeds_by_hand(runs, tmp_path):
    text = probe_plots.write_probe_report(runs, tmp_path / "probes")
    lines = text.splitlines()
    assert "| plain | 100 | 2 | 0.200 | - / - | 2.500 / 1.000 |" in lines  # plain has no dedicated sink
    assert "| plain | 200 | 2 | 0.550 | - / - | 2.500 / 1.000 |" in lines
    assert "| plain | 300 | 2 | 0.800 | - / - | 2.500 / 1.000 |" in lines
    assert "| sink | 100 | 2 | 0.300 | 2.000 / 0.500 | 2.500 / 1.000 |" in lines
    assert "| sink | 200 | 2 | 0.650 | 3.000 / 0.500 | 2.500 / 1.000 |" in lines
    assert "| sink | 300 | 2 | 0.950 | 3.000 / 0.500 | 2.500 / 1.000 |" in lines
    assert f"mask levels ({LO}, {HI})" in text and "Left out" not in text
    assert "bigram_copy_accuracy): unknown" in text  # the made-up runs have no config, so no corpus


def test_min_max_band_over_seeds_by_hand(runs):
    points, levels, skipped = probe_plots.collect(runs)
    assert levels == [str(LO), str(HI)] and skipped == []
    assert probe_plots.over_seeds(points["sink"][200], probe_plots.SINK, 0) == (3.0, 2.0, 4.0, 2)
    assert probe_plots.over_seeds(points["plain"][200], probe_plots.COPY) == pytest.approx((0.55, 0.5, 0.6, 2))
    assert probe_plots.over_seeds(points["plain"][200], probe_plots.SINK, 0) is None


def test_figures_are_written_and_linked_from_study_md(runs, tmp_path):
    pytest.importorskip("matplotlib")
    folder = tmp_path / "study"
    for run in runs:
        run.info = {"steps": 300, "tokens": 1, "epochs": None, "params": 1}
    before, _ = study_report.render("t", "sinkdlm study", runs, None, folder)
    assert "probes/" not in before  # nothing drawn yet: no link
    probe_plots.write_probe_report(runs, folder / probe_plots.PROBES_DIR)
    for name in (probe_plots.FIGURE, probe_plots.COPY_FIGURE):
        png = (folder / probe_plots.PROBES_DIR / name).read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 1000
    after, _ = study_report.render("t", "sinkdlm study", runs, None, folder)
    assert "![probes over training](probes/probes_over_training.png)" in after
    assert "![copy accuracy over training](probes/copy_accuracy.png)" in after
    assert "[probes over training, table](probes/probes_over_training.md)" in after


def test_runs_without_complete_probes_are_left_out_with_a_note(runs, tmp_path):
    partial = make_run(tmp_path, "sink_zero_value", 1, STEPS[:2], "sink")  # probing interrupted
    missing = make_run(tmp_path, "sink_zero_value", 2, probed_steps=None)  # not evaluated yet
    broken = make_run(tmp_path, "sink_sees_all", 1, probed_steps=None)
    (broken.out / PROBE_CACHE).write_text('{"key": {}, "checkp')  # cut off mid-write
    text = probe_plots.write_probe_report([*runs, partial, missing, broken], tmp_path / "probes")
    assert "| sink_zero_value |" not in text and "| sink_sees_all |" not in text
    assert "| sink | 300 | 2 | 0.950 | 3.000 / 0.500 | 2.500 / 1.000 |" in text  # the others unchanged
    assert f"Left out: sink_zero_value, seed 1 ({partial.out}): {PROBE_CACHE} is partial: it lacks " \
           f"step-00000300." in text
    assert f"Left out: sink_zero_value, seed 2 ({missing.out}): no {PROBE_CACHE}" in text
    assert f"Left out: sink_sees_all, seed 1 ({broken.out}): {PROBE_CACHE} is unreadable" in text


def test_no_probes_at_all_writes_the_table_and_no_figure(tmp_path):
    run = make_run(tmp_path, "plain", 1, probed_steps=None)
    text = probe_plots.write_probe_report([run], tmp_path / "probes")
    assert "No run had complete probes" in text and "Left out: plain, seed 1" in text
    assert not (tmp_path / "probes" / probe_plots.FIGURE).exists()
    assert probe_plots.report_links(tmp_path) == "[probes over training, table](probes/probes_over_training.md)"


def test_bigram_baseline_comes_from_the_corpus_meta(runs, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "meta.json").write_text(json.dumps({"format_version": 2, "task": {"bigram_copy_accuracy": 0.3056}}))
    cfg = load_config(None, [f"data.path={data}"], base=study.base_config("mechanism"))
    save_config(cfg, runs[1].out / f"step-{STEPS[-1]:08d}" / "config.yaml")  # the first run has none: skipped
    assert probe_plots.bigram_copy_accuracy(runs) == 0.3056
    assert "bigram_copy_accuracy): 0.306." in probe_plots.write_probe_report(runs, tmp_path / "probes")
