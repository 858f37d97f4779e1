"""The sink metrics by hand: tiny recordings whose right answer can be read off, including a head with
no sinks, a head whose dedicated sink takes everything, uniform attention, and the null models."""


import math

import pytest
import torch

from sinkdlm.analysis import nulls, stats
from sinkdlm.analysis.ranks import spearman

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


# ---- issue 22: metrics that do not read noise as signal --------------------------------------------


def test_gu_rate_counts_heads_by_the_type_of_their_winning_key():
    # 1 sink + content [first token 5, MASK, 7, 8]; 4 queries: a head's mean attention on key j is c_j / 4
    tokens = torch.tensor([[[5, MASK, 7, 8]]])
    layer0 = [[2.0, 0.5, 0.5, 0.5, 0.5],  # the sink draws 0.5 > 0.3: dedicated
              [0.2, 1.6, 0.8, 0.7, 0.7],  # the first token 0.4: first
              [0.4, 0.4, 1.4, 0.9, 0.9],  # the [MASK] 0.35: mask
              [0.8, 0.8, 0.8, 0.8, 0.8]]  # 0.2 everywhere: no sink
    layer1 = [[0.5, 0.5, 0.7, 1.0, 1.3]] + [[0.8] * 5] * 3  # token 8 draws 0.325: content
    m = stats.trajectory_metrics(recording([[[layer0], [layer1]]], tokens=tokens), MASK)
    per_layer, s = m["per_layer"], m["summary"]
    assert per_layer["gu_sink_rate"] == [0.75, 0.25] and s["gu_sink_rate"] == 0.5
    for kind, rates in {"dedicated": [0.25, 0], "first": [0.25, 0], "mask": [0.25, 0], "content": [0, 0.25]}.items():
        assert per_layer[f"gu_sink_rate_{kind}"] == rates, kind
    assert m["baselines"]["gu_sink_rate"] == 0.0  # uniform attention gives each of 5 keys 0.2
    assert m["rule"] == "gu"  # the default rule


def test_gu_rule_reads_the_same_share_alike_at_every_length_and_the_eps_rule_does_not():
    for length in (8, 64):  # one key draws 0.2 of the attention of `length` queries, the rest spread evenly
        others = (1 - 0.2) * length / (length - 1)
        colsum = torch.tensor([0.2 * length] + [others] * (length - 1))
        assert not stats.detect_gu(colsum).any()  # 0.2 < 0.3 at both lengths
        # eps: 0.2 * 8 = 1.6 is not > 0.8 + 3; 0.2 * 64 = 12.8 is > 0.81 + 3
        assert bool(stats.detect_eps(colsum)[0]) == (length == 64)


def test_mask_absorption_is_the_attention_on_all_mask_keys_against_their_uniform_share():
    tokens = torch.tensor([[[1, MASK, MASK, 2]]])  # 2 of 5 keys (1 sink + 4 content) are [MASK]
    colsum = [[[[[0.4, 0.4, 1.2, 1.2, 0.8]]], [[[0.8] * 5]]]]  # layer 0: 2.4 of 4 on the masks; layer 1 uniform
    m = stats.trajectory_metrics(recording(colsum, tokens=tokens), MASK)
    assert m["per_layer"]["mask_absorption"] == [pytest.approx(0.6), pytest.approx(0.4)]
    assert m["per_layer"]["mask_absorption_ratio"] == [pytest.approx(1.5), pytest.approx(1.0)]
    assert m["baselines"]["mask_absorption"] == pytest.approx(0.4) and m["summary"]["mask_absorption_ratio"] == \
        pytest.approx(1.25)


def test_tied_norms_share_their_mid_rank():
    norms = torch.tensor([2.0, 1.0, 1.0, 3.0])  # the two 1.0s span ranks 0 and 1: both 0.5, scaled by 3
    assert stats.norm_rank(norms).tolist() == pytest.approx([2 / 3, 1 / 6, 1 / 6, 1.0])
    valid = torch.tensor([True, True, True, False])
    assert stats.norm_rank(norms, valid)[:3].tolist() == pytest.approx([1.0, 0.25, 0.25])


def test_a_zero_value_sink_does_not_shift_content_ranks_or_ratios():
    colsum = [[[[[0.0, 3.0, 1.0, 0.0]]]]]  # a content sink at key 1, none at the dedicated sink
    ranks = {}
    for sink_value in (0.0, 10.0):
        values = torch.tensor([[[[[sink_value, 2.0, 1.0, 3.0]]]]])
        s = metrics(recording(colsum, value_norm=values), eps=1.0)["summary"]
        ranks[sink_value] = (s["value_rank_sinks"], s["value_norm_ratio_sinks"])
    assert ranks[0.0] == ranks[10.0] == (pytest.approx(0.5), pytest.approx(1.0))  # the middle of 1, 2, 3


def test_a_mask_sink_is_compared_with_the_other_masks():
    # layer 0: every [MASK] has the same value norm (1), below the tokens' (2, 3); the sink sits on a [MASK]
    tokens = torch.tensor([[[MASK, MASK, MASK, 5, 6]]])
    colsum = [[[[[0.0, 4.0, 0.25, 0.25, 0.25, 0.25]]]]]
    values = torch.tensor([[[[[1.0, 1.0, 1.0, 1.0, 2.0, 3.0]]]]])
    s = metrics(recording(colsum, value_norm=values, tokens=tokens), eps=1.0)["summary"]
    assert s["value_rank_sinks"] == pytest.approx(0.25)  # mid-rank 1 of 0..4: it reads "low norm"
    assert s["value_rank_same_type_sinks"] == pytest.approx(0.5)  # ties with both other masks: a typical mask


