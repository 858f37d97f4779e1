"""The model: fast sink attention equals the dense-mask reference; the sink stream is input-free; the
KV-cache rows, the observer and `logits_at` agree with the full forward for every variant."""

import itertools

import pytest
import torch

from sinkdlm import attention
from sinkdlm.config import SMDM_SIZES, model_preset
from sinkdlm.model import DLM, KVCache, count_params
from tests.conftest import tiny

SINK_VARIANTS = [
    dict(sink_tokens=n, sink_position=pos, sink_zero_value=zv, sink_self_only=so, attn_gate=gate)
    for n, pos, zv, so, gate in itertools.product(
        [1, 2, 4], ["front", "end"], [False, True], [True, False], ["none", "elementwise", "headwise"])
]
ALL_VARIANTS = [dict(attn_gate=gate) for gate in ["none", "elementwise", "headwise"]] + SINK_VARIANTS
SELF_ONLY_VARIANTS = [kw for kw in ALL_VARIANTS if kw.get("sink_self_only", True)]


def _name(kw):
    return "-".join(f"{v}" for v in kw.values())


def _options(kw):
    """A variant plus grouped-query attention where the gate is headwise (as in the tests below)."""
    return dict(kw, n_query_groups=1 if kw["attn_gate"] == "headwise" else None)


def _padding(padded):
    if not padded:
        return None
    am = torch.ones(3, 12, dtype=torch.long)
    am[1, 7:] = 0
    am[2, 3:] = 0
    return am


def _pair(**kw):
    fast = DLM(tiny(attn_impl="fast", **kw))
    ref = DLM(tiny(attn_impl="reference", **kw))
    ref.load_state_dict(fast.state_dict())
    return fast, ref


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("kw", SINK_VARIANTS, ids=_name)
@pytest.mark.parametrize("padded", [False, True])
def test_fast_equals_reference(kw, padded):
    fast, ref = _pair(**_options(kw))
    idx = torch.randint(0, 51, (3, 12))
    am = _padding(padded)
    out_f, out_r = fast(idx, am), ref(idx, am)
    keep = slice(None) if am is None else am.bool()
    torch.testing.assert_close(out_f[keep], out_r[keep], rtol=1e-5, atol=1e-5)
    (out_f[keep].square().mean()).backward()
    (out_r[keep].square().mean()).backward()
    gf, gr = _grads(fast), _grads(ref)
    assert gf.keys() == gr.keys() and "sink" in gf
    for name in gf:
        torch.testing.assert_close(gf[name], gr[name], rtol=1e-5, atol=1e-5, msg=name)


def _left_padding_keeps_positions(kw):
    """RoPE sees only relative positions, so left padding shifts a row harmlessly unless front
    sinks stay at positions 0..S-1 while its content moves."""
    return not kw.get("sink_tokens") or kw["sink_position"] == "end"


@pytest.mark.parametrize("kw", ALL_VARIANTS, ids=_name)
@pytest.mark.parametrize("impl", ["fast", "reference"])
def test_a_rows_logits_do_not_depend_on_the_padding_of_its_batch(kw, impl):
    """End sinks sit right after each row's own last token, whatever the batch's width."""
    model = DLM(tiny(attn_impl=impl, **_options(kw))).eval()
    row = torch.randint(0, 51, (1, 7))
    batch, am = torch.randint(0, 51, (3, 12)), torch.ones(3, 12, dtype=torch.long)
    batch[1, :7], am[1, 7:], am[2, 10:] = row, 0, 0
    with torch.no_grad():
        alone = model(row)[0]
        torch.testing.assert_close(model(batch, am)[1, :7], alone, rtol=1e-5, atol=1e-5)
        if _left_padding_keeps_positions(kw):
            batch[1, 5:], am[1] = row, torch.arange(12) >= 5
            torch.testing.assert_close(model(batch, am)[1, 5:], alone, rtol=1e-4, atol=1e-5)


def test_eager_equals_fast():
    fast, _ = _pair(sink_tokens=2, attn_gate="elementwise")
    eager = DLM(tiny(attn_impl="eager", sink_tokens=2, attn_gate="elementwise"))
    eager.load_state_dict(fast.state_dict())
    idx = torch.randint(0, 51, (2, 10))
    torch.testing.assert_close(eager(idx), fast(idx), rtol=1e-5, atol=1e-5)


def test_observer_sees_probabilities_over_sink_and_content():
    model = DLM(tiny(sink_tokens=1))
    seen = []
    model(torch.randint(0, 51, (2, 9)), observer=lambda layer, p, k, v, s: seen.append((layer, p.shape, s)))
    assert seen == [(0, (2, 2, 9, 10), 1), (1, (2, 2, 9, 10), 1)]


