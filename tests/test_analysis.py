import json
import math

import pytest
import torch

from sinkdlm.analysis import stats
from sinkdlm.analysis.interventions import (
    TopKSinkMasker,
    hide_keys,
    model_without_sink,
    token_agreement,
    top_content_keys,
)
from sinkdlm.analysis.record import Recorder, RecordSettings, record_masked, record_trajectory
from sinkdlm.errors import UserError
from sinkdlm.model import DLM, apply_rope, rope_cache
from sinkdlm.sample import SampleConfig, generate
from tests.conftest import tiny

# ---- detection rules on hand-made attention -------------------------------------------------------


def attention_with_sink(t: int, sink: int, mass: float) -> torch.Tensor:
    """(1, 1, t, t) attention: every query puts `mass` on key `sink`, the rest spread evenly."""
    probs = torch.full((t, t), (1 - mass) / (t - 1))
    probs[:, sink] = mass
    return probs[None, None]


def test_column_sums_of_hand_made_attention_find_the_sink_by_every_rule():
    # 20 keys: one outlier among n keys is at most (n - 1) / sqrt(n) std above the mean
    colsum = stats.column_sums(attention_with_sink(20, sink=3, mass=0.6))  # c_3 = 12, others 8/19
    assert colsum.shape == (1, 1, 20)
    assert float(colsum.sum()) == pytest.approx(20.0, abs=1e-5)
    expected = torch.zeros(20, dtype=torch.bool)
    expected[3] = True
    for rule in stats.RULES:
        assert torch.equal(stats.detect(colsum, rule)[0, 0], expected), rule


def test_eps_rule_is_additive_on_column_sums():
    colsum = torch.tensor([1.0, 1.0, 1.0, 4.0, 1.0])  # others' mean 1: 4 is not > 1 + 3
    assert not stats.detect_eps(colsum, margin=3.0).any()
    assert stats.detect_eps(colsum, margin=2.9).tolist() == [False, False, False, True, False]


def test_std_rule_uses_population_std_over_valid_keys():
    colsum = torch.tensor([1.0] * 9 + [10.0])  # mean 1.9, std 2.7
    assert not stats.detect_std(colsum, k=3.01).any()
    assert stats.detect_std(colsum, k=2.9)[-1]
    assert stats.detect_std(colsum, k=2.9).sum() == 1


def test_padding_keys_are_never_sinks_and_do_not_count():
    colsum = torch.tensor([1.0, 1.0, 5.0, 9.0])
    valid = torch.tensor([True, True, True, False])
    assert stats.detect_top1(colsum, valid).tolist() == [False, False, True, False]
    assert stats.detect_eps(colsum, 2.9, valid).tolist() == [False, False, True, False]  # 5 > 1 + 2.9


def test_top1_picks_one_key_per_head():
    colsum = torch.tensor([[[0.5, 3.0, 0.5], [2.0, 0.5, 0.5]]])
    assert stats.detect_top1(colsum).long().tolist() == [[[0, 1, 0], [1, 0, 0]]]


# ---- moving-sink metrics on hand-made trajectories ------------------------------------------------


def test_stability_and_distinct_positions():
    positions = torch.tensor([3, 3, 5, 5, 5])
    assert float(stats.stability(positions)) == 0.75
    assert int(stats.distinct_positions(positions, 8)) == 2
    assert math.isnan(float(stats.stability(positions[:1])))


def test_consecutive_iou_and_union_of_sink_sets():
    sets = torch.zeros(4, 5, dtype=torch.bool)
    sets[0, [1, 2]] = True  # {1,2} -> {2}: 1/2;  {2} -> {2}: 1;  {2} -> {}: 0
    sets[1, 2] = True
    sets[2, 2] = True
    assert float(stats.consecutive_iou(sets)) == pytest.approx(0.5)
    assert int(stats.distinct_sinks(sets)) == 2
    # two empty sets say nothing about movement: left out, so a head without sinks is n/a, not pinned
    assert math.isnan(float(stats.consecutive_iou(torch.zeros(3, 5, dtype=torch.bool))))
    sets[3, 2] = True  # now {2} -> {2}; an empty pair beside it would have scored 1 before
    with_empty = torch.cat([torch.zeros(2, 5, dtype=torch.bool), sets[2:]])  # {} {} {2} {2}: pairs n/a, 0, 1
    assert float(stats.consecutive_iou(with_empty)) == pytest.approx(0.5)


