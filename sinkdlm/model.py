"""The Transformer: LLaMA-style, pre-norm, bidirectional, with optional sink tokens and gated attention.

Sink tokens (cfg.sink_tokens > 0) are learned vectors outside the vocabulary. Content tokens attend
to them; with cfg.sink_self_only each sink attends only to itself, so its hidden state, and hence
its keys (before RoPE) and values, in every layer are the same for every input. The fast path uses
that: the sink stream is run once per forward with batch size 1 (once per `sink_cache()` at
inference), and content queries attend, unmasked, over [sink keys; content keys]. Only the sink
keys' RoPE rotation depends on the input: end sinks sit right after each row's own last real token,
so a row's outputs do not depend on the padding of its batch. The reference path is the paper
code's: sinks spliced into the sequence with a dense (S+T)^2 mask; it is the test oracle. Sinks
are dropped before the final norm, so logits cover only the real tokens.

`DLM.forward` is the one forward of the network: training, likelihood scoring (logits only where
asked), the sampler's approximate KV caches (a `KVCache` and the rows being recomputed, `query_index`) and
analysis (an observer of each layer's attention) all run it.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from sinkdlm import attention
from sinkdlm.config import ModelConfig

Rope = tuple[Tensor, Tensor]  # cos, sin, broadcastable to (B, H, T, D)
KV = tuple[Tensor, Tensor]  # keys, values (B|1, G, T, D), G = key/value heads (cfg.kv_heads)
# observer(layer, probs (B, H, T, K), keys (B, H, K, D), values (B, H, K, D), n_sink): the K = S + T
# keys are [sinks; content], after RoPE (as attention scores them)
Observer = Callable[[int, Tensor, Tensor, Tensor, int], None]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).to(x.dtype) * self.weight


def rope_cache(positions: Tensor, dim: int, base: float) -> Rope:
    """cos/sin (..., dim) of positions (...) for rotate-halves RoPE over the full head dim."""
    inv_freq = 1.0 / base ** (torch.arange(0, dim, 2, device=positions.device).float() / dim)
    angles = positions.float()[..., None] * inv_freq
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return (x * cos + rotated * sin).to(x.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        h, g, d = cfg.n_head, cfg.kv_heads, cfg.head_size
        self.q = nn.Linear(cfg.n_embd, h * d, bias=cfg.qkv_bias)
        self.k = nn.Linear(cfg.n_embd, g * d, bias=cfg.qkv_bias)
        self.v = nn.Linear(cfg.n_embd, g * d, bias=cfg.qkv_bias)
        self.proj = nn.Linear(h * d, cfg.n_embd, bias=False)
        gate_out = {"none": 0, "elementwise": h * d, "headwise": h}[cfg.attn_gate]
        self.gate = nn.Linear(cfg.n_embd, gate_out, bias=False) if gate_out else None

    def _heads(self, linear: nn.Linear, x: Tensor) -> Tensor:
        b, t, _ = x.shape
        return linear(x).view(b, t, -1, self.cfg.head_size).transpose(1, 2)

    def qkv(self, x: Tensor, rope: Rope) -> tuple[Tensor, Tensor, Tensor]:
        """(B, T, E) -> q (B, H, T, D), k and v (B, G, T, D): grouped heads are not repeated (the
        attention kernels read them in place), so a KV cache holds G heads, not H."""
        return (apply_rope(self._heads(self.q, x), *rope), *self.kv(x, rope))

    def kv(self, x: Tensor, rope: Rope | None = None) -> KV:
        """Keys (rotated when `rope` is given) and values only: a self-only sink never uses its query."""
        k, v = self._heads(self.k, x), self._heads(self.v, x)
        return (k if rope is None else apply_rope(k, *rope)), v

    def out(self, y: Tensor, x: Tensor) -> Tensor:
        """(B, H, T, D) attention output -> gate (from the normed input x) -> output projection."""
        b, h, t, d = y.shape
        y = y.transpose(1, 2)  # (B, T, H, D)
        if self.gate is not None:
            g = torch.sigmoid(self.gate(x)).view(b, t, h, -1)  # last dim D (elementwise) or 1 (headwise)
            y = y * g
        return self.proj(y.reshape(b, t, h * d))

    def attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, observer: Observer | None,
               layer: int, n_sink: int) -> Tensor:
        if observer is None and self.cfg.attn_impl != "eager":
            return attention.sdpa(q, k, v, mask)
        y, probs = attention.eager(q, k, v, mask)
        if observer is not None:  # the observer sees one key/value head per query head
            observer(layer, probs, *attention.repeat_groups(k, v, q.shape[1]), n_sink)
        return y


class MLP(nn.Module):
    """SwiGLU."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.w_gate = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.w_up = nn.Linear(cfg.n_embd, cfg.intermediate_size, bias=False)
        self.w_down = nn.Linear(cfg.intermediate_size, cfg.n_embd, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w_down(F.silu(self.w_gate(x)) * self.w_up(x))


class KVCache:
    """Per layer the keys and values (B, G, W, D) (G key/value heads) of every position of the input: Fast-dLLM's
    approximate cache. A forward given the cache and no query_index fills it; one given query_index
    (B, N) recomputes only those, writes their new keys/values, and attends to the stored ones
    elsewhere (stale where a token has changed since they were stored)."""

    def __init__(self) -> None:
        self.layers: dict[int, KV] = {}

    def nbytes(self) -> int:
        """Bytes held: every layer's keys and values."""
        return sum(k.nbytes + v.nbytes for k, v in self.layers.values())

    def update(self, layer: int, k: Tensor, v: Tensor, query_index: Tensor | None) -> KV:
        """Store (query_index None) or overwrite the keys/values at query_index; return the whole layer's."""
        if query_index is None:
            self.layers[layer] = (k.clone(), v.clone())
            return k, v
        keys, values = self.layers[layer]
        where = query_index[:, None, :, None].expand(-1, k.shape[1], -1, k.shape[-1])
        keys.scatter_(2, where, k)
        values.scatter_(2, where, v)
        return keys, values


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, index: int) -> None:
        super().__init__()
        self.index = index
        self.cfg = cfg
        self.norm_attn = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.norm_mlp = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: Tensor, rope: Rope, mask: Tensor | None, sink_kv: KV | None = None,
                cache: KVCache | None = None, query_index: Tensor | None = None, observer: Observer | None = None,
                zero_value_at: Tensor | None = None) -> Tensor:
        """x (B, N, E): the rows computed (the reference layout splices the sinks in).

        sink_kv: this layer's sink keys (rotated) and values, (B|1, G, S, D), put before the content's.
        cache/query_index: the other positions' keys/values are read from the cache (see KVCache).
        """
        return self._layer(x, rope, mask, sink_kv, cache, query_index, observer, zero_value_at)[0]

    def _layer(self, x: Tensor, rope: Rope, mask: Tensor | None, sink_kv: KV | None, cache: KVCache | None,
               query_index: Tensor | None, observer: Observer | None, zero_value_at: Tensor | None) -> tuple[Tensor, KV]:
        """The layer's output and the keys/values its queries attended over."""
        h = self.norm_attn(x)
        q, k, v = self.attn.qkv(h, rope)
        if zero_value_at is not None:  # reference layout, zero-value sink
            v = v.masked_fill(zero_value_at[None, None, :, None], 0.0)
        if cache is not None:
            k, v = cache.update(self.index, k, v, query_index)
        n_sink = 0
        if sink_kv is not None:
            ks, vs = sink_kv
            n_sink, b = ks.shape[2], q.shape[0]
            k = torch.cat([ks.expand(b, -1, -1, -1), k], dim=2)
            v = torch.cat([vs.expand(b, -1, -1, -1), v], dim=2)
        y = self.attn.attend(q, k, v, mask, observer, self.index, n_sink)
        x = x + self.attn.out(y, h)
        return x + self.mlp(self.norm_mlp(x)), (k, v)

    def self_only_sink(self, sink: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """Sinks (1, S, E) that attend only to themselves through this layer: their keys before RoPE
        and values (1, G, S, D), and their residual stream leaving the layer. Attending to itself
        alone returns a sink's own value whatever its position, so nothing here depends on RoPE."""
        h = self.norm_attn(sink)
        k, v = self.attn.kv(h)
        if self.cfg.sink_zero_value:
            v = torch.zeros_like(v)
        own_value = attention.repeat_groups(k, v, self.cfg.n_head)[1]  # each query head reads its group's
        sink = sink + self.attn.out(own_value, h)
        return k, v, sink + self.mlp(self.norm_mlp(sink))

    def with_sink_seeing_all(self, x: Tensor, sink: Tensor, rope: Rope, sink_rope: Rope, mask: Tensor | None,
                             observer: Observer | None) -> tuple[Tensor, Tensor]:
        """The `sink_self_only=False` ablation: the sinks (B, S, E) are a residual stream whose
        queries see every key that is not padding, so they run beside the content, layer by layer."""
        hs = self.norm_attn(sink)
        qs, ks, vs = self.attn.qkv(hs, sink_rope)
        if self.cfg.sink_zero_value:
            vs = torch.zeros_like(vs)
        x, (keys, values) = self._layer(x, rope, mask, (ks, vs), None, None, observer, None)
        if self.index == self.cfg.n_layer - 1:  # no later layer reads the sink
            return x, sink
        keys_seen = None if mask is None else mask.any(dim=-2, keepdim=True)
        sink = sink + self.attn.out(attention.sdpa(qs, keys, values, keys_seen), hs)
        return x, sink + self.mlp(self.norm_mlp(sink))


class DLM(nn.Module):
    """Masked diffusion LM. forward(idx) -> logits (B, T, vocab_size) for the real tokens only."""

    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        vocab = cfg.require_vocab()
        self.wte = nn.Embedding(vocab + 1, cfg.n_embd)  # the extra row is the mask token
        self.sink = nn.Parameter(torch.zeros(cfg.sink_tokens, cfg.n_embd)) if cfg.sink_tokens else None
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layer))
        self.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.n_embd, vocab, bias=False)
        self._sink_kv: list[KV] | None = None  # within sink_cache(): [] until first computed
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """SMDM init: N(0, sqrt(2/(5E))); output projections N(0, 1/sqrt(E)/n_layer); biases 0."""
        e = self.cfg.n_embd
        std = math.sqrt(2.0 / (5 * e))
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif name.endswith(("attn.proj.weight", "mlp.w_down.weight")):
                nn.init.normal_(p, std=1 / math.sqrt(e) / self.cfg.n_layer)
            elif p.dim() >= 2 and name != "sink":
                nn.init.normal_(p, std=std)
        if self.sink is not None:
            if self.cfg.sink_init == "learned":
                nn.init.normal_(self.sink, std=std)
            else:
                nn.init.zeros_(self.sink)
        for m in self.modules():
            if isinstance(m, RMSNorm):
                nn.init.ones_(m.weight)

    @property
    def mask_id(self) -> int:
        return self.cfg.mask_id

    def positions(self, t: int, cmask: Tensor | None, device: torch.device) -> tuple[Tensor, Tensor]:
        """RoPE positions of the content (T,) and of the sinks (B|1, S) of a width-t input whose
        content mask is cmask. Front sinks come first; end sinks right after each row's last real
        token (the last key some query may see), so that they do not move with the padding of the
        batch a row is in. (A key hidden from every query, as the top-K masking intervention does,
        counts as padding here.)"""
        s = self.cfg.sink_tokens
        ar = torch.arange(t + s, device=device)
        if self.cfg.sink_position == "front":
            return ar[s:], ar[None, :s]
        return ar[:t], attention.row_lengths(cmask, t, device)[:, None] + ar[None, :s]

    def forward(self, idx: Tensor, attention_mask: Tensor | None = None, logits_at: Tensor | None = None,
                cache: KVCache | None = None, query_index: Tensor | None = None,
                observer: Observer | None = None) -> Tensor:
        """idx (B, W) token ids (mask id = vocab_size) -> logits (B, W, vocab).

        attention_mask: (B, W) with 1 = real, 0 = padding, or a (B|1, 1, W, W) bool matrix of the
        content keys each query may see.
        cache: a KVCache to fill, or with query_index (B, N) positions of idx, to read: only those
        positions are computed (needs self-only sinks), (B, N, vocab).
        logits_at: (N, 2) (row, column) pairs of the computed positions (columns of idx, or of
        query_index when given): only those logits are computed, (N, vocab) row by row (the LM head
        is a large share of the cost).
        observer: sees every layer's attention (see Observer); attention then runs eagerly.
        The fast layout serves the KV cache and the observer whatever attn_impl says.
        """
        if query_index is not None and (cache is None or self.cfg.logit_shift):
            raise ValueError("query_index needs a KVCache and an unshifted model")
        x = self.wte(idx if query_index is None else idx.gather(1, query_index))
        cmask = attention.content_mask(attention_mask, self.cfg.causal, idx.shape[1], idx.device)
        if self.cfg.sink_tokens and self.cfg.attn_impl == "reference" and observer is None and cache is None:
            x = self._run_reference(x, cmask)
        else:
            x = self._run_fast(x, idx.shape[1], cmask, cache, query_index, observer)
        return self._logits(x, logits_at)

    def _logits(self, x: Tensor, logits_at: Tensor | None) -> Tensor:
        if logits_at is not None:
            rows, cols = logits_at.unbind(-1)
            if self.cfg.logit_shift:
                cols = (cols - 1).clamp(min=0)
            return self.head(self.norm(x[rows, cols]))
        logits = self.head(self.norm(x))
        if self.cfg.logit_shift:  # the AR habit kept: hidden state i predicts token i+1
            logits = torch.cat([logits[:, :1], logits[:, :-1]], dim=1)
        return logits

    def head(self, x: Tensor) -> Tensor:
        if self.lm_head is None:
            return F.linear(x, self.wte.weight[: self.cfg.require_vocab()])
        return self.lm_head(x)

    def _rope(self, positions: Tensor) -> Rope:
        """cos/sin of positions (N,), or per row (B, N), broadcastable to (B, H, N, D)."""
        cos, sin = rope_cache(positions, self.cfg.head_size, self.cfg.rope_base)
        return (cos, sin) if positions.dim() == 1 else (cos[:, None], sin[:, None])

    def _run_fast(self, x: Tensor, w: int, cmask: Tensor | None, cache: KVCache | None, query_index: Tensor | None,
                  observer: Observer | None) -> Tensor:
        """Content rows x (B, N, E) of a width-w input; sinks as [sink keys; content keys]."""
        pos_c, pos_s = self.positions(w, cmask, x.device)
        rope, sink_rope = self._rope(pos_c if query_index is None else pos_c[query_index]), self._rope(pos_s)
        mask = attention.with_sink_columns(attention.query_rows(cmask, query_index), self.cfg.sink_tokens)
        if self.cfg.sink_tokens and not self.cfg.sink_self_only:
            if cache is not None:
                raise ValueError("a KV cache needs sinks that attend only to themselves")
            return self._run_sink_seeing_all(x, rope, sink_rope, mask, observer)
        sinks = [(apply_rope(k, *sink_rope), v) for k, v in self.sink_kv()] if self.cfg.sink_tokens else \
            [None] * self.cfg.n_layer
        for block, sink_kv in zip(self.blocks, sinks):
            x = block(x, rope, mask, sink_kv, cache, query_index, observer)
        return x

    def _run_sink_seeing_all(self, x: Tensor, rope: Rope, sink_rope: Rope, mask: Tensor | None,
                             observer: Observer | None) -> Tensor:
        sink = self.sink[None].expand(x.shape[0], -1, -1)
        for block in self.blocks:
            x, sink = block.with_sink_seeing_all(x, sink, rope, sink_rope, mask, observer)
        return x

    def _run_reference(self, x: Tensor, cmask: Tensor | None) -> Tensor:
        b, t, _ = x.shape
        s, front = self.cfg.sink_tokens, self.cfg.sink_position == "front"
        sinks = self.sink[None].expand(b, -1, -1)
        seq = torch.cat([sinks, x], 1) if front else torch.cat([x, sinks], 1)
        mask = attention.dense_sink_mask(cmask, b, t, s, front, self.cfg.sink_self_only, x.device)
        pos_c, pos_s = self.positions(t, cmask, x.device)
        pos_c = pos_c.expand(pos_s.shape[0], -1)
        rope = self._rope(torch.cat([pos_s, pos_c] if front else [pos_c, pos_s], dim=1))
        is_sink = torch.zeros(t + s, dtype=torch.bool, device=x.device)
        is_sink[slice(0, s) if front else slice(t, t + s)] = True
        zero_at = is_sink if self.cfg.sink_zero_value else None
        for block in self.blocks:
            seq = block(seq, rope, mask, zero_value_at=zero_at)
        return seq[:, s:] if front else seq[:, :t]

    # ---- the self-only sink's per-layer keys/values are constants of the model ----

    @contextlib.contextmanager
    def sink_cache(self) -> Iterator[None]:
        """Within this context (no grad, weights fixed) compute the sinks' keys/values once."""
        self._sink_kv = []
        try:
            yield
        finally:
            self._sink_kv = None

    def _self_only_sink_stream(self) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
        """Per layer: the self-only sinks' residual stream entering it (1, S, E), their keys before
        RoPE and their values (1, G, S, D)."""
        sink = self.sink[None]
        for block in self.blocks:
            k, v, leaving = block.self_only_sink(sink)
            yield sink, k, v
            sink = leaving

    def sink_kv(self) -> list[KV]:
        """Per layer the self-only sinks' (keys before RoPE, values), (1, G, S, D) each; computed
        once within sink_cache() when no gradient is needed."""
        if self._sink_kv is None or torch.is_grad_enabled():
            return [(k, v) for _, k, v in self._self_only_sink_stream()]
        if not self._sink_kv:
            self._sink_kv.extend((k, v) for _, k, v in self._self_only_sink_stream())
        return self._sink_kv

    def sink_hidden_states(self) -> list[Tensor]:
        """The self-only sink's residual stream entering each layer, (1, S, E) each."""
        return [sink for sink, _, _ in self._self_only_sink_stream()]


def count_params(model: nn.Module) -> dict[str, int]:
    """Total, SMDM's non-embedding count (no embedding, head, sinks or gates) and the gates'."""
    total = sum(p.numel() for p in model.parameters())
    gate = sum(p.numel() for n, p in model.named_parameters() if ".attn.gate." in n)
    non_emb = sum(p.numel() for n, p in model.named_parameters()
                  if not (n.startswith(("wte.", "lm_head.")) or n == "sink" or ".attn.gate." in n))
    return {"total": total, "non_embedding": non_emb, "gate": gate}
