"""The sink metrics by hand: tiny recordings whose right answer can be read off, including a head with
no sinks, a head whose dedicated sink takes everything, uniform attention, and the null models."""


import pytest
import torch

from sinkdlm.analysis import nulls, stats

MASK = 9


def recording(colsum, n_sink=1, value_norm=None, key_norm=None, tokens=None, queries=None) -> stats.Trajectory:
    """A Trajectory from column sums (S, L, B, H, K); every key valid, `queries` real queries per row
    (default: the content keys)."""
    colsum = torch.as_tensor(colsum, dtype=torch.float32)
    steps, _, batch, _, keys = colsum.shape
    width = keys - n_sink
    if tokens is None:
        tokens = torch.ones(steps, batch, width, dtype=torch.long)
    query_valid = torch.ones(steps, batch, width, dtype=torch.bool)
    if queries is not None:
        query_valid[..., queries:] = False
    ones = torch.ones_like(colsum)
    return stats.Trajectory(layers=list(range(colsum.shape[1])), n_sink=n_sink, tokens=tokens,
                        key_valid=torch.ones(steps, batch, keys, dtype=torch.bool), query_valid=query_valid,
                        colsum=colsum, value_norm=ones if value_norm is None else torch.as_tensor(value_norm),
                        key_norm=ones if key_norm is None else torch.as_tensor(key_norm))


def metrics(tr: stats.Trajectory, eps: float = 1.0) -> dict:
    """The metrics with the old eps rule behind the sink tables (these tests were written for it)."""
    return stats.trajectory_metrics(tr, MASK, margin=eps, rule="eps")


def summary(tr: stats.Trajectory, eps: float = 1.0) -> dict:
    return metrics(tr, eps)["summary"]


# ---- shares against their uniform baselines -------------------------------------------------------


def test_dedicated_sink_that_takes_everything():
    # 1 sink + 3 content keys, 4 queries that all attend only to the sink: column sums (4, 0, 0, 0)
    s = summary(recording([[[[[4.0, 0, 0, 0]]]]]))
    b = metrics(recording([[[[[4.0, 0, 0, 0]]]]]))["baselines"]
    assert s["absorption_rate"] == 1.0 and b["absorption_rate"] == 0.25 and s["absorption_ratio"] == 4.0
    assert s["dedicated_top1_rate"] == 1.0 and b["dedicated_top1_rate"] == 0.25
    assert s["dedicated_capture_share"] == 1.0 and s["sink_mass"] == 1.0  # the sink is detected: 4 > 0 + 1


def test_uniform_attention_reads_its_own_baseline():
    tr = recording([[[[[1.0, 1.0, 1.0, 1.0]]]]])  # 4 queries spread evenly over 4 keys
    metrics_ = metrics(tr)
    s, b = metrics_["summary"], metrics_["baselines"]
    assert s["absorption_rate"] == b["absorption_rate"] == 0.25 and s["absorption_ratio"] == 1.0
    assert s["dedicated_top1_rate"] == 0.0  # a tie is not a win
    assert s["sink_mass"] == 0.0 and b["sink_mass"] == 0.0  # nothing stands out: no sinks
    assert s["dedicated_capture_share"] == 1.0 == b["dedicated_capture_share"]  # all sink mass is the sink's


def test_a_head_with_no_sink_mass_adds_nothing_and_shares_are_pooled():
    # head 0: the sink draws 0.2 of 10 queries' attention, no content sink; head 1: the sink 0.2, a
    # content sink 5 (the shares read the column sums alone)
    colsum = [[[[[0.2, 3.3, 3.2, 3.3], [0.2, 5.0, 2.4, 2.4]]]]]
    s = summary(recording(colsum), eps=2.0)
    assert s["dedicated_capture_share"] == pytest.approx(0.4 / 5.4, abs=1e-6)  # not the mean of (1, 0.04)
    assert s["absorption_rate"] == pytest.approx(0.4 / 20)
    assert s["sink_mass"] == pytest.approx(5.0 / 20)
    plain = summary(recording([[[[[3.3, 3.3, 3.4], [5.0, 2.5, 2.5]]]]], n_sink=0), eps=2.0)
    assert plain["dedicated_capture_share"] is None and plain["absorption_rate"] is None
    assert plain["dedicated_top1_rate"] is None


def test_pooling_weighs_cells_by_their_queries():
    # two sequences: 2 real queries putting everything on the sink, and 6 spread evenly over 4 keys
    colsum = torch.tensor([[[[[2.0, 0, 0, 0, 0, 0, 0]], [[6 / 7] * 7]]]])
    tr = recording(colsum)
    tr.query_valid[0, 0, 2:] = False
    s = summary(tr)
    assert s["absorption_rate"] == pytest.approx((2 + 6 / 7) / 8)  # not the mean of 1 and 1/7


def test_top1_rate_counts_cells():
    colsum = [[[[[3.0, 1, 0], [0.5, 2.0, 1.5]]], [[[2.0, 1.0, 1.0], [2.0, 2.0, 0.0]]]]]  # (1 step, 2 layers, 1, 2)
    assert summary(recording(colsum))["dedicated_top1_rate"] == pytest.approx(2 / 4)


