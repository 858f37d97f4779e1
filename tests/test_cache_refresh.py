"""SampleConfig.cache_refresh: the approximate KV cache recomputed every N steps of a block."""

import pytest
import torch

from sinkdlm.sample import Forward, SampleConfig, generate
from tests.test_llada_reference import MASK, sharp_model

EOS = 0
PROMPTS = [[3, 7, 11, 2, 9], [5, 1, 8]]


def trajectory(model, cfg):
    steps = []
    generate(model, PROMPTS, cfg, MASK, EOS, on_step=lambda _, x: steps.append(x.clone()))
    return steps


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("model_kw", [dict(sink_tokens=1), dict(sink_tokens=0)], ids=str)
def test_refreshing_every_step_is_full_recompute(cache, model_kw):
    model = sharp_model(**model_kw)
    base = SampleConfig(gen_length=16, steps=16, block_length=8, temperature=0.7, seed=1)
    exact = trajectory(model, base)
    assert all(torch.equal(a, b) for a, b in zip(exact, trajectory(model, base.replace(cache=cache, cache_refresh=1)),
                                                  strict=True))


def test_refresh_happens_every_n_steps_of_each_block(monkeypatch):
    refreshes = []
    original = Forward.__call__
    monkeypatch.setattr(Forward, "__call__", lambda self, x, w, q, refresh, wanted: refreshes.append(refresh)
                        or original(self, x, w, q, refresh, wanted))
    cfg = SampleConfig(gen_length=16, steps=16, block_length=8, cache="dual", cache_refresh=3)
    generate(sharp_model(), [[1, 2, 3]], cfg, MASK, EOS)
    assert refreshes == [True, False, False, True, False, False, True, False] * 2
