"""SampleConfig.threshold_factor (Fast-dLLM's factor-based parallel decoding) and
SampleConfig.cache_refresh_tokens (the approximate KV cache refreshed once N tokens were committed).

`fastdllm_factor_generate` re-writes, from reading it, the no-cache `generate` of NVlabs/Fast-dLLM's
llada/generate.py with `factor` set (its `get_transfer_index_dynamic`): every step a full forward, x0 =
argmax, confidence p(x0) at the block's masked positions, and per row the n most confident committed,
n the largest with c_n >= 1 - factor / (n + 1) (at least one), until the block has no masks. One
difference is kept on purpose (sinkdlm.sample.factor_count says why): when all but the last candidate
pass, Fast-dLLM commits the last too; here it stays masked. With steps = gen_length sinkdlm's schedule
asks for one token a step, Fast-dLLM's own minimum, so the two must commit the same tokens at every step.
"""

import pytest
import torch

from sinkdlm.errors import UserError
from sinkdlm.sample import Forward, SampleConfig, factor_count, generate
from tests.test_llada_reference import MASK, sharp_model
from tests.test_sample import BATCH_PROMPTS, checkpoint, cli_in_process, memorised  # noqa: F401 (fixtures)

EOS = 0
PROMPTS = [[3, 7, 11, 2, 9], [5, 1, 8, 13, 4]]  # equal lengths: the reference's canvas has no padding


def trajectory(model, cfg, prompts=PROMPTS, stats=None):
    steps = []
    generate(model, prompts, cfg, MASK, EOS, on_step=lambda _, x: steps.append(x.clone()), stats=stats)
    return steps


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


# ---- the factor rule ------------------------------------------------------------------------------


def rows(*confidences):
    """(confidence, candidate) of rows given as lists, None = not a candidate (confidence 0.999)."""
    width = max(len(r) for r in confidences)
    c = torch.tensor([[0.999 if v is None else v for v in r] + [0.0] * (width - len(r)) for r in confidences],
                     dtype=torch.float64)
    candidate = torch.tensor([[v is not None for v in r] + [False] * (width - len(r)) for r in confidences])
    return c, candidate


@pytest.mark.parametrize("confidences, factor, expected", [
    ([0.99, 0.9, 0.6], 1.0, 2),  # 2 x 0.01, 3 x 0.1 <= 1 < 4 x 0.4 (Fast-dLLM's code commits 3 here)
    ([0.6, 0.99, None, 0.9], 1.0, 2),  # unsorted, and a confident non-candidate ignored
    ([0.99, 0.9, 0.6], 2.0, 3),  # 4 x 0.4 = 1.6 <= 2
    ([0.99, 0.9, 0.6], 0.001, 1),  # nothing passes: the most confident still goes
    ([0.2], 1.0, 1),
    ([0.99, 0.9, 0.8, 0.7], 1.0, 3),  # 4 x 0.2 = 0.8 <= 1 < 5 x 0.3 (Fast-dLLM's code commits 4)
    ([None, None], 1.0, 0),  # no candidates, nothing committed
    ([1.0, 1 - 1 / 3], 1.0, 2),  # on the bound c_2 = 1 - factor / 3: passes, as in Fast-dLLM
])
def test_factor_count_against_hand_computed_confidences(confidences, factor, expected):
    c, candidate = rows(confidences)
    assert factor_count(c, candidate, factor).tolist() == [expected]


def test_factor_count_is_per_row():
    c, candidate = rows([0.99, 0.9, 0.6], [0.5, 0.4, None], [None])
    assert factor_count(c, candidate, 1.0).tolist() == [2, 1, 0]
    assert factor_count(c[:1], candidate[:1], 1.0).tolist() == [2]


def factor_rule_loop(sorted_confidences: list[float], factor: float) -> int:
    """The rule as Fast-dLLM's loop states it (the last-candidate quirk left out)."""
    n = 1
    while n < len(sorted_confidences) and sorted_confidences[n] >= 1 - factor / (n + 2):
        n += 1
    return n