def test_norm_rank_capture_share_and_absorption():
    norms = torch.tensor([0.1, 2.0, 1.0, 3.0])
    assert (stats.norm_rank(norms) * 3).tolist() == [0.0, 2.0, 1.0, 3.0]
    colsum = torch.tensor([4.0, 1.0, 3.0, 2.0])  # one dedicated sink (key 0); content sink at key 2
    sinks = torch.tensor([True, False, True, False])
    assert float(stats.absorption_rate(colsum, 1)) == pytest.approx(0.4)
    assert float(stats.capture_share(colsum, sinks, 1)) == pytest.approx(4 / 7)


def test_mask_share_counts_sinks_on_mask_tokens():
    sets = torch.zeros(1, 2, 1, 1, 4, dtype=torch.bool)  # (S, L, B, H, 1 sink + 3 content)
    sets[0, 0, 0, 0, [1, 2]] = True
    sets[0, 1, 0, 0, 0] = True  # only the dedicated sink in layer 1
    tokens = torch.tensor([[[9, 7, 7]]])  # content 0 is [MASK] (id 9)
    share = stats.mask_share(sets, tokens, 1, mask_id=9)
    assert share[0] == 0.5 and math.isnan(share[1])  # layer 1 has no content sink: undefined, not 0
    assert stats.sink_token_counts(sets, tokens, 1) == {9: 1, 7: 1}


# ---- the recorder against the model ---------------------------------------------------------------


def test_streamed_column_sums_equal_those_of_the_full_maps():
    model = DLM(tiny(sink_tokens=1)).eval()
    cfg = SampleConfig(gen_length=6, steps=6)
    tr = record_trajectory(model, [[1, 2], [3, 4, 5, 6]], cfg, eos_id=0,
                           settings=RecordSettings(map_steps=range(6)), progress=False)
    assert tr.colsum.shape == (6, 2, 2, 2, 1 + 10)
    for step, maps in tr.maps.items():  # sequence 0 is right-padded: its padding queries do not count
        q = tr.query_valid[step, 0]
        assert q.sum() == 8
        torch.testing.assert_close(tr.colsum[step, :, 0], maps[:, :, q].sum(2), rtol=0, atol=1e-6)
        assert torch.all(maps[:, :, :, 1:][..., ~q] == 0)  # padding keys get nothing


def manual_layer0_probs(model: DLM, idx: torch.Tensor, sink_pos: int, content_pos: torch.Tensor) -> torch.Tensor:
    """Layer-0 attention over [sink; content] computed by hand with the paper's RoPE positions."""
    block, cfg = model.blocks[0], model.cfg
    h, hs = block.norm_attn(model.wte(idx)), block.norm_attn(model.sink[None])
    cos, sin = rope_cache(content_pos, cfg.head_size, cfg.rope_base)
    cos_s, sin_s = rope_cache(torch.tensor([sink_pos]), cfg.head_size, cfg.rope_base)

    def heads(x):
        return x.view(x.shape[0], x.shape[1], cfg.n_head, cfg.head_size).transpose(1, 2)

    q = apply_rope(heads(block.attn.q(h)), cos, sin)
    k = apply_rope(heads(block.attn.k(h)), cos, sin)
    ks = apply_rope(heads(block.attn.k(hs)), cos_s, sin_s)
    scores = q @ torch.cat([ks, k], dim=2).transpose(-1, -2) / math.sqrt(cfg.head_size)
    return scores.softmax(-1)


