"""The study's `mechanism` preset: its config, its copy-task columns by hand, its evaluators."""

import pytest

from sinkdlm.eval.probes import ELBO_BINS, KEY_TYPES, MASK_LEVELS
from sinkdlm.experiments import study


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


def test_mechanism_evaluators_are_the_probes_without_benchmarks():
    names = [e.name for e in study.default_evaluators(study.StudyConfig(preset="mechanism"), synthetic_data=True)]
    assert names == ["sinks", "probes"]
