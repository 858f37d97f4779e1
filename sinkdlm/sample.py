"""Reverse-diffusion sampling: start from masks, unmask a scheduled number of tokens per step.

One batch is a canvas (B, W): each row holds its prompt, then `gen_length` masks, then padding
(attention-masked). Right padding keeps every row's RoPE positions those of training; left padding
(LLaDA's layout) aligns the generated regions instead. The generated region is decoded in
semi-autoregressive blocks of `block_length`; within a block each step

1. predicts every masked position (x0 by Gumbel-max in float64 at `temperature`, after top-k/top-p),
2. scores the candidates by the remasking rule (low_confidence: p(x0); margin: p1 - p2;
   entropy: minus the entropy; random: uniform),
3. unmasks the ceil(remaining / steps_left) best candidates of each sequence (this is exactly LLaDA's
   get_num_transfer_tokens schedule: the remainder goes to the first steps), plus, with `threshold`,
   every candidate whose p(x0) exceeds it, or with `threshold_factor` F the n most confident with
   (n + 1)(1 - c_n) <= F (Fast-dLLM parallel decoding: the schedule stays the minimum, so nothing is
   left masked at the end of a block).

Randomness is per prompt: its draws are a function of (seed, its index in the whole input, step)
(`RowNoise`), so its completion does not depend on the batch size, its batch mates or their order.
The exceptions are batch-level by design: flattened_batch ranking, and left padding with front
sinks (its padding, and so its distance to the sinks, is set by the batch's longest prompt). The
same keying lets `generate(keep=...)` drop a prompt nobody waits for any more (a server's client
that left) from a running batch without changing the others' completions (LiveRows).

Caching. The sink's per-layer keys (before RoPE) and values are constants of the model:
`model.sink_cache()` computes them once. `cache="prefix"|"dual"` is Fast-dLLM's *approximate* KV
cache (a `model.KVCache`): at the start of each block one full forward stores every position's
per-layer K/V; later steps of the block recompute only the block and everything after it (prefix)
or only the block (dual), attending to the stored K/V of the rest. Stored K/V of positions decoded since the refresh are stale, so outputs can differ from full
recompute; Fast-dLLM reports < 1 point GSM8K accuracy loss on LLaDA. Measure it for your model with
benchmarks/bench_generate.py. The cache is also refreshed every `cache_refresh` steps of a block, and
with `cache_refresh_tokens` N a row's once N of its tokens were committed since its last refresh
(a staleness trigger: threshold decoding commits many tokens in some steps and few in others).

Windowed decoding (`window=W`, sinkdlm.window): each block is decoded on a canvas of its own holding
the row's first `window_anchors` tokens, its last W committed tokens and the block, re-indexed from
position 0; older keys and the masks after the block are not attended, so memory and time per step
are flat in the length. A window covering everything equals full decoding without lookahead (and,
with one block, full decoding exactly).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from sinkdlm import diffusion
from sinkdlm.errors import UserError
from sinkdlm.fields import check_choices, setting
from sinkdlm.model import DLM, KVCache
from sinkdlm.window import window_canvas

UNIFORM_FLOOR = 1e-300  # keeps -log(-log u) finite in float64
SEED_RANGE = 2**53  # a float64 uniform's bits, turned into a generator seed
DEFAULT_BATCH = 8  # prompts per forward; completions do not depend on it

StepCallback = Callable[[int, Tensor], None]
KeepRows = Callable[[], Sequence[bool]]  # per row of the batch: still wanted? asked before every step


@dataclass
class SampleConfig:
    """Decoding settings; `sinkdlm generate` and `eval-gsm8k` build their options from these fields."""

    gen_length: int = setting(64, "new tokens per prompt (with length_includes_prompt: the total)", at_least=1)
    steps: int = setting(64, "denoising steps over the whole generation, split evenly over the blocks",
                         at_least=1)
    block_length: int | None = setting(None, "semi-autoregressive block length, dividing gen_length",
                                       unset="one block", at_least=1)
    temperature: float = setting(0.0, "Gumbel-max temperature; 0 = argmax", at_least=0)
    top_k: int = setting(0, "sample among the K most likely tokens only; 0 = off", at_least=0)
    top_p: float = setting(1.0, "sample among the most likely tokens of total probability P only; 1 = off",
                          above=0, at_most=1)
    remasking: Literal["low_confidence", "random", "margin", "entropy"] = setting(
        "low_confidence", "which masked positions to unmask first: highest p(x0), random, largest margin "
                          "p1 - p2, or lowest entropy")
    guidance: float = setting(0.0, "unsupervised classifier-free guidance weight w: logits = un + (w + 1)"
                                   "(cond - un), the prompt masked for un; 0 = off", at_least=0)
    threshold: float | None = setting(None, "also unmask every candidate with p(x0) above this (Fast-dLLM "
                                            "parallel decoding)", unset="off", above=0, at_most=1)
    threshold_factor: float | None = setting(
        None, "also unmask a row's n most confident candidates, n the largest with (n + 1)(1 - c_n) <= F, c_n the "
              "n-th highest p(x0) (Fast-dLLM's factor-based parallel decoding; not with threshold)",
        unset="off", above=0)
    eos: Literal["stop", "fill"] = setting("stop", "stop: cut the output at the first EOS; fill: put EOS "
                                                   "after the first EOS at once")
    suppress_eos_steps: int = setting(0, "forbid EOS during the first N denoising steps", at_least=0)
    min_length: int = setting(0, "forbid EOS in the first N generated positions", at_least=0)
    batch_ranking: Literal["per_sequence", "flattened_batch"] = setting(
        "per_sequence", "flattened_batch: rank candidates over the whole batch, as SMDM's GSM8K script "
                        "(the only setting under which a row's output depends on its batch mates)")
    cache: Literal["none", "prefix", "dual"] = setting(
        "none", "approximate KV cache (Fast-dLLM): prefix recomputes the block and what follows it, dual "
                "the block only")
    cache_refresh: int = setting(0, "with cache=prefix|dual: also recompute every position (refreshing the stale "
                                    "cache) every N steps of a block; 0 = at the block's start only", at_least=0)
    cache_refresh_tokens: int = setting(
        0, "with cache=prefix|dual: also recompute a row's every position once N of its block's tokens have been "
           "committed since its last refresh (a step may commit many under threshold decoding); 0 = off",
        at_least=0)
    padding: Literal["right", "left"] = setting(
        "right", "where a shorter prompt's padding goes; left aligns the generated regions (LLaDA), which "
                 "makes front sinks' distance to a row's content depend on its batch")
    length_includes_prompt: bool = setting(False, "gen_length counts the prompt too (SMDM's context_length)")
    window: int | None = setting(None, "sink-pinned windowed decoding: a block attends to the sinks, the last W "
                                       "committed tokens and itself only (older keys evicted, nothing after the "
                                       "block), so memory is O(W + block) at any length", unset="full attention",
                                 at_least=0)
    window_anchors: int = setting(0, "with window: also keep each row's first K tokens (StreamingLLM's "
                                     "pseudo-sinks, for a model without sinks)", at_least=0)
    seed: int = setting(0, "a prompt's draws are a function of (seed, its index, step)", at_least=0)

    def __post_init__(self) -> None:
        check_choices(self, "sampling ")
        if self.gen_length <= 0 or self.steps <= 0:
            raise UserError(f"gen_length={self.gen_length} and steps={self.steps} must both be > 0")
        block = self.block_length or self.gen_length
        if block <= 0 or self.gen_length % block:
            raise UserError(f"block_length={self.block_length} must be > 0 and divide gen_length={self.gen_length}")
        if self.steps % (self.gen_length // block):
            raise UserError(f"steps={self.steps} must be a multiple of the number of blocks "
                            f"({self.gen_length // block} = gen_length / block_length)")
        if self.length_includes_prompt and self.block_length not in (None, self.gen_length):
            raise UserError("length_includes_prompt works with one block only; unset block_length")
        if self.steps > self.gen_length:  # a step unmasks at least one token: the rest would not run
            raise UserError(f"steps={self.steps} is more than gen_length={self.gen_length}, the most steps that "
                            f"can run (one token each); pass steps <= {self.gen_length} or a larger gen_length")
        if self.temperature < 0 or not 0 < self.top_p <= 1 or self.top_k < 0:
            raise UserError(f"need temperature >= 0, 0 < top_p <= 1, top_k >= 0 "
                            f"(got {self.temperature}, {self.top_p}, {self.top_k})")
        if self.threshold is not None and not 0 < self.threshold <= 1:
            raise UserError(f"threshold={self.threshold} must be in (0, 1] (or None = off)")
        if self.threshold is not None and self.threshold_factor is not None:
            raise UserError(f"threshold={self.threshold} and threshold_factor={self.threshold_factor} are two rules "
                            f"for the same choice; set one of them")
        self._check_window()

    def _check_window(self) -> None:
        if self.window is None:
            if self.window_anchors:
                raise UserError(f"window_anchors={self.window_anchors} needs a window; pass window=W too")
            return
        if self.window < 0 or self.window_anchors < 0:
            raise UserError(f"window={self.window} and window_anchors={self.window_anchors} must be >= 0")
        if self.padding == "left":
            raise UserError("window works with padding=right (a window holds only its row's own tokens); "
                            "drop padding=left")

    @property
    def n_blocks(self) -> int:
        return self.gen_length // (self.block_length or self.gen_length)

    def attended_length(self, prompt: int, generated: int) -> int:
        """The most tokens one forward takes for a prompt: all of them, or with a window its
        anchors, the window and a block."""
        if self.window is None:
            return prompt + generated
        block = self.block_length or generated
        return min(prompt + generated, self.window_anchors + self.window + block)

    def replace(self, **changes) -> SampleConfig:
        return dataclasses.replace(self, **changes)


SAMPLING_FIELDS = tuple(f.name for f in dataclasses.fields(SampleConfig))  # what `--sampling k=v` may set


# ---------------------------------------------------------------------------------------------
# the canvas


@dataclass
class Canvas:
    x: Tensor  # (B, W) tokens; mask id where not yet decoded
    valid: Tensor  # (B, W) bool, False = padding
    is_prompt: Tensor  # (B, W) bool
    start: Tensor  # (B,) first generated position
    end: Tensor  # (B,) one past the last generated position

    def select(self, rows: Tensor) -> Canvas:
        """The canvas of `rows` (positions into this one's rows) only."""
        return Canvas(*(getattr(self, f.name)[rows] for f in dataclasses.fields(self)))


def build_canvas(prompts: list[list[int]], gen_lengths: list[int], padding: str, mask_id: int,
                 pad_id: int, device: torch.device) -> Canvas:
    lengths = [len(p) for p in prompts]
    width = max(p + g for p, g in zip(lengths, gen_lengths)) if padding == "right" else \
        max(lengths) + max(gen_lengths)
    b = len(prompts)
    x = torch.full((b, width), pad_id, dtype=torch.long)
    valid = torch.zeros(b, width, dtype=torch.bool)
    is_prompt = torch.zeros(b, width, dtype=torch.bool)
    start = torch.zeros(b, dtype=torch.long)
    for i, (prompt, g) in enumerate(zip(prompts, gen_lengths)):
        offset = 0 if padding == "right" else max(lengths) - len(prompt)
        p_end = offset + len(prompt)
        x[i, offset:p_end] = torch.tensor(prompt)
        x[i, p_end:p_end + g] = mask_id
        valid[i, offset:p_end + g] = True
        is_prompt[i, offset:p_end] = True
        start[i] = p_end
    end = start + torch.tensor(gen_lengths)
    return Canvas(x.to(device), valid.to(device), is_prompt.to(device), start.to(device), end.to(device))


def validate_prompts(prompts: list[list[int]], cfg: SampleConfig, block_size: int,
                     labels: Sequence[str] | None = None) -> list[int]:
    """Per-sequence numbers of new tokens; UserError for prompts that cannot be generated from, naming
    each by its label (default: "prompt i", i its index in `prompts`)."""
    if not prompts:
        raise UserError("no prompts given; pass at least one")
    gens = []
    for i, p in enumerate(prompts):
        label = labels[i] if labels is not None else f"prompt {i}"
        if not p:
            raise UserError(f"{label} is empty; give at least one token of prompt")
        g = cfg.gen_length - len(p) if cfg.length_includes_prompt else cfg.gen_length
        total = len(p) + max(g, 0)
        if cfg.attended_length(len(p), max(g, 0)) > block_size:
            if cfg.window is not None:
                raise UserError(f"window_anchors {cfg.window_anchors} + window {cfg.window} + block "
                                f"{cfg.block_length or g} tokens are more than the model's block_size {block_size}; "
                                f"pass a smaller window or block_length")
            raise UserError(f"{label}: {len(p)} prompt tokens + {g} to generate = {total} tokens, more than the "
                            f"model's block_size {block_size}; shorten the prompt or gen_length")
        gens.append(max(g, 0))
    return gens


# ---------------------------------------------------------------------------------------------
# one step: propose tokens, score them, pick which to keep


def filter_logits(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then nucleus filtering; removed entries become -inf."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the first token past top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class RowNoise:
    """One step's random numbers, row by row. Row i draws from its own generators, seeded from
    (seed, step, indices[i]) by sinkdlm.diffusion.draw_uniforms, the mechanism that gives training
    its per-example noise: a prompt's draws depend on its index in the whole input, never on its
    batch mates, their number or their order. Each kind of draw has its own stream."""

    GUMBEL, REMASK, STREAMS = 0, 1, 2

    def __init__(self, seed: int, step: int, indices: Sequence[int], counts: Tensor) -> None:
        self.seed, self.step, self.indices = seed, step, indices
        self.counts, self.device = counts.tolist(), counts.device

    def uniforms(self, stream: int, width: int) -> Tensor:
        """(sum(counts), width) float64 uniforms: counts[i] rows from row i's generator."""
        seeds = diffusion.draw_uniforms(self.seed, self.step, self.indices, self.STREAMS)[:, stream] * SEED_RANGE
        return torch.cat([
            torch.rand((n, width), generator=torch.Generator(self.device).manual_seed(int(seed)),
                       device=self.device, dtype=torch.float64)
            for seed, n in zip(seeds.tolist(), self.counts)])


def gumbel_argmax(logits: Tensor, temperature: float, uniforms: Tensor) -> Tensor:
    """argmax(logits / T + Gumbel) in float64.

    Why float64: in float32 the uniforms' grid truncates the Gumbel tail (-log(-log u) <= ~16.6 short
    of u = 1), so low-probability tokens are drawn too rarely, which lowers the temperature in effect:
    Zheng et al., "Masked diffusion models are secretly time-agnostic masked models and exploit
    inaccurate categorical sampling" (arXiv 2409.02908) show that this float32 artefact measurably
    lowers generative perplexity (and diversity) of MDM samples; LLaDA's generate() draws in float64
    for the same reason. RowNoise.uniforms draws float64 and propose() casts the logits first."""
    gumbel = -torch.log(-torch.log(uniforms.clamp(min=UNIFORM_FLOOR)))
    return (logits / temperature + gumbel).argmax(-1)


def propose(logits: Tensor, cfg: SampleConfig, noise: RowNoise) -> tuple[Tensor, Tensor, Tensor]:
    """logits (n, V) of the still-masked positions of a step, row by row -> x0, confidence p(x0),
    ranking score, each (n,); float64. Gumbel (and random-remasking) draws are per masked position."""
    logits = filter_logits(logits.double(), cfg.top_k, cfg.top_p)
    x0 = logits.argmax(-1) if cfg.temperature == 0 else \
        gumbel_argmax(logits, cfg.temperature, noise.uniforms(RowNoise.GUMBEL, logits.shape[-1]))
    probs = logits.softmax(-1)
    confidence = probs.gather(-1, x0[..., None]).squeeze(-1)
    if cfg.remasking == "low_confidence":
        score = confidence
    elif cfg.remasking == "margin":
        top2 = probs.topk(2, dim=-1).values
        score = top2[..., 0] - top2[..., 1]
    elif cfg.remasking == "entropy":
        score = torch.xlogy(probs, probs).sum(-1)  # minus the entropy: sure predictions first
    else:
        score = noise.uniforms(RowNoise.REMASK, 1)[:, 0]
    return x0, confidence, score


def select(score: Tensor, candidate: Tensor, n: Tensor, ranking: str) -> Tensor:
    """Boolean (B, N): the n[i] best-scoring candidates of each row, or with flattened_batch the n
    (a scalar: the batch's scheduled total) best of the whole batch, as SMDM's GSM8K script ranks:
    the one rule under which a row's output depends on its batch mates."""
    score = score.masked_fill(~candidate, float("-inf"))
    if ranking == "flattened_batch":
        total = int(n.sum())
        chosen = torch.zeros(score.numel(), dtype=torch.bool, device=score.device)
        chosen[score.flatten().topk(total).indices] = True
        return chosen.view_as(score) & candidate
    order = score.sort(dim=1, descending=True, stable=True).indices
    rank = order.argsort(dim=1)
    return (rank < n[:, None]) & candidate


def factor_count(confidence: Tensor, candidate: Tensor, factor: float) -> Tensor:
    """(B,): per row, Fast-dLLM's factor rule (Wu et al. 2025, arXiv 2505.22618; `get_transfer_index_dynamic`
    in NVlabs/Fast-dLLM's llada/generate.py): with c_1 >= c_2 >= ... the row's candidates' confidences, the
    largest n with (n + 1)(1 - c_n) <= factor, at least 1 (0 for a row without candidates). Since c_n falls
    with n, (n + 1)(1 - c_n) rises: the rule holds for a prefix of the sorted candidates, and n is its length.

    Where Fast-dLLM's code differs: when every candidate but the last passes, it commits the last too
    (its loop cannot tell "the last failed" from "none failed"); here the last stays masked, as the rule says.
    Like theirs, a confidence equal to the bound 1 - factor / (n + 1) passes."""
    c = confidence.masked_fill(~candidate, float("-inf")).sort(dim=1, descending=True).values
    n = torch.arange(1, c.shape[1] + 1, device=c.device, dtype=c.dtype)
    passes = c >= 1 - factor / (n + 1)
    passes[:, 0] = True  # the most confident is always committed
    return torch.minimum(passes.long().cumprod(1).sum(1), candidate.sum(1))


def parallel_choice(confidence: Tensor, candidate: Tensor, cfg: SampleConfig) -> Tensor:
    """Boolean (B, N): the candidates Fast-dLLM's parallel decoding adds to the schedule's, by p(x0) whatever the
    remasking rule: those above `threshold`, or each row's factor_count most confident. The schedule stays
    the minimum (Fast-dLLM drops it and loops until the block is done), so no block ends with masks."""
    if cfg.threshold is not None:
        return candidate & (confidence > cfg.threshold)
    if cfg.threshold_factor is not None:
        return select(confidence, candidate, factor_count(confidence, candidate, cfg.threshold_factor), "per_sequence")
    return torch.zeros_like(candidate)


def scheduled_count(remaining: Tensor, steps_left: int) -> Tensor:
    """ceil(remaining / steps_left): equals LLaDA's precomputed schedule (remainder first)."""
    return (remaining + steps_left - 1) // steps_left


# ---------------------------------------------------------------------------------------------
# forward passes: full recompute, or Fast-dLLM's approximate KV cache


class Forward:
    """The model as the sampler sees it: logits at a block's positions, with guidance and caching.

    With guidance (guidance > 0) every forward runs the conditional rows and, below them, the same rows
    with the prompt masked; with a KV cache both halves keep their own stored K/V.
    """

    def __init__(self, model: DLM, canvas: Canvas, cfg: SampleConfig) -> None:
        self.model, self.cfg = model, cfg
        self.guided = cfg.guidance > 0
        valid = None if bool(canvas.valid.all()) else canvas.valid
        self.valid = valid.repeat(2, 1) if valid is not None and self.guided else valid
        self.is_prompt = canvas.is_prompt
        self.canvas_valid = canvas.valid
        self.cache = KVCache()
        self.calls = 0
        self.full_calls = 0  # calls that computed every position (without a cache: all of them)
        self.peak_cache_bytes = 0  # the most the KV cache held after any forward
        self.widest = 0  # the widest input the model saw

    def __call__(self, x: Tensor, window: Tensor, queries: Tensor, refresh: bool | Tensor, wanted: Tensor) -> Tensor:
        """Logits (n, V) at the `wanted` (B, Bl) window positions, row-major: the LM head runs there
        only. queries: the cached path's recomputed positions (window first). refresh: recompute every
        position and store its K/V, for every row (True), none (False), or the rows a (B,) bool marks."""
        self.widest = max(self.widest, x.shape[1])
        if self.guided:
            x = torch.cat([x, x.masked_fill(self.is_prompt, self.model.mask_id)])
            window, queries, wanted = window.repeat(2, 1), queries.repeat(2, 1), wanted.repeat(2, 1)
            refresh = refresh.repeat(2) if isinstance(refresh, Tensor) else refresh
        logits = self._logits(x, window, queries, refresh, wanted)
        self.peak_cache_bytes = max(self.peak_cache_bytes, self.cache.nbytes())
        if not self.guided:
            return logits
        cond, uncond = logits.chunk(2)  # both halves want the same number of positions
        return uncond + (self.cfg.guidance + 1) * (cond - uncond)

    def select(self, rows: Tensor) -> None:
        """Keep only `rows` (positions into the current rows): their padding mask, prompt mask and
        stored K/V (guidance's unconditional half too), so later forwards compute those rows alone."""
        both = torch.cat([rows, rows + self.is_prompt.shape[0]]) if self.guided else rows
        self.canvas_valid, self.is_prompt = self.canvas_valid[rows], self.is_prompt[rows]
        valid = None if bool(self.canvas_valid.all()) else self.canvas_valid
        self.valid = valid.repeat(2, 1) if valid is not None and self.guided else valid
        self.cache.layers = {layer: (k[both], v[both]) for layer, (k, v) in self.cache.layers.items()}

    def _logits(self, x: Tensor, window: Tensor, queries: Tensor, refresh: bool | Tensor, wanted: Tensor) -> Tensor:
        if self.cfg.cache == "none":
            return self._full(x, window, wanted, self.valid, None)
        if isinstance(refresh, Tensor):
            return self._some_refreshed(x, window, queries, refresh, wanted)
        if not refresh:
            return self._cached(x, queries, wanted, self.valid, self.cache)
        self.cache = KVCache()
        return self._full(x, window, wanted, self.valid, self.cache)

    def _full(self, x: Tensor, window: Tensor, wanted: Tensor, valid: Tensor | None, cache: KVCache | None) -> Tensor:
        """Every position computed (and stored in `cache` when given)."""
        self.calls += 1
        self.full_calls += 1
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(window)
        at = torch.stack([rows[wanted], window[wanted]], dim=1)
        return self.model(x, attention_mask=valid, logits_at=at, cache=cache)

    def _cached(self, x: Tensor, queries: Tensor, wanted: Tensor, valid: Tensor | None, cache: KVCache) -> Tensor:
        """Only `queries` computed; the other positions' K/V read from `cache` (window = queries' first columns)."""
        self.calls += 1
        return self.model(x, attention_mask=valid, logits_at=wanted.nonzero(), cache=cache, query_index=queries)

    def _some_refreshed(self, x: Tensor, window: Tensor, queries: Tensor, refresh: Tensor, wanted: Tensor) -> Tensor:
        """The `refresh` rows recompute every position, the others read the cache: one forward for
        each, on its rows only, so a row's logits never depend on which of its batch mates refresh."""
        fresh, stale = refresh.nonzero().squeeze(1), (~refresh).nonzero().squeeze(1)
        valid = (None, None) if self.valid is None else (self.valid[fresh], self.valid[stale])
        renewed, kept = KVCache(), KVCache()
        kept.layers = {layer: (k[stale], v[stale]) for layer, (k, v) in self.cache.layers.items()}
        fresh_logits = self._full(x[fresh], window[fresh], wanted[fresh], valid[0], renewed)
        stale_logits = self._cached(x[stale], queries[stale], wanted[stale], valid[1], kept)
        for layer, (k, v) in self.cache.layers.items():
            for rows, part in ((fresh, renewed), (stale, kept)):
                k[rows], v[rows] = part.layers[layer]
        by_row = refresh[wanted.nonzero()[:, 0]]  # each wanted position's row: refreshed?
        logits = fresh_logits.new_empty(len(by_row), fresh_logits.shape[-1])
        logits[by_row], logits[~by_row] = fresh_logits, stale_logits
        return logits


# ---------------------------------------------------------------------------------------------
# the sampler


CACHE_NEEDS = "a bidirectional, unshifted model whose sinks attend only to themselves"


def caches_work(model: DLM) -> bool:
    """Whether cache=prefix|dual reproduce this model's forward (CACHE_NEEDS)."""
    cfg = model.cfg
    return not (cfg.causal or cfg.logit_shift or (cfg.sink_tokens and not cfg.sink_self_only))


def _check_model(model: DLM, cfg: SampleConfig) -> None:
    if cfg.cache != "none" and not caches_work(model):
        raise UserError(f"cache=prefix|dual needs {CACHE_NEEDS}; use cache=none for this checkpoint")


def _suppress_eos(logits: Tensor, offset: Tensor, step: int, cfg: SampleConfig, eos_id: int) -> Tensor:
    """logits (n, V) at generated positions `offset` (n,) from their sequence's start."""
    early = offset < cfg.min_length
    if step < cfg.suppress_eos_steps:
        early = torch.ones_like(early)
    if early.any():
        logits = logits.clone()
        logits[:, eos_id] = logits[:, eos_id].masked_fill(early, float("-inf"))
    return logits


def _fill_after_eos(x: Tensor, canvas: Canvas, eos_id: int, mask_id: int) -> Tensor:
    pos = torch.arange(x.shape[1], device=x.device)
    region = (pos >= canvas.start[:, None]) & (pos < canvas.end[:, None])
    after_eos = ((x == eos_id) & region).cumsum(1) > 0
    return x.masked_fill(after_eos & region & (x == mask_id), eos_id)


class LiveRows:
    """The rows of a batch still being decoded. `keep()` (one bool per row of the whole batch) is asked
    before every step; a row it no longer wants is dropped from the computation for good, its canvas
    frozen as it was. The other rows' outputs do not change: their noise is keyed by their indices and
    every per-row tensor, the KV cache included, is sliced alike (Forward.select)."""

    def __init__(self, canvas: Canvas, indices: Sequence[int], keep: KeepRows | None) -> None:
        self.canvas, self.indices, self.keep = canvas, list(indices), keep
        self.alive = torch.arange(canvas.x.shape[0], device=canvas.x.device)  # live rows in the whole batch
        self.whole_x = canvas.x  # (B, W): the dropped rows as they were when dropped

    def whole(self, x: Tensor) -> Tensor:
        """The whole batch's canvas, given the live rows' x."""
        return self.whole_x.index_copy(0, self.alive, x)

    def prune(self, x: Tensor) -> Tensor | None:
        """Positions (into the live rows) that stay, when keep() drops some; else None."""
        if self.keep is None:
            return None
        wanted = torch.as_tensor(list(self.keep()), dtype=torch.bool, device=x.device)[self.alive]
        if bool(wanted.all()):
            return None
        self.whole_x = self.whole(x)
        stay = wanted.nonzero().squeeze(1)
        self.alive, self.canvas = self.alive[stay], self.canvas.select(stay)
        self.indices = [self.indices[i] for i in stay.tolist()]
        return stay


def _due_for_refresh(s: int, since_refresh: Tensor, candidate: Tensor, cfg: SampleConfig) -> Tensor:
    """(B,) bool: the rows whose every position step s of a block recomputes (refreshing their cached
    K/V): all at the block's start and every cache_refresh steps; a row once cache_refresh_tokens of its
    tokens were committed since its last refresh (counted per row, so that a row's refreshes, and so its
    output, never depend on its batch mates)."""
    if s == 0 or (cfg.cache_refresh > 0 and s % cfg.cache_refresh == 0):
        return torch.ones_like(since_refresh, dtype=torch.bool)
    active = candidate.any(1)
    due = active & (since_refresh >= cfg.cache_refresh_tokens) if cfg.cache_refresh_tokens else \
        torch.zeros_like(active)
    if due.any():  # rows done with the block never read their cache again: joining the refresh spares a forward
        due |= ~active
    return due


@torch.no_grad()
def _decode_block(x: Tensor, b: int, block: int, first: Tensor, live: LiveRows, forward: Forward,
                  cfg: SampleConfig, mask_id: int, eos_id: int, step0: int,
                  on_step: StepCallback | None) -> tuple[Tensor, int]:
    """Decode block b, whose first position is column first (B,) of the live rows x (their canvas
    live.canvas); returns their canvas (fewer rows
    when live.keep dropped some) and the running step count (for on_step and stats). The noise and
    EOS suppression use the block's scheduled step b * steps + s instead, which does not depend on
    when the batch's other rows let an earlier block finish early."""
    steps = cfg.steps // cfg.n_blocks
    width = x.shape[1]
    canvas = live.canvas
    window = (first[:, None] + torch.arange(block, device=x.device)).clamp(max=width - 1)
    in_block = (first[:, None] + torch.arange(block, device=x.device)) < canvas.end[:, None]
    generated_offset = torch.arange(block, device=x.device).expand_as(window) + b * block
    tail = int((canvas.end - first).max()) if cfg.cache == "prefix" else block
    queries = (first[:, None] + torch.arange(max(tail, 1), device=x.device)).clamp(max=width - 1)
    step = step0
    since_refresh = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)  # per row, since its last refresh
    for s in range(steps):
        if (stay := live.prune(x)) is not None:
            x, window, in_block, queries = x[stay], window[stay], in_block[stay], queries[stay]
            generated_offset, canvas, since_refresh = generated_offset[stay], live.canvas, since_refresh[stay]
            forward.select(stay)
        candidate = (x.gather(1, window) == mask_id) & in_block
        if not candidate.any():
            break
        due = _due_for_refresh(s, since_refresh, candidate, cfg)
        refresh = due if bool(due.any()) and not bool(due.all()) else bool(due.all())
        logits = forward(x, window, queries, refresh, candidate)  # (n, V) at the masked positions
        scheduled = b * steps + s
        logits = _suppress_eos(logits, generated_offset[candidate], scheduled, cfg, eos_id)
        noise = RowNoise(cfg.seed, scheduled, live.indices, candidate.sum(1))
        x0, confidence, score = (torch.zeros(candidate.shape, dtype=t.dtype, device=t.device)
                                 .masked_scatter(candidate, t) for t in propose(logits, cfg, noise))
        per_row = cfg.batch_ranking == "per_sequence"
        n = scheduled_count(candidate.sum(1) if per_row else candidate.sum(), steps - s)
        chosen = select(score, candidate, n, cfg.batch_ranking) | parallel_choice(confidence, candidate, cfg)
        since_refresh = since_refresh.masked_fill(due, 0) + chosen.sum(1)
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(window)
        x = x.index_put((rows[chosen], window[chosen]), x0[chosen])  # chosen positions are unique
        if cfg.eos == "fill":
            x = _fill_after_eos(x, canvas, eos_id, mask_id)
        if on_step is not None:
            on_step(step, x.clone())
        step += 1
    return x, step


def _completions(x: Tensor, canvas: Canvas, cfg: SampleConfig, eos_id: int) -> list[list[int]]:
    out = []
    for i in range(x.shape[0]):
        tokens = x[i, int(canvas.start[i]):int(canvas.end[i])].tolist()
        if eos_id in tokens:
            cut = tokens.index(eos_id)
            tokens = tokens[:cut] if cfg.eos == "stop" else tokens[:cut] + [eos_id] * (len(tokens) - cut)
        out.append(tokens)
    return out


@torch.no_grad()
def generate(model: DLM, prompts: list[list[int]], cfg: SampleConfig, mask_id: int, eos_id: int,
             on_step: StepCallback | None = None, stats: dict | None = None,
             indices: Sequence[int] | None = None, keep: KeepRows | None = None) -> list[list[int]]:
    """Generate after each prompt by reverse diffusion; returns the new tokens of each sequence.

    on_step(step, tokens (B, W)) sees the canvas after every step (mask id = not yet decoded).
    stats, when given, receives {"forward_calls": n, "full_forward_calls": those that computed every
    position (without a KV cache all; with one a block's first and each refresh), "steps": n,
    "peak_cache_bytes": the most a KV cache held (0 without one), "widest_input": the most positions one
    forward took}.
    indices: each prompt's index in the whole input (default 0..B-1). A prompt's random draws are a
    function of (cfg.seed, its index, step), so a caller that splits a larger input into batches
    gets the same completions for every batch size and order (except with flattened_batch ranking).
    keep() (one bool per prompt: still wanted?) is asked before every step; a prompt it drops is
    computed no more (with a window: from its next block) and gets what it had decoded by then, mask
    ids included, while the others get exactly what they would have got (LiveRows).
    """
    if mask_id != model.mask_id:
        raise UserError(f"mask id {mask_id} is not the model's ({model.mask_id})")
    _check_model(model, cfg)
    indices = list(range(len(prompts)) if indices is None else indices)
    if len(indices) != len(prompts):
        raise UserError(f"{len(indices)} prompt indices for {len(prompts)} prompts; give one per prompt")
    gens = validate_prompts(prompts, cfg, model.cfg.block_size, [f"prompt {i}" for i in indices])
    device = next(model.parameters()).device
    canvas = build_canvas(prompts, gens, cfg.padding, mask_id, eos_id, device)
    block = cfg.block_length or int((canvas.end - canvas.start).max())
    live = LiveRows(canvas, indices, keep)
    report = None if on_step is None else lambda s, tokens: on_step(s, live.whole(tokens))
    x, step, forwards = canvas.x, 0, []
    with model.sink_cache():
        for b in range(cfg.n_blocks):
            if cfg.window is None:
                forwards = forwards or [Forward(model, canvas, cfg)]
                x, step = _decode_block(x, b, block, live.canvas.start + b * block, live, forwards[0], cfg,
                                        mask_id, eos_id, step, report)
            else:
                x = x if (stay := live.prune(x)) is None else x[stay]
                if len(live.alive):
                    x, step = _decode_block_windowed(x, b, block, live, model, cfg, mask_id, eos_id, step, report,
                                                     forwards)
            if not len(live.alive):
                break
    if stats is not None:
        stats.update(forward_calls=sum(f.calls for f in forwards), steps=step,
                     full_forward_calls=sum(f.full_calls for f in forwards),
                     peak_cache_bytes=max((f.peak_cache_bytes for f in forwards), default=0),
                     widest_input=max((f.widest for f in forwards), default=0))
    return _completions(live.whole(x), canvas, cfg, eos_id)


def _decode_block_windowed(x: Tensor, b: int, block: int, live: LiveRows, model: DLM, cfg: SampleConfig,
                           mask_id: int, eos_id: int, step0: int, on_step: StepCallback | None,
                           forwards: list[Forward]) -> tuple[Tensor, int]:
    """Decode block b of the live rows x on the small canvas of its window (sinkdlm.window); the rest
    of x is untouched. The Forward (and its KV cache) lives for this block only, so evicted keys are
    gone; rows are dropped at block starts only (the caller's live.prune)."""
    canvas = live.canvas
    first = canvas.start + b * block
    kept = window_canvas(canvas.valid.int().argmax(1), first, torch.minimum(first + block, canvas.end),
                         cfg.window, cfg.window_anchors)
    small = Canvas(kept.gather(x, eos_id), kept.valid, kept.gather(canvas.is_prompt, 0).bool() & kept.valid,
                   ((kept.columns < canvas.start[:, None]) & kept.valid).sum(1), kept.end)
    forwards.append(Forward(model, small, cfg))
    report = None if on_step is None else lambda s, tokens: on_step(s, kept.scatter(x, tokens))
    tokens, step = _decode_block(small.x, b, block, kept.first, LiveRows(small, live.indices, None), forwards[-1],
                                 cfg, mask_id, eos_id, step0, report)
    forwards[-1].cache = KVCache()  # its keys are evicted: only the counts stay
    x = kept.scatter(x, tokens)
    return (_fill_after_eos(x, canvas, eos_id, mask_id) if cfg.eos == "fill" else x), step


def generate_two_stage(model: DLM, prompts: list[list[int]], first: SampleConfig, second: SampleConfig,
                       mask_id: int, eos_id: int, indices: Sequence[int] | None = None) -> list[list[int]]:
    """SMDM's GSM8K decoding: generate the reasoning, then generate again from prompt + reasoning.

    SMDM decodes stage 1, drops the EOS padding and re-tokenizes prompt + reasoning as the stage-2
    prompt, whose completion is "#### answer" (its SFT data trains exactly these two tasks). Here the
    stage-1 tokens up to the first EOS are appended directly: sinkdlm's SFT data builds the stage-2
    prompt as the stage-1 prompt's tokens + the response's tokens (sinkdlm.data.sft.gsm8k_examples), so
    appending is exactly what the model was trained on, while a decode/re-encode round trip can merge
    tokens across the boundary. Returns stage-1 + stage-2 tokens per sequence. indices: as in generate.
    """
    reasoning = generate(model, prompts, first.replace(eos="stop"), mask_id, eos_id, indices=indices)
    prompts2 = [p + r for p, r in zip(prompts, reasoning)]
    answers = generate(model, prompts2, second, mask_id, eos_id, indices=indices)
    return [r + a for r, a in zip(reasoning, answers)]


def complete(model: DLM, tokenizer: Any, eos_id: int, texts: Sequence[str], cfg: SampleConfig,
             batch_size: int = DEFAULT_BATCH, progress: bool = False,
             labels: Sequence[str] | None = None) -> Iterator[str]:
    """The completion text of each prompt text, in order, generated `batch_size` prompts at a time.

    Every prompt is checked before any is generated (a UserError names it by `labels[i]`, default
    "prompt i" with i its index in `texts`), so a bad last prompt never costs the earlier ones' time.
    Prompt i draws its noise as the i-th prompt of the whole input, so a completion depends only on
    its prompt, its position and cfg.seed, never on the batch size.
    """
    if batch_size <= 0:
        raise UserError(f"--batch-size={batch_size} must be > 0")
    _check_model(model, cfg)
    ids = [tokenizer.encode(t).ids for t in texts]
    validate_prompts(ids, cfg, model.cfg.block_size, labels)
    return _complete_batches(model, tokenizer, eos_id, ids, cfg, batch_size, progress)


def _complete_batches(model: DLM, tokenizer: Any, eos_id: int, ids: list[list[int]], cfg: SampleConfig,
                      batch_size: int, progress: bool) -> Iterator[str]:
    from tqdm import tqdm

    for lo in tqdm(range(0, len(ids), batch_size), desc="generate", unit="batch", disable=not progress):
        batch = ids[lo: lo + batch_size]
        for tokens in generate(model, batch, cfg, model.mask_id, eos_id, indices=range(lo, lo + len(batch))):
            yield tokenizer.decode(tokens, skip_special_tokens=True)


def load_for_sampling(checkpoint: str | Path, device: str = "cpu") -> tuple[DLM, Any, int]:
    """(model, tokenizer, EOS id) of a checkpoint: the EOS its training recorded (meta.json), else the
    tokenizer's; a UserError when the tokenizer has none."""
    from sinkdlm.checkpoint import load_meta, load_model, load_tokenizer
    from sinkdlm.data.tokenizer import eos_id as tokenizer_eos

    model, _ = load_model(checkpoint, device)
    tok = load_tokenizer(checkpoint)
    eos = load_meta(checkpoint).get("eos_id")
    return model, tok, int(eos) if eos is not None else tokenizer_eos(tok)
