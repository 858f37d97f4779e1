"""Null models for the moving-sink metrics: what they read when nothing is pinned to a key.

(a) uniform attention, analytically: every query spreads its attention evenly over the valid keys
    (1/K each), so a head's most-attended key is a uniform draw, afresh at each step; the moving-sink
    metrics then have closed forms (stats.uniform_baselines), with no simulation noise.
(b) fixed text: the same model on held-out text at the trajectory's masking levels, each level with
    its own random mask (masked mode: no step's input is the previous one with tokens revealed).
    About half the tokens change between steps, against a few in the sampler.
(c) one-token reveal: the same model on held-out text masked where the trajectory's first step was,
    then at each step as many randomly chosen masked tokens revealed (with their true text) as the
    sampler revealed at that step (one per step when steps = gen_length). The input changes as in
    the sampler, but by reveals the model did not choose.
(b) and (c) are measured with the same code and sink rule as the recording they are the nulls of.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from sinkdlm.analysis.stats import MOVING_KEYS, Trajectory, uniform_baselines

NULL_NAMES = {"uniform_attention": "(a) uniform attention over the same keys (exact)",
              "fixed_text": "(b) the model on fixed text at the same masking levels (masked mode)",
              "one_token_reveal": "(c) the model on fixed text, revealing random masked tokens at the sampler's pace"}
REVEAL_STREAM = 2**32 + 7  # keeps the reveal order's draws apart from every other seeded stream


def uniform_attention(tr: Trajectory, mask_id: int) -> dict[str, float | None]:
    """The moving-sink metrics under uniform attention over `tr`'s valid keys, in closed form (None
    where uniform attention has no value: it makes no sinks to move)."""
    exact = uniform_baselines(tr, mask_id)
    return {key: exact.get(key) for key in MOVING_KEYS}


def masking_levels(tr: Trajectory, mask_id: int) -> list[float]:
    """Per step, the share of the real input tokens that are [MASK] (pooled over the sequences)."""
    masked = ((tr.tokens == mask_id) & tr.query_valid).sum(dim=(1, 2)).float()
    real = tr.query_valid.sum(dim=(1, 2)).float().clamp(min=1)
    return [float(max(m, 1) / r) for m, r in zip(masked, real)]  # a level must be > 0: at least one mask


def fixed_text_windows(windows: Tensor, tr: Trajectory) -> Tensor:
    """As many held-out windows as the trajectory has sequences, cut to its width."""
    batch, width = tr.tokens.shape[1:]
    return windows[:batch, :width]


def one_token_reveal_inputs(windows: Tensor, tr: Trajectory, mask_id: int, seed: int) -> Tensor:
    """(S, B, T) inputs of null (c): `windows` (B, T) masked where the trajectory's step 0 was, then per
    step and sequence as many of the still-masked positions revealed as the trajectory revealed there,
    chosen at random (per sequence and step from `seed`: a row's draws do not depend on its batch)."""
    steps, batch, width = tr.tokens.shape
    masked = (tr.tokens[0] == mask_id) & tr.query_valid[0]
    sampler_reveals = ((tr.tokens[:-1] == mask_id) & (tr.tokens[1:] != mask_id)).sum(-1)  # (S - 1, B)
    inputs = [torch.where(masked, mask_id, windows)]
    for step in range(1, steps):
        uniforms = torch.from_numpy(np.stack([np.random.default_rng([seed, step, row, REVEAL_STREAM]).random(width)
                                              for row in range(batch)]))
        order = uniforms.masked_fill(~masked, float("inf")).argsort(-1)  # still-masked positions first
        rank = order.argsort(-1)
        masked = masked & (rank >= sampler_reveals[step - 1][:, None])
        inputs.append(torch.where(masked, mask_id, windows))
    return torch.stack(inputs)
