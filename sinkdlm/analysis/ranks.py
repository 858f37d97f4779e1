"""Ranks with ties: mid-ranks, the share of a reference set below a value, and Spearman's rho.

A trailing K axis indexes keys; leading axes are free. Ties get the mean of the ranks they span (the
mid-rank), so keys with equal values (every [MASK] key of layer 0 has the same value vector) rank
equally instead of in argsort's arbitrary order. O(K log K) per cell (one sort and running counts
over it), so long inputs cost no K x K comparison.
"""

from __future__ import annotations

import torch
from torch import Tensor


def share_below(values: Tensor, reference: Tensor) -> Tensor:
    """For every key, the share of the `reference` keys (bool, broadcast to `values`) whose value is
    lower, ties counted half: P(ref < v) + P(ref = v) / 2, the Mann-Whitney probability of one value
    against a set (0.5 = in the middle). NaN where a cell has no reference key."""
    x = values.float()
    ref = reference.expand_as(x).float()
    ordered, order = x.sort(-1)
    ref_sorted = ref.gather(-1, order)
    upto = ref_sorted.cumsum(-1)  # reference keys at or before each sorted position
    index = torch.arange(x.shape[-1]).expand_as(x)
    new = torch.ones_like(ordered, dtype=torch.bool)
    new[..., 1:] = ordered[..., 1:] != ordered[..., :-1]  # first key of a run of equal values
    last = torch.ones_like(new)
    last[..., :-1] = new[..., 1:]
    first_of_run = torch.where(new, index, 0).cummax(-1).values
    last_of_run = torch.where(last, index, x.shape[-1] - 1).flip(-1).cummin(-1).values.flip(-1)
    below = (upto - ref_sorted).gather(-1, first_of_run)  # reference keys before the run of equals
    at_most = upto.gather(-1, last_of_run)  # ... up to its end
    half_ties = torch.empty_like(x).scatter_(-1, order, (below + at_most) / 2)
    n = ref.sum(-1, keepdim=True)
    return torch.where(n > 0, half_ties / n.clamp(min=1), float("nan"))


def mid_rank(values: Tensor, valid: Tensor) -> Tensor:
    """Mid-rank of each key's value among the `valid` keys of its cell, scaled to [0, 1]
    (0 = lowest, 1 = highest; tied keys share the mean of their ranks); NaN for invalid keys and
    0.5 in a cell with one valid key."""
    n = valid.sum(-1, keepdim=True).float()
    rank = share_below(values, valid) * n - 0.5  # 0-based: below + (ties - 1) / 2
    scaled = torch.where(n > 1, rank / (n - 1).clamp(min=1), torch.full_like(rank, 0.5))
    return scaled.masked_fill(~valid, float("nan"))


def spearman(x: Tensor, y: Tensor, valid: Tensor) -> Tensor:
    """Spearman's rho of x and y over the `valid` keys of each cell (Pearson's r of their mid-ranks):
    (..., K) -> (...). NaN where fewer than 3 keys or one of the two is constant."""
    rx, ry = mid_rank(x, valid).nan_to_num(0.0), mid_rank(y, valid).nan_to_num(0.0)
    n = valid.sum(-1).float()
    w = valid.float()
    mx, my = (rx * w).sum(-1) / n.clamp(min=1), (ry * w).sum(-1) / n.clamp(min=1)
    dx, dy = (rx - mx[..., None]) * w, (ry - my[..., None]) * w
    cov, vx, vy = (dx * dy).sum(-1), (dx * dx).sum(-1), (dy * dy).sum(-1)
    defined = (n >= 3) & (vx > 0) & (vy > 0)
    return torch.where(defined, cov / (vx * vy).sqrt().clamp(min=torch.finfo(torch.float32).tiny), float("nan"))