def test_factor_count_equals_the_loop_on_random_confidences():
    gen = torch.Generator().manual_seed(0)
    c = torch.rand(200, 12, generator=gen, dtype=torch.float64) ** 0.1  # mostly confident
    candidate = torch.rand(200, 12, generator=gen) < 0.8
    candidate[:, 0] = True
    for factor in (0.5, 1.0, 2.0, 4.0):
        counts = factor_count(c, candidate, factor).tolist()
        assert counts == [factor_rule_loop(sorted(c[i][candidate[i]].tolist(), reverse=True), factor)
                          for i in range(len(c))]
        assert len(set(counts)) > 2  # the rule varies over rows


def fastdllm_factor_generate(model, prompts, gen_length, block_length, factor):
    """Fast-dLLM's factor decoding at temperature 0, no cache; returns the canvas after every step."""
    prompt = torch.tensor(prompts)
    x = torch.cat([prompt, torch.full((len(prompts), gen_length), MASK)], dim=1)
    steps = []
    for block in range(gen_length // block_length):
        lo, hi = prompt.shape[1] + block * block_length, prompt.shape[1] + (block + 1) * block_length
        while (x[:, lo:hi] == MASK).any():
            logits = model(x).double()
            x0 = logits.argmax(-1)
            masked = x == MASK
            masked[:, hi:] = False
            confidence = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1).masked_fill(~masked, float("-inf"))
            for row in range(len(prompts)):
                if masked[row].any():
                    ranked = confidence[row].sort(descending=True)
                    n = factor_rule_loop(ranked.values[: int(masked[row].sum())].tolist(), factor)
                    x[row, ranked.indices[:n]] = x0[row, ranked.indices[:n]]
            steps.append(x.clone())
    return steps


@pytest.mark.parametrize("model_kw", [dict(sink_tokens=1), dict(sink_tokens=0)], ids=str)
@pytest.mark.parametrize("shape", [(16, 16), (16, 8), (12, 4)], ids=str)
@pytest.mark.parametrize("factor", [2.0, 3.0, 4.0])
def test_factor_decoding_commits_fastdllms_tokens_at_every_step(model_kw, shape, factor):
    gen_length, block_length = shape
    model = sharp_model(**model_kw)
    ref = fastdllm_factor_generate(model, PROMPTS, gen_length, block_length, factor)
    cfg = SampleConfig(gen_length=gen_length, steps=gen_length, block_length=block_length, threshold_factor=factor)
    assert same(trajectory(model, cfg), ref)
    if factor >= 3:  # not vacuous: some step committed several tokens (at 2 all but one case do; below, seldom)
        assert len(ref) < gen_length


def test_a_tiny_factor_is_plain_low_confidence_decoding():
    """factor -> 0 commits only the most confident candidate, exactly the one-token schedule's choice."""
    model = sharp_model(sink_tokens=1)
    for cfg in [SampleConfig(gen_length=16, steps=16, block_length=8),
                SampleConfig(gen_length=16, steps=16, block_length=8, cache="dual", temperature=0.7, seed=2)]:
        assert same(trajectory(model, cfg.replace(threshold_factor=1e-9)), trajectory(model, cfg))


def test_each_step_commits_the_schedule_or_the_factor_rule_whichever_is_more(monkeypatch):
    """With fewer steps than tokens the schedule may ask for more than the rule: each row commits
    max(scheduled, factor_count) at each step, and the block ends without masks."""
    import sinkdlm.sample as sample

    counts = []
    original = sample.factor_count
    monkeypatch.setattr(sample, "factor_count", lambda c, cand, f: counts.append(original(c, cand, f)) or counts[-1])
    model = sharp_model(sink_tokens=1)
    cfg = SampleConfig(gen_length=16, steps=4, block_length=16, threshold_factor=1.0)
    steps = trajectory(model, cfg)
    before = torch.cat([torch.tensor(PROMPTS), torch.full((2, 16), MASK)], dim=1)
    remaining = torch.full((2,), 16)
    for s, (x, n_factor) in enumerate(zip(steps, counts)):
        committed = ((before == MASK) & (x != MASK)).sum(1)
        scheduled = (remaining + (4 - s) - 1) // (4 - s)
        assert committed.tolist() == torch.maximum(scheduled, n_factor).tolist()
        before, remaining = x, remaining - committed
    assert (steps[-1] != MASK).all()