def test_sink_hidden_states_do_not_depend_on_input(monkeypatch):
    model = DLM(tiny(sink_tokens=2))
    captured = []
    for block in model.blocks:  # the sink stream entering each layer, as the forward runs it
        monkeypatch.setattr(block, "self_only_sink", lambda sink, run=block.self_only_sink:
                            captured.append(sink.detach().clone()) or run(sink))
    model(torch.randint(0, 51, (1, 12)))
    first = captured[:]
    captured.clear()
    model(torch.randint(0, 51, (4, 7)))
    for a, b in zip(first, captured):  # another batch shape may round differently; input dependence is O(1)
        torch.testing.assert_close(a.expand_as(b), b, rtol=1e-6, atol=1e-6)
    states = model.sink_hidden_states()
    torch.testing.assert_close(states[1], first[1])


def test_no_sink_no_gate_is_the_plain_model():
    """With sink_tokens=0 and no gate, every implementation is the same network, same parameters."""
    plain = DLM(tiny())
    assert not any(n == "sink" or ".gate." in n for n, _ in plain.named_parameters())
    idx = torch.randint(0, 51, (2, 8))
    for impl in ("reference", "eager"):
        other = DLM(tiny(attn_impl=impl))
        other.load_state_dict(plain.state_dict())
        torch.testing.assert_close(other(idx), plain(idx), rtol=0, atol=1e-6)


def test_logits_cover_real_tokens_only():
    model = DLM(tiny(sink_tokens=4, sink_position="end"))
    out = model(torch.full((2, 5), 50))  # all mask tokens (mask id = vocab size = 50)
    assert out.shape == (2, 5, 50)


