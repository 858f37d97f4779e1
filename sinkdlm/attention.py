"""Attention kernels behind one signature, and the masks the sink needs.

Shapes: q (B, H, Tq, D), k/v (B, G, Tk, D) with G dividing H (grouped-query attention: query head h
reads key/value head h // (H / G); G = H without grouping), mask bool broadcastable to (B, H, Tq, Tk),
True = may attend. `sdpa` keeps PyTorch's fused kernels (flash / memory-efficient when the mask is
None) and reads grouped keys/values in place (`enable_gqa`, torch >= 2.5; older torch repeats them);
`eager` materialises the probabilities for analysis.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

SDPA_GQA = tuple(int(part) for part in torch.__version__.split(".")[:2]) >= (2, 5)  # enable_gqa exists


def repeat_groups(k: Tensor, v: Tensor, heads: int) -> tuple[Tensor, Tensor]:
    """Grouped keys/values (B, G, T, D) -> one copy per query head (B, heads, T, D)."""
    rep = heads // k.shape[1]
    if rep == 1:
        return k, v
    return k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)


def sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> Tensor:
    if k.shape[1] == q.shape[1]:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    if SDPA_GQA:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    return F.scaled_dot_product_attention(q, *repeat_groups(k, v, q.shape[1]), attn_mask=mask)


def eager(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None) -> tuple[Tensor, Tensor]:
    """Attention and its probabilities (B, H, Tq, Tk); grouped keys/values are repeated per head."""
    k, v = repeat_groups(k, v, q.shape[1])
    scores = (q @ k.transpose(-2, -1)) / math.sqrt(q.shape[-1])
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    return probs @ v, probs


def content_mask(attention_mask: Tensor | None, causal: bool, t: int, device: torch.device) -> Tensor | None:
    """Which content keys each content query may see: (B|1, 1, T, T) bool, or None for 'all'.

    attention_mask is (B, T) with 1 = real token, or already a (B|1, 1, T, T) allowed-key matrix.
    """
    if attention_mask is not None and attention_mask.dim() == 4:
        square = attention_mask.bool()
        return square & torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None] if causal else square
    mask = None
    if causal:
        mask = torch.ones(t, t, dtype=torch.bool, device=device).tril()[None, None]
    if attention_mask is not None:
        keys = attention_mask.bool()[:, None, None, :]
        mask = keys if mask is None else mask & keys
    return mask


def row_lengths(mask: Tensor | None, t: int, device: torch.device) -> Tensor:
    """(B|1,) one past each row's last key that some query may see (its real length, padding
    excluded); t for every row without a mask."""
    if mask is None:
        return torch.full((1,), t, device=device)
    seen = mask.any(dim=-2)[:, 0]  # (B|1, T)
    return (seen * torch.arange(1, t + 1, device=device)).amax(dim=-1)


def query_rows(mask: Tensor | None, rows: Tensor | None) -> Tensor | None:
    """The rows of a content mask that belong to the queries being computed, (B, N) positions;
    a mask of keys only, (B|1, 1, 1, T), holds for every query as it is."""
    if mask is None or rows is None or mask.shape[-2] == 1:
        return mask
    t = mask.shape[-1]
    return mask.expand(rows.shape[0], 1, t, t).gather(2, rows[:, None, :, None].expand(-1, 1, -1, t))


def with_sink_columns(mask: Tensor | None, n_sink: int) -> Tensor | None:
    """Prepend n_sink always-visible key columns (the fast layout puts sink keys first)."""
    if mask is None or not n_sink:
        return mask
    ones = torch.ones(*mask.shape[:-1], n_sink, dtype=torch.bool, device=mask.device)
    return torch.cat([ones, mask], dim=-1)


def dense_sink_mask(cmask: Tensor | None, batch: int, t: int, n_sink: int, front: bool,
                    self_only: bool, device: torch.device) -> Tensor:
    """The paper code's (S+T)^2 mask over [sinks; content] (front) or [content; sinks] (end).

    Content sees the sinks and the content it may see; a sink sees only itself, or, in the
    `self_only=False` ablation, everything that is not padding.
    """
    c = torch.ones(batch, 1, t, t, dtype=torch.bool, device=device) if cmask is None else cmask.expand(batch, 1, t, t)
    keys_real = c.any(dim=-2, keepdim=True)  # (B,1,1,T): a key nobody may see is padding
    sink_rows_content = keys_real.expand(batch, 1, n_sink, t) if not self_only else \
        torch.zeros(batch, 1, n_sink, t, dtype=torch.bool, device=device)
    eye = torch.eye(n_sink, dtype=torch.bool, device=device)
    sink_rows_sinks = (eye if self_only else torch.ones_like(eye)).expand(batch, 1, n_sink, n_sink)
    content_rows_sinks = torch.ones(batch, 1, t, n_sink, dtype=torch.bool, device=device)
    if front:
        top = torch.cat([sink_rows_sinks, sink_rows_content], dim=-1)
        bottom = torch.cat([content_rows_sinks, c], dim=-1)
        return torch.cat([top, bottom], dim=-2)
    top = torch.cat([c, content_rows_sinks], dim=-1)
    bottom = torch.cat([sink_rows_content, sink_rows_sinks], dim=-1)
    return torch.cat([top, bottom], dim=-2)