@pytest.mark.parametrize("model_kw", [dict(sink=0), dict(sink=1), dict(sink=2, sink_position="end")], ids=str)
@pytest.mark.parametrize("changes", [
    dict(threshold_factor=1.0, temperature=0.7),
    dict(threshold_factor=2.0, cache="dual", cache_refresh_tokens=2, temperature=0.7, guidance=1.0),
    dict(threshold=0.3, cache="prefix", cache_refresh_tokens=3, remasking="random"),
    dict(threshold_factor=0.5, cache="dual", cache_refresh_tokens=1, cache_refresh=3),
], ids=str)
def test_a_prompts_sample_does_not_depend_on_its_batch(model_kw, changes, monkeypatch):
    """As tests/test_sample.py's test of the same name: batch sizes 1 and 3 and a shuffled order give
    the same completions. With cache_refresh_tokens the rows' refreshes fall on different steps (checked:
    some step refreshes only some rows), each row's when its own count says."""
    from tests.test_sample import sharpened_model

    mixed = []
    original = Forward._some_refreshed
    monkeypatch.setattr(Forward, "_some_refreshed", lambda self, *a: mixed.append(1) or original(self, *a))
    model = sharpened_model(**model_kw)
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, seed=3, **changes)
    together = generate(model, BATCH_PROMPTS, cfg, MASK, EOS)
    if cfg.cache_refresh_tokens > 1:
        assert mixed
    alone = [generate(model, [p], cfg, MASK, EOS, indices=[i])[0] for i, p in enumerate(BATCH_PROMPTS)]
    assert alone == together
    order = [2, 0, 1]
    shuffled = generate(model, [BATCH_PROMPTS[i] for i in order], cfg, MASK, EOS, indices=order)
    assert [shuffled[order.index(i)] for i in range(3)] == together


# ---- the token-triggered refresh ----------------------------------------------------------------------


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("model_kw", [dict(sink_tokens=1), dict(sink_tokens=0)], ids=str)
@pytest.mark.parametrize("parallel", [dict(), dict(threshold=0.5), dict(threshold_factor=2.0)], ids=str)
def test_refreshing_after_every_token_is_full_recompute(cache, model_kw, parallel):
    """N = 1: every step follows a commit, so every step recomputes every position, as full recompute does."""
    model = sharp_model(**model_kw)
    base = SampleConfig(gen_length=16, steps=16, block_length=8, temperature=0.7, seed=1, **parallel)
    stats = {}
    exact = trajectory(model, base)
    assert same(exact, trajectory(model, base.replace(cache=cache, cache_refresh_tokens=1), stats=stats))
    assert stats["full_forward_calls"] == stats["forward_calls"] == len(exact)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_a_refresh_count_never_reached_is_the_plain_cache(cache):
    model = sharp_model(sink_tokens=1)
    base = SampleConfig(gen_length=16, steps=16, block_length=8, temperature=0.7, seed=1, cache=cache,
                        threshold_factor=1.0)
    stats = {}
    assert same(trajectory(model, base), trajectory(model, base.replace(cache_refresh_tokens=10**6), stats=stats))
    assert stats["full_forward_calls"] == 2  # one per block's start


def test_a_row_refreshes_once_n_of_its_tokens_were_committed_since_its_last_refresh(monkeypatch):
    """One prompt, threshold decoding: the refresh falls on the step after the count reaches N, however many
    steps that took; with one token a step it is every N steps, as cache_refresh = N."""
    refreshes = []
    original = Forward.__call__
    monkeypatch.setattr(Forward, "__call__", lambda self, x, w, q, refresh, wanted: refreshes.append(refresh)
                        or original(self, x, w, q, refresh, wanted))
    model = sharp_model(sink_tokens=1)
    cfg = SampleConfig(gen_length=16, steps=16, block_length=8, cache="dual", cache_refresh_tokens=3)
    generate(model, [[1, 2, 3]], cfg, MASK, EOS)
    assert refreshes == [True, False, False, True, False, False, True, False] * 2
    refreshes.clear()
    steps = trajectory(model, cfg.replace(threshold_factor=2.0), prompts=[[1, 2, 3]])
    committed = [int((a == MASK).sum() - (b == MASK).sum())
                 for a, b in zip([torch.tensor([[1, 2, 3] + [MASK] * 16])] + steps, steps)]
    assert len(refreshes) == len(steps) and max(committed) > 1
    since, in_block = 0, 0
    for refresh, n in zip(refreshes, committed):
        in_block = 0 if in_block == 8 else in_block
        assert refresh == (in_block == 0 or since >= 3)
        since = n if refresh else since + n
        in_block += n