@pytest.mark.parametrize("position", ["front", "end"])
def test_absorption_rate_reads_the_dedicated_sink_for_front_and_end_placement(position):
    model = DLM(tiny(sink_tokens=1, sink_position=position)).eval()
    with torch.no_grad():
        model.sink.mul_(8.0)  # a sink far from content, so a wrong column would show
    idx = torch.randint(0, 50, (1, 12))
    t = idx.shape[1]
    sink_pos, content_pos = (0, torch.arange(1, t + 1)) if position == "front" else (t, torch.arange(t))
    with torch.no_grad():
        expected = manual_layer0_probs(model, idx, sink_pos, content_pos)[..., 0].mean(-1)  # (1, H)
        tr = record_masked(model, idx, [0.5], settings=RecordSettings(layers=[0]), progress=False)
        unmasked = Recorder(model, RecordSettings(layers=[0]))
        with unmasked.attached():
            model(idx)
    absorption = stats.absorption_rate(unmasked.steps[0].colsum[0], 1)
    torch.testing.assert_close(absorption, expected, rtol=0, atol=1e-5)
    assert tr.n_sink == 1 and tr.colsum.shape[-1] == 1 + t


def test_key_norms_cover_sinks_and_content_and_match_the_projection():
    model = DLM(tiny(sink_tokens=1)).eval()
    idx = torch.randint(0, 50, (2, 7))
    recorder = Recorder(model)
    with recorder.attached(), torch.no_grad(), model.sink_cache():
        model(idx)
    knorm = recorder.steps[0].key_norm[1]  # (B, H, 1 + T)
    sink_keys = model.sink_kv()[1][0]  # (1, H, 1, D), before RoPE (which keeps norms)
    torch.testing.assert_close(knorm[:, :, 0], sink_keys.norm(dim=-1)[:, :, 0].expand(2, -1), rtol=1e-5, atol=1e-6)
    assert knorm.shape == (2, 2, 8) and bool((knorm > 0).all())


# ---- interventions ------------------------------------------------------------------------------


def test_hide_keys_and_top_content_keys():
    colsum = torch.tensor([[[[9.0, 1.0, 5.0, 2.0, 3.0]]]])  # (L, B, H, 1 sink + 4 content)
    valid = torch.tensor([[True, True, True, True, False]])
    top = top_content_keys(colsum, valid, n_sink=1, k=2)
    assert top.tolist() == [[1, 2]]  # content positions of keys 2 and 3; the sink and padding excluded
    idx = torch.zeros(1, 4, dtype=torch.long)
    assert hide_keys(None, idx, top).tolist() == [[True, False, False, True]]


def test_masking_the_previous_steps_top_sinks_hides_them_from_every_query():
    model = DLM(tiny()).eval()
    masker = TopKSinkMasker(k=2)
    recorder = Recorder(model, before=masker)
    masker.recorder = recorder
    with recorder.attached():
        generate(model, [[1, 2, 3]], SampleConfig(gen_length=5, steps=5), model.mask_id, 0)
    for prev, step in zip(recorder.steps, recorder.steps[1:]):
        hidden = top_content_keys(torch.stack(list(prev.colsum.values())), prev.key_valid, 0, 2)[0]
        assert not step.key_valid[0, hidden].any()
        assert torch.all(torch.stack(list(step.colsum.values()))[..., hidden] == 0)


def test_token_agreement_counts_missing_positions_as_different():
    assert token_agreement([[1, 2, 3], [4]], [[1, 2, 0], [4, 5]]) == pytest.approx(3 / 5)


def test_dropping_the_sink_keeps_every_other_weight(tmp_path):
    from sinkdlm.checkpoint import save_checkpoint
    from sinkdlm.config import Config

    cfg = tiny(sink_tokens=1)
    model = DLM(cfg)
    save_checkpoint(tmp_path, 1, model.state_dict(), Config(model=cfg), {"eos_id": 0})
    plain = model_without_sink(tmp_path)
    assert plain.sink is None
    assert torch.equal(plain.blocks[1].attn.v.weight, model.blocks[1].attn.v.weight)


# ---- end to end -----------------------------------------------------------------------------------


def tiny_checkpoint(data_path, out, **model) -> None:
    """A random tiny model saved with the prepared corpus' tokenizer; its config points at the data."""
    from sinkdlm.checkpoint import save_checkpoint
    from sinkdlm.config import Config, DataConfig
    from sinkdlm.data.shards import PackedData

    data = PackedData(data_path)
    cfg = tiny(vocab_size=data.vocab_size, **model)
    save_checkpoint(out, 1, DLM(cfg).state_dict(), Config(model=cfg, data=DataConfig(path=str(data_path), seq_len=32)),
                    {"eos_id": data.eos_id}, tokenizer=data.path / data.meta["tokenizer_file"])


