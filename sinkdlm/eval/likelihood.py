"""Likelihoods of a masked diffusion LM: pure functions of (model, token ids, settings).

A DLM has no exact log p(continuation | context); the paper (docs/paper.md, Evaluation) scores it two ways:
- `mc`: the ELBO. Mask each continuation token with probability p = (1 - eps) t + eps, t stratified
  over the MC batch ((u0 + i / n) mod 1); a sample scores sum over masked tokens of log p(token) / p;
  the estimate is the mean over samples, with its standard error.
- `chain_rule`: exact for the model's left-to-right conditionals: for every i, mask the continuation
  from i on and score token i (len(continuation) forwards).
Unsupervised classifier-free guidance (weight w): logits = un + (w + 1)(cond - un), the prompt fully masked in `un`.

Common random numbers: the pairs of one group (the choices of a question) share their t draws and
mask uniforms, so the differences between choices carry less noise than the estimates themselves.

Work is planned as rows (one noisy sequence and the positions it scores). The model is
deterministic, so MC samples with the same mask pattern share one row; rows are sorted by length
and run in padded batches of `batch_size` sequences.
"""

from __future__ import annotations

import contextlib
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from sinkdlm.diffusion import NOISE_FLOOR
from sinkdlm.fields import check_choices, setting

Estimator = Literal["mc", "chain_rule"]
Pair = tuple[Sequence[int], Sequence[int]]  # (context ids, continuation ids)


@dataclass(frozen=True)
class LikelihoodConfig:
    estimator: Estimator = setting("mc", "mc: Monte Carlo over masking levels; chain_rule: one token at a time")
    mc_num: int = setting(128, "MC samples per continuation (SMDM used 1024; LLaDA and Dream 128)", at_least=1)
    eps: float = setting(NOISE_FLOOR, "noise floor of p = (1 - eps) t + eps, as in training (the paper "
                                      "evaluates with 0)", at_least=0, below=1)
    guidance: float = setting(0.0, "unsupervised classifier-free guidance weight w; 0 = off", at_least=0)
    stratified: bool = setting(True, "t = (u0 + i / n) mod 1 rather than n independent draws")
    crn: bool = setting(True, "the pairs of one group share t draws and mask uniforms")
    seed: int = setting(1234, "seeds the MC noise levels and masks", at_least=0)
    batch_size: int = setting(64, "sequences per forward", at_least=1)
    dedupe: bool = setting(True, "one forward per distinct mask pattern (exact: the model is deterministic)")

    def __post_init__(self) -> None:
        check_choices(self, "")


@dataclass
class Estimate:
    loglik: float
    stderr: float  # standard error of the MC mean, i.i.d. formula (conservative when t is stratified); 0 for chain rule
    greedy: bool  # every continuation token is the argmax where it is scored with all later ones masked


@dataclass
class ForwardStats:
    forwards: int = 0
    rows: int = 0
    tokens: int = 0  # positions run through the model, padding included

    def add(self, ids: Tensor) -> None:
        self.forwards += 1
        self.rows += ids.shape[0]
        self.tokens += ids.numel()


@dataclass(frozen=True)
class Row:
    """One forward input: context + noisy continuation, and the positions (and clean ids) it scores."""

    ids: tuple[int, ...]
    prompt_len: int
    positions: tuple[int, ...]
    targets: tuple[int, ...]


@dataclass
class _PairPlan:
    rows: list[int]  # indices into the global row list, one per MC sample (-1 = nothing masked)
    p: np.ndarray = field(default_factory=lambda: np.ones(0))  # MC noise level per sample
    greedy_row: int = -1


# ---- random numbers -------------------------------------------------------------------------------


def stable_key(*parts: object) -> int:
    """A seed component that is the same in every process and run (unlike hash())."""
    return zlib.crc32(repr(parts).encode())