def test_a_triggered_refresh_takes_fewer_full_forwards_than_a_periodic_one():
    """With N tokens a refresh, the full forwards drop from one a step (cache_refresh=1) to about one per N
    tokens, and the forwards from one a step to about one per committed group."""
    model = sharp_model(sink_tokens=1)
    base = SampleConfig(gen_length=32, steps=32, block_length=16, cache="dual", threshold_factor=4.0)
    counts = {}
    for name, cfg in [("full", base.replace(cache="none", threshold_factor=None)),
                      ("every step", base.replace(cache_refresh=1)), ("every 4 tokens", base.replace(cache_refresh_tokens=4))]:
        counts[name] = {}
        generate(model, PROMPTS[:1], cfg, MASK, EOS, stats=counts[name])
    assert counts["full"]["full_forward_calls"] == 32
    assert counts["every 4 tokens"]["full_forward_calls"] < counts["every step"]["full_forward_calls"] \
        == counts["every step"]["forward_calls"] < 32
    assert counts["every 4 tokens"]["full_forward_calls"] <= 2 + 32 // 4  # block starts + one per 4 tokens


# ---- bad values ----------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, words", [
    (dict(threshold_factor=0), "threshold_factor=0 must be"), (dict(threshold_factor=-1.0), "threshold_factor"),
    (dict(threshold_factor=float("nan")), "threshold_factor"), (dict(cache_refresh_tokens=-1), "cache_refresh_tokens"),
    (dict(threshold=0.9, threshold_factor=1.0), "set one of them"),
], ids=str)
def test_bad_values_are_one_line_user_errors(bad, words):
    with pytest.raises(UserError, match=words) as e:
        SampleConfig(**bad)
    assert "\n" not in str(e.value)


@pytest.mark.parametrize("extra", [["--threshold-factor", 0], ["--cache-refresh-tokens", -2],
                                   ["--threshold-factor", 1, "--threshold", 0.9]], ids=str)
def test_cli_bad_values_exit_2(checkpoint, extra, monkeypatch, capsys):  # noqa: F811 (the fixture)
    assert cli_in_process(monkeypatch, "--checkpoint", checkpoint, "--prompt", "w1", *extra) == 2
    assert "error:" in capsys.readouterr().err


def test_cli_takes_both_options(checkpoint, monkeypatch, capsys):  # noqa: F811 (the fixture)
    args = ["--checkpoint", checkpoint, "--prompt", "w3 w9", "--gen-length", 8, "--steps", 8, "--cache", "dual"]
    assert cli_in_process(monkeypatch, *args, "--threshold-factor", 1.5, "--cache-refresh-tokens", 2) == 0
    assert "completion" in capsys.readouterr().out


@pytest.mark.parametrize("body, param", [({"threshold_factor": 0}, "threshold_factor"),
                                         ({"cache_refresh_tokens": -1}, "cache_refresh_tokens"),
                                         ({"threshold_factor": 1, "threshold": 0.5}, "threshold")], ids=str)
def test_serve_refuses_bad_values_by_name(body, param):
    from sinkdlm.serve.schema import COMPLETION_FIELDS, RequestError, check_fields, generation
    from tests.test_serve_units import DEFAULTS, LIMITS

    check_fields({"model": "m", **body}, COMPLETION_FIELDS)  # both are request fields
    with pytest.raises(RequestError) as e:
        generation({"model": "m", **body}, [[1, 2]], "prompt", DEFAULTS, LIMITS)
    assert e.value.param == param and e.value.status == 400, e.value.message


def test_eval_gsm8k_takes_both_options_and_a_factor_replaces_the_presets_threshold():
    import argparse

    from sinkdlm.commands import eval_gsm8k as command
    from sinkdlm.eval.gsm8k import exact

    parser = argparse.ArgumentParser()
    command.configure(parser)

    def settings(*extra):
        return command.settings_from(parser.parse_args(["--checkpoint", "x", "--data", "synthetic", *extra]))

    fast = settings("--threshold-factor", "1.5", "--cache-refresh-tokens", "4")
    assert (fast.first.threshold, fast.first.threshold_factor, fast.first.cache_refresh_tokens) == (None, 1.5, 4)
    assert settings().first.threshold == 0.95  # the preset's, untouched without a factor
    assert exact(fast).first.threshold_factor is None and exact(fast).first.cache == "none"