FIGURES = ("attention_maps.png", "step_position.png", "dominant_sink.png", "sink_mass.png", "value_norms.png")


def test_analyze_command_writes_metrics_figures_and_report(tiny_data, tmp_path):
    from sinkdlm.cli import main

    tiny_checkpoint(tiny_data, tmp_path / "run", sink_tokens=1)
    out = tmp_path / "report"
    assert main(["analyze", "--checkpoint", str(tmp_path / "run"), "--out", str(out), "--steps", "4",
                 "--gen-length", "4", "--top-k", "2", "--elbo-samples", "2", "--max-windows", "2"]) == 0
    for name in FIGURES + ("metrics.json", "report.md"):
        assert (out / name).stat().st_size > 0, name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sinks"]["steps"] == 4
    assert set(metrics["interventions"]) == {"baseline", "mask_top2_sinks", "drop_sink", "zero_sink_value"}
    summary = metrics["summary"]
    assert 0 <= summary["dedicated_capture_share"] <= 1 and 0 <= summary["dominant_stability"] <= 1
    assert all(f"]({name})" in (out / "report.md").read_text() for name in FIGURES)
    for null in ("uniform_attention", "fixed_text", "one_token_reveal"):  # the null models of a trajectory
        assert 0 <= metrics["nulls"][null]["dominant_stability"] <= 1, null
    assert "## Moving-sink metrics against their null models" in (out / "report.md").read_text()


def test_analyze_masked_mode_and_summary_of_a_plain_model(tiny_data, tmp_path):
    from sinkdlm.analysis import AnalysisConfig, analyze_checkpoint, moving_sink_summary

    tiny_checkpoint(tiny_data, tmp_path)
    settings = AnalysisConfig(mode="masked", levels=(0.8, 0.5, 0.2), interventions=False, progress=False)
    metrics = analyze_checkpoint(tmp_path, texts=["the cat sat on a mat " * 20], settings=settings)
    summary = moving_sink_summary(metrics)
    assert metrics["sinks"]["steps"] == 3
    assert summary["dedicated_capture_share"] is None and summary["absorption_rate"] is None
    assert 0 <= summary["dominant_stability"] <= 1


def test_analyze_in_bfloat16_loads_every_model_in_it_and_agrees_with_float32(tiny_data, tmp_path, monkeypatch):
    """--dtype bfloat16 (for an 8B import on a GPU): the model and the intervention variants run in
    bf16, and masked-mode sink statistics stay within bf16's rounding of the float32 ones."""
    from sinkdlm.analysis import AnalysisConfig, analyze_checkpoint, interventions

    tiny_checkpoint(tiny_data, tmp_path, sink_tokens=1)
    built = []
    for name in ("model_without_sink", "model_with_zero_sink_value"):
        original = getattr(interventions, name)
        monkeypatch.setattr(interventions, name, lambda *a, _f=original: built.append(_f(*a)) or built[-1])
    results = {dtype: analyze_checkpoint(tmp_path, texts=["the cat sat on a mat " * 20], settings=AnalysisConfig(
        mode="masked", levels=(0.8, 0.2), elbo_samples=1, max_windows=1, top_k=(1,), progress=False, dtype=dtype))
        for dtype in ("float32", "bfloat16")}
    assert [next(m.parameters()).dtype for m in built] == [torch.float32] * 2 + [torch.bfloat16] * 2
    full, half = (r["summary"] for r in (results["float32"], results["bfloat16"]))
    for key in ("sink_mass", "absorption_rate"):
        assert full[key] is not None and half[key] == pytest.approx(full[key], abs=0.02), key


# ---- sinks over training ---------------------------------------------------------------------------


def checkpoints_at(data_path, run, steps, **model) -> None:
    """Random tiny checkpoints of one run at the given steps (8 tokens per step)."""
    from sinkdlm.checkpoint import save_checkpoint
    from sinkdlm.config import Config, DataConfig
    from sinkdlm.data.shards import PackedData

    data = PackedData(data_path)
    cfg = Config(model=tiny(vocab_size=data.vocab_size, **model), data=DataConfig(path=str(data_path), seq_len=32))
    for step in steps:
        save_checkpoint(run, step, DLM(cfg.model).state_dict(), cfg,
                        {"eos_id": data.eos_id, "tokens": 8 * step, "val_loss": 5.0 - step / 10},
                        tokenizer=data.path / data.meta["tokenizer_file"])


