"""sinkdlm.experiments.pretrained_sinks: the position-0 split and its metrics, checked by hand."""

import pytest
import torch

from sinkdlm.analysis.record import masked_inputs
from sinkdlm.analysis.stats import Trajectory
from sinkdlm.experiments.pretrained_sinks import SPLITS, measure, paired_inputs, uniform_shares, window_metrics
from sinkdlm.model import DLM
from tests.conftest import tiny

MASK = 9


def test_paired_inputs_show_then_mask_position_zero_with_the_rest_identical():
    windows = torch.randint(0, MASK, (6, 12))
    levels = (0.25, 0.75)
    inputs = paired_inputs(windows, levels, seed=3, mask_id=MASK)
    assert len(inputs) == 2 * len(levels)
    for i, level in enumerate(levels):
        shown, hidden = inputs[2 * i], inputs[2 * i + 1]
        assert torch.equal(shown[:, 0], windows[:, 0])
        assert (hidden[:, 0] == MASK).all()
        assert torch.equal(shown[:, 1:], masked_inputs(windows, level, i, 3, MASK)[:, 1:])
        assert torch.equal(shown[:, 1:], hidden[:, 1:])


def test_window_metrics_by_hand():
    # one window [a, MASK, b] behind one dedicated sink (K = 4 keys), three queries, two heads
    colsum = torch.tensor([[0.3, 1.8, 0.6, 0.3],    # head 0: 0.6 of its attention on position 0
                           [1.2, 0.6, 0.6, 0.6]])   # head 1: 0.4 on the dedicated sink
    tr = Trajectory(layers=[0], n_sink=1, tokens=torch.tensor([[[1, MASK, 2]]]),
                    key_valid=torch.ones(1, 1, 4, dtype=torch.bool), query_valid=torch.ones(1, 1, 3, dtype=torch.bool),
                    colsum=colsum[None, None, None], value_norm=torch.ones(1, 1, 1, 2, 4),
                    key_norm=torch.ones(1, 1, 1, 2, 4))
    m = {k: v.item() for k, v in window_metrics(tr, MASK).items()}
    assert m["gu_sink_rate"] == 1.0 and m["gu_sink_rate_first"] == 0.5 and m["gu_sink_rate_dedicated"] == 0.5
    assert m["gu_sink_rate_mask"] == 0.0 and m["gu_sink_rate_content"] == 0.0
    assert m["pos0_share"] == pytest.approx(2.4 / 6) and m["pos0_ratio"] == pytest.approx(0.4 * 4)
    assert m["mask_absorption_ratio"] == pytest.approx((1.2 / 6) / (1 / 4))
    assert m["dedicated_share"] == pytest.approx(1.5 / 6) and m["dedicated_ratio"] == pytest.approx(1.0)


def test_causal_uniform_shares_count_only_the_keys_a_query_sees():
    pos0, mask = uniform_shares(torch.tensor([[[1, MASK, 2]]]), MASK, n_sink=1, causal=True)
    assert pos0.item() == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)  # query i sees the sink and i + 1 tokens
    assert mask.item() == pytest.approx((0 + 1 / 3 + 1 / 4) / 3)
    pos0, mask = uniform_shares(torch.tensor([[[1, MASK, 2]]]), MASK, n_sink=1, causal=False)
    assert pos0.item() == pytest.approx(1 / 4) and mask.item() == pytest.approx(1 / 4)


def test_measure_matches_the_attention_maps_and_splits_by_position_zero():
    model = DLM(tiny(sink_tokens=1)).eval()
    windows = torch.randint(0, 50, (4, 10))
    rows = measure(model, windows, levels=(0.5,), seed=1)
    assert [r["position0"] for r in rows] == [*SPLITS, "masked - visible"]
    visible, hidden, delta = rows
    assert hidden["pooled"]["gu_sink_rate_first"]["mean"] == 0.0  # a masked position 0 is a [MASK] key
    # position 0's share by hand from the softmax maps: heads and queries averaged, then layers, then windows
    for row, tokens in zip((visible, hidden), paired_inputs(windows, (0.5,), 1, model.mask_id)):
        probs = {}
        with torch.no_grad():
            model(tokens, observer=lambda layer, p, k, v, n, out=probs: out.__setitem__(layer, p[..., n].mean((1, 2))))
        by_hand = torch.stack(list(probs.values())).mean(0)  # (B,)
        assert row["pooled"]["pos0_share"]["mean"] == pytest.approx(by_hand.mean().item(), abs=1e-5)
        assert row["pooled"]["pos0_share"]["windows"] == 4
    assert delta["pooled"]["pos0_share"]["mean"] == pytest.approx(
        hidden["pooled"]["pos0_share"]["mean"] - visible["pooled"]["pos0_share"]["mean"], abs=1e-6)