def test_sink_cache_gives_the_same_logits():
    model = DLM(tiny(sink_tokens=2, sink_position="end")).eval()
    idx = torch.randint(0, 51, (2, 11))
    with torch.no_grad():
        plain = model(idx)
        with model.sink_cache():
            cached1, cached2 = model(idx), model(idx)
    torch.testing.assert_close(cached1, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(cached2, plain, rtol=0, atol=1e-6)


def test_472_has_paper_non_embedding_params():
    cfg = model_preset("472")
    assert cfg.non_embedding_params() == 471_906_560
    with torch.device("meta"):
        model = DLM(model_preset("472", sink_tokens=1, attn_gate="elementwise"))
    counts = count_params(model)
    assert counts["non_embedding"] == 471_906_560
    assert counts["gate"] == 18 * 1280 * 1280  # an E x E gate in each of 18 layers, reported apart (start-up line)


@pytest.mark.parametrize("name", list(SMDM_SIZES))
def test_preset_names_match_their_size(name):
    millions = model_preset(name).non_embedding_params() / 1e6
    assert abs(millions - int(name)) / int(name) < 0.05  # SMDM rounds names: 6 is 6.29M


def test_init_follows_smdm():
    model = DLM(model_preset("demo", vocab_size=1000))
    e, n_layer = 128, 4
    assert abs(model.blocks[0].attn.q.weight.std().item() - (2 / (5 * e)) ** 0.5) < 0.01
    assert abs(model.blocks[0].mlp.w_down.weight.std().item() - 1 / e**0.5 / n_layer) < 0.005


def test_logit_shift_moves_predictions_one_to_the_right():
    plain = DLM(tiny(sink_tokens=1))
    shifted = DLM(tiny(sink_tokens=1, logit_shift=True))
    shifted.load_state_dict(plain.state_dict())
    idx = torch.randint(0, 51, (2, 7))
    torch.testing.assert_close(shifted(idx)[:, 1:], plain(idx)[:, :-1], rtol=0, atol=0)


def test_square_attention_mask_restricts_content_keys():
    """A (1,1,T,T) matrix of allowed keys: the lower triangle equals causal mode, fast == reference."""
    causal_model = DLM(tiny(sink_tokens=1, causal=True))
    model = DLM(tiny(sink_tokens=1))
    model.load_state_dict(causal_model.state_dict())
    ref = DLM(tiny(sink_tokens=1, attn_impl="reference"))
    ref.load_state_dict(causal_model.state_dict())
    idx = torch.randint(0, 51, (2, 9))
    tril = torch.ones(9, 9, dtype=torch.bool).tril()[None, None]
    torch.testing.assert_close(model(idx, tril), causal_model(idx), rtol=0, atol=1e-6)
    torch.testing.assert_close(ref(idx, tril), causal_model(idx), rtol=1e-5, atol=1e-5)


def test_logits_at_gives_the_same_logits_as_the_full_head():
    for shift in (False, True):
        model = DLM(tiny(sink_tokens=1, logit_shift=shift))
        idx = torch.randint(0, 51, (3, 8))
        wanted = torch.tensor([[0, 0], [2, 5], [1, 7], [2, 0]])
        full = model(idx)
        torch.testing.assert_close(model(idx, logits_at=wanted), full[wanted[:, 0], wanted[:, 1]])


QUERY_ROWS = torch.tensor([[2, 3, 4, 5], [6, 4, 0, 1], [0, 1, 2, 3]])  # real positions of every row


@pytest.mark.parametrize("kw", ALL_VARIANTS, ids=_name)
@pytest.mark.parametrize("padded", [False, True])
def test_logits_at_equal_the_full_logits_gathered(kw, padded):
    model = DLM(tiny(**_options(kw))).eval()
    idx, am = torch.randint(0, 51, (3, 12)), _padding(padded)
    wanted = torch.tensor([[0, 0], [2, 2], [1, 6], [0, 11], [1, 0]])
    with torch.no_grad():
        full = model(idx, am)
        torch.testing.assert_close(model(idx, am, logits_at=wanted), full[wanted[:, 0], wanted[:, 1]],
                                   rtol=1e-5, atol=1e-6)
        if kw.get("sink_self_only", True):  # the KV-cache path: columns index the query rows
            kv = KVCache()
            model(idx, am, cache=kv)
            at = torch.tensor([[0, 1], [1, 0], [1, 3], [2, 2]])
            rows = QUERY_ROWS[at[:, 0], at[:, 1]]
            torch.testing.assert_close(model(idx, am, logits_at=at, cache=kv, query_index=QUERY_ROWS),
                                       full[at[:, 0], rows], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kw", SELF_ONLY_VARIANTS, ids=_name)
@pytest.mark.parametrize("padded", [False, True])
def test_kv_cache_forward_equals_the_full_forward(kw, padded):
    """Filling a KV cache is the full forward (same kernels: exact); recomputing some rows against
    the cache, with nothing changed since, gives those rows of the full forward."""
    model = DLM(tiny(**_options(kw))).eval()
    idx, am = torch.randint(0, 51, (3, 12)), _padding(padded)
    kv = KVCache()
    with torch.no_grad():
        full = model(idx, am)
        assert torch.equal(model(idx, am, cache=kv), full)
        cached = model(idx, am, cache=kv, query_index=QUERY_ROWS)
    torch.testing.assert_close(cached, full.gather(1, QUERY_ROWS[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


def test_kv_cache_rows_of_a_causal_model_see_their_own_mask_rows():
    model = DLM(tiny(sink_tokens=1, causal=True)).eval()
    idx = torch.randint(0, 51, (3, 12))
    kv = KVCache()
    with torch.no_grad():
        full = model(idx, cache=kv)
        cached = model(idx, cache=kv, query_index=QUERY_ROWS)
    torch.testing.assert_close(cached, full.gather(1, QUERY_ROWS[..., None].expand(-1, -1, full.shape[-1])),
                               rtol=1e-5, atol=1e-5)


def test_kv_cache_refuses_what_it_cannot_serve():
    idx = torch.randint(0, 51, (1, 6))
    with pytest.raises(ValueError, match="KVCache"):
        DLM(tiny())(idx, query_index=torch.tensor([[1, 2]]))
    with pytest.raises(ValueError, match="themselves"):
        DLM(tiny(sink_tokens=1, sink_self_only=False))(idx, cache=KVCache())


@pytest.mark.parametrize("kw", ALL_VARIANTS, ids=_name)
@pytest.mark.parametrize("padded", [False, True])
def test_observer_keys_equal_the_reference_paths(kw, padded, monkeypatch):
    """The keys the observer sees, [sinks; content] after RoPE, are those the dense-mask reference
    attends over (spliced [sinks; content] or [content; sinks]), read from its attention kernel."""
    fast, ref = _pair(**_options(kw))
    idx, am = torch.randint(0, 51, (3, 12)), _padding(padded)
    seen, ref_keys = {}, []
    sdpa = attention.sdpa
    monkeypatch.setattr(attention, "sdpa", lambda q, k, v, mask: ref_keys.append(
        attention.repeat_groups(k, v, q.shape[1])[0]) or sdpa(q, k, v, mask))  # the observer sees one per head
    with torch.no_grad():
        fast(idx, am, observer=lambda layer, probs, keys, values, n_sink: seen.update({layer: keys}))
        ref_keys.clear()  # the fast path's ablation sink calls the kernel too
        ref(idx, am)
    s, keep = kw.get("sink_tokens", 0), slice(None) if am is None else am.bool()
    for layer, keys in seen.items():
        spliced = ref_keys[layer]
        if s and kw["sink_position"] == "end":
            spliced = torch.cat([spliced[:, :, 12:], spliced[:, :, :12]], dim=2)
        assert keys.shape == spliced.shape == (3, 2, s + 12, 16)
        torch.testing.assert_close(keys[:, :, :s], spliced[:, :, :s], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(keys[:, :, s:].transpose(1, 2)[keep], spliced[:, :, s:].transpose(1, 2)[keep],
                                   rtol=1e-5, atol=1e-5)
