"""The likelihood estimators alone, on a tiny random model with a 5-token vocabulary."""

import math

import numpy as np
import pytest
import torch

from sinkdlm.eval.likelihood import (
    ForwardStats,
    LikelihoodConfig,
    chain_rows,
    exact_elbo,
    mask_weight,
    rolling_pairs,
    run_rows,
    score_groups,
    score_pairs,
)
from sinkdlm.model import DLM
from tests.conftest import tiny

VOCAB = 5
CONTEXT = [1, 2, 3]
CONTINUATION = [4, 0, 2]


def tiny_model(**overrides) -> DLM:
    torch.manual_seed(0)
    return DLM(tiny(vocab_size=VOCAB, **overrides)).eval()


def at_positions(logits, positions):
    """What DLM.forward does with `logits_at`: only the requested (row, column) logits."""
    return logits if positions is None else logits[positions[:, 0], positions[:, 1]]


class UniformModel(torch.nn.Module):
    """Predicts every token with probability 1 / VOCAB."""

    mask_id = VOCAB

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, attention_mask=None, logits_at=None):
        return at_positions(torch.zeros(*idx.shape, VOCAB), logits_at)


def test_exact_elbo_weights_integrate_to_the_true_likelihood_of_a_uniform_model():
    # sum over masks of E_t[P(mask | p) * k / p] = L, so the ELBO of a uniform model is exactly -L log V
    elbo = exact_elbo(UniformModel(), CONTEXT, CONTINUATION, eps=1e-3)
    assert elbo == pytest.approx(-len(CONTINUATION) * math.log(VOCAB), abs=1e-6)  # float32 log-softmax
    assert sum(math.comb(4, k) * k * mask_weight(k, 4, 0.1) for k in range(1, 5)) == pytest.approx(4, abs=1e-12)


@pytest.mark.parametrize("variant", [{}, {"sink_tokens": 1}, {"attn_gate": "elementwise"}])
@pytest.mark.parametrize("guidance", [0.0, 0.6])
def test_mc_mean_converges_to_the_exact_elbo(variant, guidance):
    model = tiny_model(**variant)
    exact = exact_elbo(model, CONTEXT, CONTINUATION, guidance=guidance)
    estimate = score_pairs(model, [(CONTEXT, CONTINUATION)], LikelihoodConfig(mc_num=16384, guidance=guidance))[0]
    # tolerance: 4 standard errors (the i.i.d. formula, conservative under stratification); ~0.1 nats here
    assert estimate.stderr < 0.05
    assert abs(estimate.loglik - exact) < 4 * estimate.stderr


@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_mc_mean_converges_to_the_exact_elbo_of_its_noise_floor(eps):
    """eps = 0 is the paper's evaluation setting; the estimate must target the ELBO of the eps it uses."""
    model, continuation = VisibilityModel(), [0, 1, 2, 3, 4]  # its ELBO depends on the floor
    exact = {e: exact_elbo(model, [], continuation, eps=e) for e in (0.0, 0.1)}
    estimate = score_pairs(model, [([], continuation)], LikelihoodConfig(mc_num=16384, eps=eps))[0]
    assert abs(exact[0.0] - exact[0.1]) > 6 * estimate.stderr  # the check below tells the floors apart
    assert abs(estimate.loglik - exact[eps]) < 4 * estimate.stderr


def test_a_draw_that_masks_nothing_scores_zero_not_nan():
    from sinkdlm.eval.likelihood import _combine, _PairPlan

    results = [(torch.tensor([-1.0]), torch.tensor([True]))]
    plan = _PairPlan(rows=[-1, 0], p=np.array([0.0, 0.5]), greedy_row=0)  # t = 0 with eps = 0: no mask
    assert _combine(plan, results, "mc").loglik == pytest.approx(-1.0)  # mean of 0 and -1 / 0.5
    with pytest.raises(Exception, match="eps=1"):
        LikelihoodConfig(eps=1.0)


def test_chain_rule_equals_its_definition_with_padding_and_batching():
    model = tiny_model(sink_tokens=1)
    pairs = [([1, 2, 3], [4, 0, 2]), ([3], [1, 1]), ([0, 4, 4, 1, 2], [3])]
    got = score_pairs(model, pairs, LikelihoodConfig(estimator="chain_rule", batch_size=4))
    for (context, continuation), estimate in zip(pairs, got):
        expected, greedy = 0.0, True
        for i in range(len(continuation)):  # mask the suffix from i, score token i, one sequence at a time
            ids = torch.tensor([context + continuation[:i] + [model.mask_id] * (len(continuation) - i)])
            with torch.no_grad():
                logp = model(ids)[0, len(context) + i].log_softmax(-1)
            expected += float(logp[continuation[i]])
            greedy &= int(logp.argmax()) == continuation[i]
        assert estimate.loglik == pytest.approx(expected, abs=1e-5)
        assert estimate.greedy == greedy and estimate.stderr == 0.0


