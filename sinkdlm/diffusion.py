"""The masked-diffusion maths as pure functions: noise levels, masking, and the ELBO losses.

Randomness is a pure function of (seed, step, sample index), never of a device's RNG state, so a
sample sees the same noise whatever the world size, micro-batch or resume point.
"""

from __future__ import annotations

import typing
from collections.abc import Sequence
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

TMode = Literal["uniform", "stratified", "antithetic"]  # how a batch draws its t (see draw_t)
T_MODES: tuple[str, ...] = typing.get_args(TMode)
NOISE_FLOOR = 1e-3  # eps of p = (1 - eps) t + eps in training (SMDM); the paper evaluates with 0
ANNEAL_STREAM = 2**32 + 3  # keeps annealing draws apart from the per-sample streams


def noise_level(t: Tensor, eps: float) -> Tensor:
    """Masking probability p = (1 - eps) t + eps, so no sequence is left fully clean."""
    return (1 - eps) * t + eps


def _rng(*keys: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in keys])


def draw_t(seed: int, step: int, indices: Sequence[int], batch: int, mode: str = "uniform") -> Tensor:
    """t in [0, 1) for the given global sample indices of a batch of `batch` sequences.

    uniform: independent per sample. stratified: (u + i / batch) mod 1 with one u per step.
    antithetic: sample i in the second half gets 1 - t of its twin in the first half.
    """
    if mode == "uniform":
        return torch.tensor([_rng(seed, step, i).random() for i in indices], dtype=torch.float64)
    if mode == "stratified":
        u = _rng(seed, step).random()
        return torch.tensor([(u + i / batch) % 1.0 for i in indices], dtype=torch.float64)
    if mode == "antithetic":
        half = (batch + 1) // 2
        base = [_rng(seed, step, i % half).random() for i in indices]
        return torch.tensor([b if i < half else 1.0 - b for i, b in zip(indices, base)], dtype=torch.float64)
    raise ValueError(f"t mode {mode!r} is not one of {T_MODES}")


def draw_uniforms(seed: int, step: int, indices: Sequence[int], length: int) -> Tensor:
    """Per-token uniforms (n, length) that decide which tokens are masked (mask if u < p)."""
    return torch.from_numpy(np.stack([_rng(seed, step, i, 1).random(length) for i in indices]))


def mask_tokens(x: Tensor, p: Tensor, uniforms: Tensor, mask_id: int,
                maskable: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Mask each token independently with its sequence's probability p (B,). Returns (noisy, masked)."""
    masked = uniforms.to(x.device) < p.to(x.device, torch.float64)[:, None]
    if maskable is not None:
        masked &= maskable.bool()
    return torch.where(masked, torch.full_like(x, mask_id), x), masked


def elbo_loss(logits: Tensor, targets: Tensor, masked: Tensor, p: Tensor, weights: Tensor) -> Tensor:
    """sum over masked tokens of weight * CE / p. `weights` (B, L) carries the normalisation."""
    ce = F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), reduction="none").view_as(targets)
    per_token = ce / p.to(ce.device, torch.float32)[:, None]
    return (per_token * masked * weights).sum()


def pretrain_weights(targets: Tensor) -> Tensor:
    """SMDM: divide by B * L (all tokens, masked or not)."""
    return torch.full(targets.shape, 1.0 / targets.numel(), device=targets.device)


def sft_weights(response_mask: Tensor) -> Tensor:
    """SFT: each sequence normalised by its number of response tokens, then averaged over the batch."""
    r = response_mask.float()
    lengths = r.sum(dim=1, keepdim=True).clamp(min=1)
    return r / lengths / r.shape[0]


def truncated_length(seed: int, step: int, length: int, prob: float) -> int:
    """SMDM's stochastic sequence length: with probability prob, a random length in [1, length]."""
    if prob <= 0:
        return length
    rng = _rng(seed, step, 2**31)
    return int(rng.integers(1, length + 1)) if rng.random() < prob else length


def annealed_mask(seed: int, step: int, length: int, frac: float) -> Tensor:
    """DiffuLLaMA's attention annealing: causal, plus each future key visible with probability frac.

    Returns a (1, 1, L, L) bool matrix (True = may attend); frac = 1 is full attention.
    """
    future = torch.from_numpy(_rng(seed, step, ANNEAL_STREAM).random((length, length)) < frac)
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    return (causal | future)[None, None]