def test_spearman_of_attention_and_value_norm_by_hand():
    # content keys (the sink left out): value norms 1, 1, 2, 3 and attention 3, 3, 1, 1 (ties in both)
    colsum = [[[[[9.0, 3.0, 3.0, 1.0, 1.0]]]]]
    values = torch.tensor([[[[[0.0, 1.0, 1.0, 2.0, 3.0]]]]])
    s = summary(recording(colsum, value_norm=values))
    # mid-ranks (0.5, 0.5, 2, 3) and (2.5, 2.5, 0.5, 0.5): covariance -4, variances 4.5 and 4
    assert s["value_attention_spearman"] == pytest.approx(-4 / math.sqrt(4.5 * 4))


def test_event_locked_change_by_hand():
    # plain model, keys = positions 0..2; position 0 is revealed before step 1, position 1 before step 2
    tokens = torch.tensor([[[MASK, MASK, 5]], [[7, MASK, 5]], [[7, 8, 5]]])
    tops = [[0, 2], [1, 2], [1, 2]]  # head 0: 0 -> 1 -> 1, both times its top key was just revealed; head 1 stays
    colsum = torch.zeros(3, 1, 1, 2, 3)
    for step, heads in enumerate(tops):
        for head, key in enumerate(heads):
            colsum[step, 0, 0, head, key] = 3.0
    s = summary(recording(colsum, n_sink=0, tokens=tokens))
    assert s["event_change_rate"] == 0.5  # events: head 0 twice, changed once
    assert s["no_event_change_rate"] == 0.0  # no event: head 1 twice, never changed
    assert s["event_locked_change"] == 0.5


def test_cross_layer_stability_by_hand():
    colsum = torch.zeros(2, 2, 1, 1, 3)
    colsum[:, 0, 0, 0, 1] = 3.0  # layer 0: key 1 at both steps
    colsum[0, 1, 0, 0, 1] = colsum[1, 1, 0, 0, 2] = 3.0  # layer 1: key 1, then key 2
    m = stats.trajectory_metrics(recording(colsum, n_sink=0), MASK)
    assert m["per_layer"]["same_top_key_as_next_layer"] == [0.5, None]  # the last layer has no next
    assert m["summary"]["cross_layer_stability"] == 0.5 and m["baselines"]["cross_layer_stability"] == \
        pytest.approx(1 / 3)


def test_one_token_reveal_null_reveals_at_the_samplers_pace_and_per_row():
    # the sampler revealed 1 then 2 tokens of row 0 and 1 then 1 of row 1; position 0 is a prompt
    tokens = torch.tensor([[[1, MASK, MASK, MASK], [1, MASK, MASK, MASK]],
                           [[1, 4, MASK, MASK], [1, MASK, 4, MASK]],
                           [[1, 4, 4, 4], [1, 4, 4, MASK]]])
    tr = recording(torch.zeros(3, 1, 2, 1, 4), n_sink=0, tokens=tokens)
    text = torch.tensor([[20, 21, 22, 23], [30, 31, 32, 33]])
    inputs = nulls.one_token_reveal_inputs(text, tr, MASK, seed=0)
    masked = inputs == MASK
    assert masked.sum(-1).tolist() == [[3, 3], [2, 2], [0, 1]]
    assert torch.equal(masked[0], tokens[0] == MASK)
    assert torch.all(masked[1:] <= masked[:-1])  # a revealed position stays revealed
    assert torch.equal(torch.where(masked, text, inputs), text.expand(3, 2, 4))  # revealed with the true text
    other = tokens.clone()
    other[:, 0] = torch.tensor([1, MASK, MASK, MASK])  # row 0's sampler revealed nothing
    beside = nulls.one_token_reveal_inputs(text * 0 + text[1], recording(torch.zeros(3, 1, 2, 1, 4), n_sink=0,
                                                                         tokens=other), MASK, seed=0)
    assert torch.equal(beside[:, 1], inputs[:, 1])  # a row's reveals do not depend on the other rows
    assert torch.equal(nulls.one_token_reveal_inputs(text, tr, MASK, seed=0), inputs)  # seeded


def test_old_settings_and_metrics_read_the_eps_name():
    from sinkdlm.analysis.pipeline import AnalysisConfig

    assert AnalysisConfig.from_dict({"eps": 2.0, "rule": "eps"}).column_margin == 2.0
    assert stats.column_margin_of({"eps": 2.5}) == 2.5 and stats.column_margin_of({"column_margin": 1.5}) == 1.5


def test_mid_ranks_and_spearman_equal_scipys_on_tied_random_cells():
    scipy_stats = pytest.importorskip("scipy.stats")
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, 4, (20, 9), generator=gen).float()  # 9 keys, 4 values: many ties
    y = torch.randint(0, 5, (20, 9), generator=gen).float()
    valid = torch.ones(20, 9, dtype=torch.bool)
    valid[:10, 7:] = False  # half the cells have 7 valid keys
    for cell in range(20):
        keep = valid[cell]
        expected = (scipy_stats.rankdata(x[cell, keep].numpy()) - 1) / (int(keep.sum()) - 1)
        assert stats.norm_rank(x[cell], keep)[keep].tolist() == pytest.approx(expected.tolist(), abs=1e-6)
        rho = spearman(x[cell:cell + 1], y[cell:cell + 1], keep[None])[0]
        reference = scipy_stats.spearmanr(x[cell, keep].numpy(), y[cell, keep].numpy()).statistic
        assert float(rho) == pytest.approx(float(reference), abs=1e-5) if not math.isnan(reference) else rho.isnan()