def test_value_and_key_norms_are_weighted_by_attention_mass():
    # content sinks at keys 1 (mass 6) and 2 (mass 2); among the 4 content keys (the dedicated sink is
    # left out) their norms rank 0 and 1 (scaled), and the content mean is 13/4: ratios 4/13 and 20/13
    colsum = [[[[[0.0, 6.0, 2.0, 0.0, 0.0]]]]]
    values = torch.tensor([[[[[2.0, 1.0, 5.0, 3.0, 4.0]]]]])
    tr = recording(colsum, value_norm=values, key_norm=values * 2)
    s = metrics(tr, 0.25)["summary"]  # both detected: 6 > 0.5 + eps, 2 > 1.5 + eps
    assert s["value_rank_sinks"] == pytest.approx((6 * 0 + 2 * 1.0) / 8)  # unweighted it would read 0.5
    assert s["value_norm_ratio_sinks"] == pytest.approx((6 * 4 / 13 + 2 * 20 / 13) / 8)
    assert s["key_rank_sinks"] == s["value_rank_sinks"]  # the same order, twice the norm
    assert s["key_norm_ratio_sinks"] == pytest.approx(s["value_norm_ratio_sinks"])
    assert s["value_rank_dedicated"] is None  # the sink drew no attention: no weight, no value


def test_dedicated_norms_are_weighted_over_cells():
    # the sink draws 3 in step 0 (lowest norm, rank 0) and 1 in step 1 (highest, rank 1); its ratio is
    # over the content keys' mean norm, 2.5 in both steps
    colsum = [[[[[3.0, 1.0, 0.0]]]], [[[[1.0, 1.5, 1.5]]]]]
    values = [[[[[1.0, 2.0, 3.0]]]], [[[[9.0, 2.0, 3.0]]]]]
    s = summary(recording(colsum, value_norm=torch.tensor(values)))
    assert s["value_rank_dedicated"] == pytest.approx((3 * 0 + 1 * 1) / 4)
    assert s["value_norm_ratio_dedicated"] == pytest.approx((3 * 1 / 2.5 + 1 * 9 / 2.5) / 4)


def test_mask_share_pools_counts_and_its_baseline_is_the_mask_rate():
    tokens = torch.tensor([[[MASK, 1, 1, 1]]])
    colsum = [[[[[0.0, 4.0, 0.0, 0.0, 0.0], [0.0, 0.0, 4.0, 0.0, 0.0]]]]]  # one sink on [MASK], one not
    metrics_ = metrics(recording(colsum, tokens=tokens))
    assert metrics_["summary"]["mask_share_of_sinks"] == 0.5 and metrics_["baselines"]["mask_share_of_sinks"] == 0.25


# ---- moving sinks and their null models -----------------------------------------------------------


def test_a_pinned_sink_is_stable_and_a_moving_one_is_not():
    pinned = torch.tensor([[[[[0.5, 5.0, 0.5, 0.5]]]]]).repeat(4, 1, 1, 1, 1)
    moving = torch.stack([torch.roll(pinned[0], shifts=i, dims=-1) for i in range(4)])
    s_pinned, s_moving = summary(recording(pinned)), summary(recording(moving))
    assert s_pinned["dominant_stability"] == 1.0 and s_pinned["sink_set_iou"] == 1.0
    assert s_pinned["distinct_dominant_positions"] == 1.0
    assert s_moving["dominant_stability"] == 0.0 and s_moving["sink_set_iou"] == 0.0
    assert s_moving["distinct_dominant_positions"] == 4.0


def test_uniform_attention_null_is_exact_and_respects_padding():
    # sequence 0: 5 valid keys at both steps; sequence 1: 4 at step 0, then 5 (its key 4 was padding)
    tr = recording(torch.zeros(2, 1, 2, 1, 5))
    tr.key_valid[0, 1, -1] = False
    null = nulls.uniform_attention(tr, MASK)
    # P(same top key) = |V0 & V1| / (|V0| |V1|): 5 / 25 and 4 / 20, averaged over the sequences
    assert null["dominant_stability"] == pytest.approx((1 / 5 + 4 / 20) / 2)
    assert null["content_dominant_stability"] == pytest.approx((1 / 4 + 3 / 12) / 2)  # the sink left out
    # expected distinct keys of 2 draws: sequence 0 5 (1 - 0.8^2); sequence 1 4 (1 - 3/4 * 4/5) + (1 - 4/5)
    assert null["distinct_dominant_positions"] == pytest.approx((5 * 0.36 + 4 * 0.4 + 0.2) / 2)
    assert null["event_locked_change"] == 0.0 and null["sink_set_iou"] is None  # no sinks to move


def test_masking_levels_are_the_trajectorys_mask_rates():
    tokens = torch.tensor([[[MASK, MASK, 1, 1], [MASK, MASK, MASK, 1]], [[1, 1, 1, 1], [MASK, 1, 1, 1]]])
    tr = recording(torch.zeros(2, 1, 2, 1, 5), tokens=tokens)
    assert nulls.masking_levels(tr, MASK) == [pytest.approx(5 / 8), pytest.approx(1 / 8)]
    windows = torch.arange(30).view(3, 10)
    assert nulls.fixed_text_windows(windows, tr).tolist() == [[0, 1, 2, 3], [10, 11, 12, 13]]


def test_uniform_baseline_of_distinct_positions_is_the_expected_count_of_random_draws():
    tr = recording(torch.ones(3, 1, 1, 1, 5))
    assert stats.uniform_baselines(tr, MASK)["distinct_dominant_positions"] == pytest.approx(5 * (1 - 0.8 ** 3))
    assert stats.uniform_baselines(tr, MASK)["dominant_stability"] == pytest.approx(0.2)
