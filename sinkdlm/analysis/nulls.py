"""Null models for the moving-sink metrics: what they read when nothing is pinned to a key.

(a) random attention: every real query's attention is drawn uniformly from the probability simplex
    over the same valid keys (Dirichlet(1, ..., 1)), independently at each step; no key stands out
    and a head's most-attended key moves at random.
(b) fixed text: the same model on held-out text at the trajectory's masking levels, each level with
    its own random mask (masked mode: no step's input is the previous one with tokens revealed), so
    the movement that the sampler causes by unmasking its own tokens is absent.
Each is measured with the same code and sink rule as the recording it is the null of.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor

from sinkdlm.analysis.stats import Trajectory

NULL_NAMES = {"random_attention": "(a) random attention over the same keys",
              "fixed_text": "(b) the model on fixed text at the same masking levels (masked mode)"}


def random_attention(tr: Trajectory, seed: int) -> Trajectory:
    """`tr` with its column sums replaced by those of random attention over the same valid keys
    (norms, tokens and masks kept)."""
    gen = torch.Generator().manual_seed(seed)
    n_layers, batch, heads, keys = tr.colsum.shape[1:]
    width = tr.query_valid.shape[-1]
    colsums = []
    for step in range(tr.n_steps):
        draws = torch.empty(n_layers, batch, heads, width, keys).exponential_(generator=gen)  # Dirichlet(1)
        draws = draws * tr.key_valid[step][None, :, None, None, :]
        probs = draws / draws.sum(-1, keepdim=True)
        colsums.append((probs * tr.query_valid[step][None, :, None, :, None]).sum(-2))
    return dataclasses.replace(tr, colsum=torch.stack(colsums), maps={}, outputs=None)


def masking_levels(tr: Trajectory, mask_id: int) -> list[float]:
    """Per step, the share of the real input tokens that are [MASK] (pooled over the sequences)."""
    masked = ((tr.tokens == mask_id) & tr.query_valid).sum(dim=(1, 2)).float()
    real = tr.query_valid.sum(dim=(1, 2)).float().clamp(min=1)
    return [float(max(m, 1) / r) for m, r in zip(masked, real)]  # a level must be > 0: at least one mask


def fixed_text_windows(windows: Tensor, tr: Trajectory) -> Tensor:
    """As many held-out windows as the trajectory has sequences, cut to its width."""
    batch, width = tr.tokens.shape[1:]
    return windows[:batch, :width]
