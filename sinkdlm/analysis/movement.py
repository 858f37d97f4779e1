"""Does a head's most-attended key move, and is it the sampler's unmasking that moves it?

Event-locked change (per head, between consecutive steps s and s + 1): the top key "has an event"
when its position was [MASK] in step s's input and holds a token in step s + 1's (the sampler
revealed it). The measure is P(top key changes | event) - P(top key changes | no event), from
counts pooled over steps, sequences and heads. Under attention that ignores the input, both
probabilities are equal and the measure is 0; a sink that sits on a [MASK] and leaves when the
token is revealed makes it positive.

Cross-layer movement: whether the most-attended key (heads summed) of one recorded layer is that of
the next recorded layer, per step and sequence.

Uniform attention, analytically: a head's top key is then a uniform draw over its valid keys, drawn
afresh at each step, so two steps agree with probability |V_s & V_s+1| / (|V_s| |V_s+1|).
"""

from __future__ import annotations

import torch
from torch import Tensor


def revealed(tokens: Tensor, query_valid: Tensor, mask_id: int) -> Tensor:
    """(S, B, T) inputs -> (S - 1, B, T) bool: position masked at step s and not at step s + 1."""
    real = query_valid[:-1] & query_valid[1:]
    return (tokens[:-1] == mask_id) & (tokens[1:] != mask_id) & real


def event_counts(top: Tensor, events: Tensor, n_sink: int) -> tuple[Tensor, Tensor]:
    """top (S, L, B, H) key index, events (S - 1, B, T) -> (event, changed) bool, each (S - 1, L, B, H):
    whether step s's top key was revealed before step s + 1, and whether the top key changed."""
    before = top[:-1]
    position = (before - n_sink).clamp(min=0)  # dedicated sinks (index < n_sink) have no position
    steps, n_layers, batch, heads = before.shape
    per_head = events[:, None, :, None, :].expand(steps, n_layers, batch, heads, events.shape[-1])
    event = per_head.gather(-1, position[..., None])[..., 0] & (before >= n_sink)
    return event, top[1:] != before


def event_locked(top: Tensor, tokens: Tensor, query_valid: Tensor, mask_id: int, n_sink: int,
                 dims: tuple[int, ...]) -> dict[str, Tensor]:
    """P(change | event), P(change | no event) and their difference, pooled (counts) over `dims` of the
    (S - 1, L, B, H) step pairs; NaN where a class is empty."""
    if top.shape[0] < 2:
        nan = torch.full(_reduced(top.shape, dims), float("nan"))
        return {"event_change_rate": nan, "no_event_change_rate": nan, "event_locked_change": nan}
    event, changed = event_counts(top, revealed(tokens, query_valid, mask_id), n_sink)
    rates = {}
    for name, cls in (("event_change_rate", event), ("no_event_change_rate", ~event)):
        n = cls.float().sum(dims)
        rates[name] = torch.where(n > 0, (changed & cls).float().sum(dims) / n.clamp(min=1), float("nan"))
    return {**rates, "event_locked_change": rates["event_change_rate"] - rates["no_event_change_rate"]}


def _reduced(shape: torch.Size, dims: tuple[int, ...]) -> tuple[int, ...]:
    keep = [n for i, n in enumerate(shape) if i not in {d % len(shape) for d in dims}]
    return tuple(keep)


def same_as_next_layer(top_summed: Tensor) -> Tensor:
    """(S, L, B) top key per layer (heads summed) -> (L,) share of (step, sequence) where layer l's top
    key is layer l + 1's; NaN for the last recorded layer."""
    same = (top_summed[:, 1:] == top_summed[:, :-1]).float().mean(dim=(0, 2))
    return torch.cat([same, torch.full((1,), float("nan"))])


# ---- uniform attention, analytically --------------------------------------------------------------


def uniform_stability(valid: Tensor) -> Tensor:
    """(S, B, K) valid keys -> the expected share of consecutive steps whose uniform top key agrees,
    averaged over the sequences (a scalar)."""
    if valid.shape[0] < 2:
        return torch.tensor(float("nan"))
    both = (valid[1:] & valid[:-1]).sum(-1).float()
    n = valid.sum(-1).float().clamp(min=1)
    return (both / (n[1:] * n[:-1])).mean()


def uniform_distinct(valid: Tensor) -> Tensor:
    """(S, B, K) -> expected number of distinct keys among S independent uniform draws, averaged over
    the sequences: sum over keys of 1 - prod over steps of (1 - [key valid] / |V_s|)."""
    n = valid.sum(-1, keepdim=True).float().clamp(min=1)
    missed = (1 - valid.float() / n).prod(0)  # (B, K)
    return (1 - missed).sum(-1).mean()


def uniform_same_layer(valid: Tensor) -> Tensor:
    """(S, B, K) -> expected agreement of two layers' uniform top keys: mean of 1 / |V|."""
    return (1 / valid.sum(-1).float().clamp(min=1)).mean()