def draw_masks(seed: int, key: int, n: int, length: int, eps: float,
               stratified: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Noise levels p (n,) and masks (n, length) for n MC samples; a pure function of (seed, key)."""
    rng = np.random.default_rng([seed, key])
    t = (rng.random() + np.arange(n) / n) % 1.0 if stratified else rng.random(n)
    p = (1 - eps) * t + eps
    return p, rng.random((n, length)) < p[:, None]


# ---- rows ------------------------------------------------------------------------------------------


def masked_row(context: Sequence[int], continuation: Sequence[int], masked: Sequence[bool],
               mask_id: int) -> Row:
    """The continuation with `masked` tokens replaced by the mask id; scores the masked ones."""
    n = len(context)
    noisy = tuple(mask_id if m else tok for tok, m in zip(continuation, masked))
    positions = tuple(n + i for i, m in enumerate(masked) if m)
    targets = tuple(continuation[i] for i, m in enumerate(masked) if m)
    return Row(tuple(context) + noisy, n, positions, targets)


def chain_rows(context: Sequence[int], continuation: Sequence[int], mask_id: int) -> list[Row]:
    """Row i: continuation masked from i on, scoring token i."""
    n, length = len(context), len(continuation)
    return [Row(tuple(context) + tuple(continuation[:i]) + (mask_id,) * (length - i), n, (n + i,),
                (continuation[i],)) for i in range(length)]


def _model_context(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    sink_cache = getattr(model, "sink_cache", None)
    return sink_cache() if sink_cache is not None else contextlib.nullcontext()


def _forward(model: torch.nn.Module, ids: Tensor, attention: Tensor | None, positions: Tensor) -> Tensor:
    """Logits at `positions` only: (N, vocab)."""
    return model(ids, attention_mask=attention, logits_at=positions)


def _run_batch(model: torch.nn.Module, rows: list[Row], guidance: float,
               stats: ForwardStats | None) -> list[tuple[Tensor, Tensor]]:
    """Right-padded batch -> per row (log-probs of its targets, argmax == target)."""
    device, mask_id = next(model.parameters()).device, model.mask_id
    width = max(len(r.ids) for r in rows)
    ids = torch.full((len(rows), width), mask_id, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r.ids)] = torch.tensor(r.ids)
    attention = None
    if any(len(r.ids) < width for r in rows):  # None keeps SDPA's fused kernels
        attention = torch.tensor([[1] * len(r.ids) + [0] * (width - len(r.ids)) for r in rows])
    if guidance:
        uncond = ids.clone()
        for b, r in enumerate(rows):
            uncond[b, : r.prompt_len] = mask_id
        ids = torch.cat([ids, uncond])
        attention = None if attention is None else torch.cat([attention, attention])
    b_idx = torch.tensor([b for b, r in enumerate(rows) for _ in r.positions], dtype=torch.long)
    pos = torch.tensor([p for r in rows for p in r.positions], dtype=torch.long)
    targets = torch.tensor([t for r in rows for t in r.targets], dtype=torch.long)
    wanted = torch.stack([b_idx, pos], dim=1)
    if guidance:  # the unconditional copies sit after the conditional rows
        wanted = torch.cat([wanted, torch.stack([b_idx + len(rows), pos], dim=1)])
    attention = None if attention is None else attention.to(device)
    logits = _forward(model, ids.to(device), attention, wanted.to(device)).float()
    if stats is not None:
        stats.add(ids)
    picked = logits[: len(pos)]
    if guidance:
        un = logits[len(pos):]
        picked = un + (guidance + 1) * (picked - un)
    logp = picked.log_softmax(-1).cpu()
    chosen = logp.gather(1, targets[:, None])[:, 0]
    correct = logp.argmax(-1) == targets
    sizes = [len(r.positions) for r in rows]
    return list(zip(chosen.split(sizes), correct.split(sizes)))


def run_rows(model: torch.nn.Module, rows: list[Row], batch_size: int, guidance: float = 0.0,
             stats: ForwardStats | None = None) -> list[tuple[Tensor, Tensor]]:
    """Per row (log-probs of its targets, argmax == target), batching rows of similar length."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i].ids))
    out: list[tuple[Tensor, Tensor]] = [None] * len(rows)  # type: ignore[list-item]
    with torch.inference_mode(), _model_context(model):
        for start in range(0, len(order), batch_size):
            chunk = order[start: start + batch_size]
            for i, result in zip(chunk, _run_batch(model, [rows[i] for i in chunk], guidance, stats)):
                out[i] = result
    return out


# ---- estimators ------------------------------------------------------------------------------------


class _RowTable:
    """Rows gathered across pairs; identical rows share one index when deduplicating."""

    def __init__(self, dedupe: bool) -> None:
        self.rows: list[Row] = []
        self.index: dict[Row, int] | None = {} if dedupe else None

    def add(self, row: Row) -> int:
        if self.index is None:
            self.rows.append(row)
            return len(self.rows) - 1
        if row not in self.index:
            self.index[row] = len(self.rows)
            self.rows.append(row)
        return self.index[row]


def _plan_mc(table: _RowTable, pair: Pair, p: np.ndarray, masks: np.ndarray, mask_id: int) -> _PairPlan:
    context, continuation = pair
    if table.index is not None:  # only distinct patterns become rows
        patterns, inverse = np.unique(masks, axis=0, return_inverse=True)
    else:
        patterns, inverse = masks, np.arange(len(masks))
    pattern_rows = [table.add(masked_row(context, continuation, m, mask_id)) if m.any() else -1 for m in patterns]
    rows = [pattern_rows[i] for i in inverse.ravel()]
    everything = [True] * len(continuation)
    return _PairPlan(rows, p, table.add(masked_row(context, continuation, everything, mask_id)))


def _plan_group(table: _RowTable, group: Sequence[Pair], key: int, s: LikelihoodConfig, mask_id: int) -> list[_PairPlan]:
    if s.estimator == "chain_rule":
        return [_PairPlan([table.add(r) for r in chain_rows(c, x, mask_id)]) for c, x in group]
    longest = max(len(x) for _, x in group)
    plans = []
    for j, (context, continuation) in enumerate(group):
        pair_key = key if s.crn else stable_key(key, j)
        p, masks = draw_masks(s.seed, pair_key, s.mc_num, longest if s.crn else len(continuation), s.eps,
                              s.stratified)
        plans.append(_plan_mc(table, (context, continuation), p, masks[:, : len(continuation)], mask_id))
    return plans


def _combine(plan: _PairPlan, results: list[tuple[Tensor, Tensor]], estimator: str) -> Estimate:
    if not plan.rows:  # empty continuation
        return Estimate(0.0, 0.0, True)
    if estimator == "chain_rule":
        logp = torch.cat([results[i][0] for i in plan.rows])
        correct = torch.cat([results[i][1] for i in plan.rows])
        return Estimate(float(logp.double().sum()), 0.0, bool(correct.all()))
    sums = np.array([float(results[i][0].double().sum()) if i >= 0 else 0.0 for i in plan.rows])
    # with eps = 0 a draw of t = 0 masks nothing (sum 0): it scores 0, not 0 / 0
    scores = np.divide(sums, plan.p, out=np.zeros_like(sums), where=plan.p > 0)
    stderr = float(scores.std(ddof=1) / math.sqrt(len(scores))) if len(scores) > 1 else 0.0
    return Estimate(float(scores.mean()), stderr, bool(results[plan.greedy_row][1].all()))


def score_groups(model: torch.nn.Module, groups: Sequence[Sequence[Pair]], settings: LikelihoodConfig,
                 keys: Sequence[int] | None = None, stats: ForwardStats | None = None) -> list[list[Estimate]]:
    """One Estimate per (context, continuation) pair; a group's pairs share random numbers (CRN).

    `keys` seed each group (default: its token ids), so a question gets the same numbers whatever
    else is scored with it: same seed -> identical results.
    """
    keys = keys if keys is not None else [stable_key(*(tuple(c) + (-1,) + tuple(x) for c, x in g)) for g in groups]
    table = _RowTable(settings.dedupe)
    plans = [[] if not g else _plan_group(table, g, k, settings, model.mask_id) for g, k in zip(groups, keys)]
    results = run_rows(model, table.rows, settings.batch_size, settings.guidance, stats)
    return [[_combine(plan, results, settings.estimator) for plan in group] for group in plans]


def score_pairs(model: torch.nn.Module, pairs: Sequence[Pair], settings: LikelihoodConfig,
                stats: ForwardStats | None = None) -> list[Estimate]:
    """Each pair on its own (no shared random numbers between pairs)."""
    return [g[0] for g in score_groups(model, [[p] for p in pairs], settings, stats=stats)]


# ---- exact references (enumeration; tiny continuations only) --------------------------------------


def mask_weight(k: int, length: int, eps: float) -> float:
    """E_t[p^(k-1) (1-p)^(length-k)], p = (1-eps) t + eps, t ~ U(0,1): the ELBO weight of one k-mask.

    = 1/(1-eps) * integral_eps^1 p^(k-1) (1-p)^(length-k) dp, expanded with the binomial theorem.
    """
    total = sum(math.comb(length - k, j) * (-1) ** j * (1 - eps ** (k + j)) / (k + j) for j in range(length - k + 1))
    return total / (1 - eps)


def exact_elbo(model: torch.nn.Module, context: Sequence[int], continuation: Sequence[int],
               eps: float = NOISE_FLOOR, guidance: float = 0.0) -> float:
    """The expectation the MC estimator samples, by enumerating all 2^L - 1 non-empty masks."""
    length = len(continuation)
    masks = [[bool(bits >> i & 1) for i in range(length)] for bits in range(1, 2 ** length)]
    rows = [masked_row(context, continuation, m, model.mask_id) for m in masks]
    results = run_rows(model, rows, batch_size=len(rows), guidance=guidance)
    return sum(mask_weight(sum(m), length, eps) * float(logp.double().sum()) for m, (logp, _) in zip(masks, results))


def rolling_pairs(tokens: Sequence[int], max_len: int) -> list[Pair]:
    """Disjoint windows of max_len // 2 tokens, each conditioned on up to max_len // 2 tokens before it.

    The sum of the windows' ELBOs bounds log p(tokens) from below (chain rule over windows).
    """
    stride = max(1, max_len // 2)
    return [(tokens[max(0, start - (max_len - stride)): start], tokens[start: start + stride])
            for start in range(0, len(tokens), stride)]