def test_guidance_combines_conditional_and_prompt_masked_logits():
    model, w = tiny_model(), 1.1
    ids = torch.tensor([CONTEXT + [model.mask_id]])
    un_ids = torch.tensor([[model.mask_id] * len(CONTEXT) + [model.mask_id]])
    with torch.no_grad():
        cond, un = model(ids)[0, -1], model(un_ids)[0, -1]
    expected = (un + (w + 1) * (cond - un)).log_softmax(-1)[4]
    got = score_pairs(model, [(CONTEXT, [4])], LikelihoodConfig(estimator="chain_rule", guidance=w))[0]
    assert got.loglik == pytest.approx(float(expected), abs=1e-5)


class VisibilityModel(torch.nn.Module):
    """Predicts token (position mod VOCAB) more confidently the more of the sequence is visible.

    Like a trained model (and unlike a random one), its expected score varies with t, which is the
    part of the variance that stratifying t removes.
    """

    mask_id = VOCAB
    confidence = 10.0

    def __init__(self) -> None:
        super().__init__()
        self.dummy = torch.nn.Parameter(torch.zeros(1))

    def forward(self, idx, attention_mask=None, logits_at=None):
        visible = (idx != VOCAB).float().mean(1)
        logits = torch.zeros(*idx.shape, VOCAB)
        pos = torch.arange(idx.shape[1])
        logits[:, pos, pos % VOCAB] = self.confidence * visible[:, None]
        return at_positions(logits, logits_at)


def test_stratified_t_lowers_the_variance_of_the_estimate():
    model, continuation = VisibilityModel(), [i % VOCAB for i in range(8)]
    spread = {}
    for stratified in (True, False):
        runs = [score_pairs(model, [([], continuation)], LikelihoodConfig(mc_num=16, seed=s, stratified=stratified))[0]
                for s in range(256)]
        spread[stratified] = np.var([r.loglik for r in runs])
    assert spread[True] < 0.7 * spread[False]  # measured 0.43 with these seeds


def test_common_random_numbers_share_draws_within_a_question_only():
    model = tiny_model()
    group = [(CONTEXT, CONTINUATION), (CONTEXT, CONTINUATION)]
    shared = score_groups(model, [group], LikelihoodConfig(mc_num=8, crn=True))[0]
    independent = score_groups(model, [group], LikelihoodConfig(mc_num=8, crn=False))[0]
    assert shared[0].loglik == shared[1].loglik
    assert independent[0].loglik != independent[1].loglik


def test_same_seed_gives_identical_numbers_and_dedupe_changes_only_the_cost():
    model = tiny_model()
    pairs = [(CONTEXT, CONTINUATION), ([2], [1, 3])]
    first = score_pairs(model, pairs, LikelihoodConfig(mc_num=32, seed=7))
    assert first == score_pairs(model, pairs, LikelihoodConfig(mc_num=32, seed=7))
    assert first != score_pairs(model, pairs, LikelihoodConfig(mc_num=32, seed=8))
    cheap, full = ForwardStats(), ForwardStats()
    deduped = score_pairs(model, pairs, LikelihoodConfig(mc_num=32, seed=7), stats=cheap)
    every = score_pairs(model, pairs, LikelihoodConfig(mc_num=32, seed=7, dedupe=False, batch_size=1), stats=full)
    for a, b in zip(deduped, every):
        assert a.loglik == pytest.approx(b.loglik, abs=1e-5)
    assert cheap.tokens < full.tokens / 3


def test_run_rows_scores_only_the_requested_positions():
    model = tiny_model()
    rows = chain_rows(CONTEXT, CONTINUATION, model.mask_id)
    results = run_rows(model, rows, batch_size=2)
    assert [len(logp) for logp, _ in results] == [1, 1, 1]
    for row, (logp, correct) in zip(rows, results):  # each equals the full forward's log-softmax there
        with torch.no_grad():
            full = model(torch.tensor([row.ids]))[0, list(row.positions)].log_softmax(-1)
        targets = torch.tensor(row.targets)
        assert torch.allclose(logp, full.gather(1, targets[:, None])[:, 0], atol=1e-5)
        assert torch.equal(correct, full.argmax(-1) == targets)


def test_rolling_windows_cover_every_token_once_with_left_context():
    tokens = list(range(23))
    pairs = rolling_pairs(tokens, max_len=8)
    assert [t for _, cont in pairs for t in cont] == tokens
    for context, continuation in pairs:
        assert len(context) + len(continuation) <= 8
        assert not context or context[-1] + 1 == continuation[0]
