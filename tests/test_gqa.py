"""Grouped-query attention reads each key/value head in place: the same outputs as repeating the
heads (the layout before), and a KV cache n_head / n_query_groups times smaller."""

import pytest
import torch

from sinkdlm import attention
from sinkdlm.model import DLM, KVCache
from tests.conftest import tiny

HEADS, GROUPS = 7, 1  # Dream-7B's ratio: 28 query heads over 4 key/value heads
TOL = dict(rtol=1e-5, atol=1e-5)  # float32; grouped and repeated kernels sum in other orders


def grouped_and_repeated(**kw) -> tuple[DLM, DLM]:
    """A model with GROUPS key/value heads and the same network with each head's copy stored."""
    torch.manual_seed(0)
    shape = dict(n_head=HEADS, n_embd=8 * HEADS, **kw)
    grouped = DLM(tiny(n_query_groups=GROUPS, **shape)).eval()
    repeated = DLM(tiny(**shape)).eval()
    state = grouped.state_dict()
    for name, w in list(state.items()):
        if name.endswith(("attn.k.weight", "attn.v.weight")):
            per_head = w.view(GROUPS, -1, w.shape[-1]).repeat_interleave(HEADS // GROUPS, dim=0)
            state[name] = per_head.reshape(-1, w.shape[-1])
    repeated.load_state_dict(state)
    return grouped, repeated


VARIANTS = [dict(sink_tokens=0), dict(sink_tokens=1), dict(sink_tokens=2, sink_position="end"),
            dict(sink_tokens=1, sink_self_only=False), dict(sink_tokens=1, attn_impl="reference"),
            dict(sink_tokens=1, attn_impl="eager")]


@pytest.mark.parametrize("native", [True, False], ids=["enable_gqa", "repeat_fallback"])
@pytest.mark.parametrize("kw", VARIANTS, ids=str)
def test_grouped_heads_give_the_repeated_heads_outputs(kw, native, monkeypatch):
    monkeypatch.setattr(attention, "SDPA_GQA", native and attention.SDPA_GQA)
    grouped, repeated = grouped_and_repeated(**kw)
    idx = torch.randint(0, 51, (3, 12))
    valid = torch.ones(3, 12, dtype=torch.long)
    valid[1, 9:] = 0
    with torch.no_grad():
        torch.testing.assert_close(grouped(idx, valid), repeated(idx, valid), **TOL)


def test_observer_sees_one_key_head_per_query_head():
    grouped, repeated = grouped_and_repeated(sink_tokens=1)
    seen, idx = {}, torch.randint(0, 51, (2, 10))
    with torch.no_grad():
        for name, model in [("grouped", grouped), ("repeated", repeated)]:
            model(idx, observer=lambda layer, p, k, v, s, n=name: seen.setdefault(n, (p, k)))
    for a, b in zip(seen["grouped"], seen["repeated"]):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **TOL)


def test_kv_cache_holds_the_grouped_heads_only_and_reads_them_back_exactly():
    grouped, repeated = grouped_and_repeated(sink_tokens=1)
    idx = torch.randint(0, 51, (2, 16))
    caches = {"grouped": KVCache(), "repeated": KVCache()}
    rows = torch.tensor([[4, 5, 6], [10, 11, 12]])
    with torch.no_grad():
        for name, model in [("grouped", grouped), ("repeated", repeated)]:
            model(idx, cache=caches[name])
        assert caches["repeated"].nbytes() == HEADS // GROUPS * caches["grouped"].nbytes()
        keys, _ = caches["grouped"].layers[0]
        assert keys.shape == (2, GROUPS, 16, 8)
        torch.testing.assert_close(grouped(idx, cache=caches["grouped"], query_index=rows),
                                   repeated(idx, cache=caches["repeated"], query_index=rows), **TOL)