def test_analyze_over_training_of_a_study_folder_writes_one_row_per_checkpoint(tiny_data, tmp_path, monkeypatch):
    from sinkdlm.analysis import training
    from sinkdlm.cli import main

    study = tmp_path / "study"
    checkpoints_at(tiny_data, study / "plain-seed1", [2, 4])
    checkpoints_at(tiny_data, study / "sink-seed1", [2, 4], sink_tokens=1)
    out = tmp_path / "curves"
    args = ["analyze", "--checkpoint", str(study), "--checkpoint-steps", "all", "--out", str(out), "--steps", "3",
            "--gen-length", "3", "--max-windows", "2"]
    assert main(args) == 0
    rows = json.loads((out / "training.json").read_text())
    assert [(r["variant"], r["seed"], r["step"], r["tokens"]) for r in rows] == [
        ("plain", 1, 2, 16), ("plain", 1, 4, 32), ("sink", 1, 2, 16), ("sink", 1, 4, 32)]
    assert rows[1]["val_elbo"] == pytest.approx(4.6) and rows[0]["absorption_rate"] is None
    assert 0 <= rows[2]["dedicated_top1_rate"] <= 1 and rows[2]["nulls"]["fixed_text"] is not None
    assert (out / "training.png").stat().st_size > 0 and "| sink | 4 | 32 | 1 |" in (out / "training.md").read_text()
    # a second call reuses the cached rows instead of analysing again
    monkeypatch.setattr(training, "analyze_checkpoint", lambda *a, **k: pytest.fail("analysed again"))
    assert main(args) == 0
    assert json.loads((out / "training.json").read_text()) == rows


def test_analyze_over_training_rejects_steps_the_run_does_not_have(tiny_data, tmp_path, capsys):
    from sinkdlm.cli import main

    checkpoints_at(tiny_data, tmp_path / "run", [2, 4])
    out = tmp_path / "curves"
    assert main(["analyze", "--checkpoint", str(tmp_path / "run"), "--checkpoint-steps", "2,3", "--out", str(out)]) == 2
    assert "no checkpoint at step(s) [3]; it has [2, 4]" in capsys.readouterr().err
    assert main(["analyze", "--checkpoint", str(tmp_path / "run"), "--checkpoint-steps", "x", "--out", str(out)]) == 2
    assert not out.exists()


def test_training_table_says_when_a_metric_is_defined_in_fewer_seeds_than_its_row():
    from sinkdlm.analysis.training import training_table

    rows = [{"variant": "plain", "seed": s, "step": 100, "tokens": 400, "val_elbo": 6.0 + s,
             "value_rank_same_type_sinks": 0.9 if s == 1 else None} for s in (1, 2, 3)]  # content sinks in seed 1 only
    line = next(x for x in training_table(rows).splitlines() if x.startswith("| plain | 100 |"))
    assert "| 3 |" in line and "0.900 (n=1)" in line and "8.000 ± 1.000 |" in line  # val_elbo: all 3 seeds


def test_analysis_noise_reads_disjoint_prompt_sets(tiny_data, tmp_path):
    from sinkdlm.analysis.pipeline import AnalysisConfig, analysis_noise, prompt_sets

    tiny_checkpoint(tiny_data, tmp_path, sink_tokens=1)
    settings = AnalysisConfig(max_prompts=2, steps=2, gen_length=2, nulls=False)
    first, second = prompt_sets(tmp_path, settings)
    assert first.shape == second.shape == (2, 32)
    assert not any(torch.equal(a, b) for a in first for b in second)  # no prompt in both sets
    summaries = analysis_noise(tmp_path, settings)
    assert len(summaries) == 2 and all(0 <= s["dominant_stability"] <= 1 for s in summaries)
    with pytest.raises(UserError, match="fewer than 2 disjoint sets"):
        prompt_sets(tmp_path, AnalysisConfig(max_prompts=10_000))
