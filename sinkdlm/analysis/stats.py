"""Attention-sink statistics as pure functions of per-head column sums and norms.

Layout used throughout: keys are [dedicated sinks; content] (the model's observer order, for front
and end placement alike: placement changes the sink's RoPE position, not its key index). A trailing
K axis indexes keys; leading axes are free (step, layer, batch, head ...). `key_valid` marks keys
that are not padding. The incoming attention of key j is the column sum  c_j = sum_i A_ij  over the
real queries i (2510.15731); it sums to the number of queries over j.
"""

from __future__ import annotations

import functools
import typing
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from sinkdlm.analysis import movement
from sinkdlm.analysis.ranks import mid_rank, share_below, spearman

Rule = Literal["gu", "eps", "std", "top1"]  # how a sink is detected (see detect)
RULES: tuple[str, ...] = typing.get_args(Rule)
DEFAULT_GU_THRESHOLD = 0.3  # 2410.10781: a head has a sink when its mean attention on one key exceeds 0.3
DEFAULT_MARGIN = 3.0  # 2510.15731: a sink's column sum exceeds the mean of the others by 3
# what the most-attended key of a head is: a dedicated sink, a [MASK] input, content position 0 (when
# not masked), or another content token (the copy-task probes, eval/probes.py, type keys the same way)
KEY_TYPES = ("dedicated", "first", "mask", "content")
DEFAULT_STD_K = 3.0  # mean + 3 std over the keys of one head
TOP_TOKENS = 10  # most frequent sink tokens listed in the metrics


# ---- per forward: column sums and norms ----------------------------------------------------------


def column_sums(probs: Tensor, query_valid: Tensor | None = None) -> Tensor:
    """probs (B, H, Tq, K) -> incoming attention per key (B, H, K), summed over real queries."""
    probs = probs.float()
    if query_valid is not None:
        probs = probs * query_valid[:, None, :, None].to(probs.dtype)
    return probs.sum(dim=2)


def l2_norms(vectors: Tensor) -> Tensor:
    """(..., K, D) -> (..., K)."""
    return vectors.float().norm(dim=-1)


# ---- sink detection: (..., K) column sums -> (..., K) bool ----------------------------------------


def _valid(colsum: Tensor, key_valid: Tensor | None) -> Tensor:
    if key_valid is None:
        return torch.ones_like(colsum, dtype=torch.bool)
    return key_valid.expand_as(colsum).bool()


def key_share(colsum: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Mean attention a key receives over the queries: c_j / sum_k c_k (each query's row sums to 1,
    so the sum over keys is the number of queries)."""
    c = colsum.float().masked_fill(~_valid(colsum, key_valid), 0.0)
    total = c.sum(-1, keepdim=True)
    return c / total.clamp(min=torch.finfo(torch.float32).tiny)


def detect_gu(colsum: Tensor, threshold: float = DEFAULT_GU_THRESHOLD, key_valid: Tensor | None = None) -> Tensor:
    """2410.10781: key j is a sink of its head when the head's mean attention on it exceeds `threshold`
    (a share of attention, comparable across lengths)."""
    return _valid(colsum, key_valid) & (key_share(colsum, key_valid) > threshold)


def detect_eps(colsum: Tensor, margin: float = DEFAULT_MARGIN, key_valid: Tensor | None = None) -> Tensor:
    """2510.15731: key j is a sink when c_j > mean of the other keys' c + margin."""
    valid = _valid(colsum, key_valid)
    c = colsum.masked_fill(~valid, 0.0)
    n = valid.sum(-1, keepdim=True)
    others_mean = (c.sum(-1, keepdim=True) - c) / (n - 1).clamp(min=1)
    return valid & (c > others_mean + margin)


def detect_std(colsum: Tensor, k: float = DEFAULT_STD_K, key_valid: Tensor | None = None) -> Tensor:
    """Key j is a sink when c_j > mean + k * std (population std over the valid keys).

    A lone outlier among n keys lies at most (n - 1) / sqrt(n) std above the mean, so this rule
    finds nothing with fewer than about k^2 + 2 keys.
    """
    valid = _valid(colsum, key_valid)
    n = valid.sum(-1, keepdim=True).clamp(min=1)
    c = colsum.masked_fill(~valid, 0.0)
    mean = c.sum(-1, keepdim=True) / n
    var = ((c - mean) ** 2).masked_fill(~valid, 0.0).sum(-1, keepdim=True) / n
    return valid & (c > mean + k * var.sqrt())


def detect_top1(colsum: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """The most-attended valid key of each head."""
    top = dominant(colsum, key_valid)
    return F.one_hot(top, colsum.shape[-1]).bool()


def detect(colsum: Tensor, rule: str, key_valid: Tensor | None = None, margin: float = DEFAULT_MARGIN,
           std_k: float = DEFAULT_STD_K, gu_threshold: float = DEFAULT_GU_THRESHOLD) -> Tensor:
    if rule == "gu":
        return detect_gu(colsum, gu_threshold, key_valid)
    if rule == "eps":
        return detect_eps(colsum, margin, key_valid)
    if rule == "std":
        return detect_std(colsum, std_k, key_valid)
    if rule == "top1":
        return detect_top1(colsum, key_valid)
    raise ValueError(f"sink rule {rule!r} is not one of {RULES}")


def dominant(colsum: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Index of the most-attended valid key, (...,) long."""
    return colsum.masked_fill(~_valid(colsum, key_valid), float("-inf")).argmax(-1)


# ---- shares of attention, pooled over cells ------------------------------------------------------
# A cell is one (step, layer, sequence, head). A share over several cells is pooled: the sums of its
# numerator and denominator over the cells, then one division, so a cell weighs by its attention
# mass and a cell with nothing in the denominator (a head with no sink mass) adds nothing.


def pooled(part: Tensor, whole: Tensor, dims: tuple[int, ...]) -> Tensor:
    """sum(part) / sum(whole) over `dims`; NaN where the whole is 0 (the share is undefined)."""
    num, den = part.float(), whole.float()
    if dims:  # torch reads an empty dims tuple as "every axis"
        num, den = num.sum(dims), den.sum(dims)
    return torch.where(den > 0, num / den.clamp(min=torch.finfo(torch.float32).tiny), float("nan"))


def absorption_rate(colsum: Tensor, n_sink: int) -> Tensor:
    """Per cell: share of all incoming attention that lands on the dedicated sinks (the first n_sink keys)."""
    return pooled(colsum[..., :n_sink], colsum, (-1,))


def dedicated_top1(colsum: Tensor, n_sink: int, key_valid: Tensor | None = None) -> Tensor:
    """Per cell: whether a dedicated sink draws more attention than every valid content key (a tie,
    as under exactly uniform attention, is not a win)."""
    valid = _valid(colsum, key_valid)
    content = colsum[..., n_sink:].masked_fill(~valid[..., n_sink:], float("-inf")).amax(-1)
    return colsum[..., :n_sink].amax(-1) > content


def capture_share(colsum: Tensor, sinks: Tensor, n_sink: int, dims: tuple[int, ...] = ()) -> Tensor:
    """Of all sink mass (dedicated sinks + detected content sinks), the dedicated sinks' share, pooled
    over `dims` (cells: leading axes)."""
    dedicated = colsum[..., :n_sink].sum(-1)
    content = (colsum[..., n_sink:] * sinks[..., n_sink:]).sum(-1)
    return pooled(dedicated, dedicated + content, dims)


def norm_rank(norms: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Mid-rank of each key's norm among the valid keys, scaled to [0, 1]: 0 = lowest norm, 1 = highest;
    tied norms share the mean of their ranks (NaN for invalid keys)."""
    return mid_rank(norms, _valid(norms, key_valid))


def norm_ratio(norms: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Each key's norm over the mean norm of the valid keys of its cell (1 = an average key)."""
    valid = _valid(norms, key_valid)
    mean = norms.masked_fill(~valid, 0.0).sum(-1, keepdim=True) / valid.sum(-1, keepdim=True).clamp(min=1)
    return norms / mean.clamp(min=torch.finfo(norms.dtype).tiny)


def weighted_mean(values: Tensor, weights: Tensor, dims: tuple[int, ...]) -> Tensor:
    """Mean of per-key `values` weighted by attention mass, pooled over the keys and `dims`; keys whose
    value is undefined (NaN) weigh nothing."""
    weights = weights * ~values.isnan()
    return pooled((values.nan_to_num(0.0) * weights).sum(-1), weights.sum(-1), dims)


# ---- moving sinks: a leading step axis ------------------------------------------------------------


def stability(positions: Tensor) -> Tensor:
    """(S, ...) dominant position per step -> share of consecutive steps where it stays put."""
    if positions.shape[0] < 2:
        return torch.full(positions.shape[1:], float("nan"))
    return (positions[1:] == positions[:-1]).float().mean(0)


def consecutive_iou(sets: Tensor) -> Tensor:
    """(S, ..., K) bool sink sets -> mean IoU of consecutive steps over the pairs in which either step
    has a sink; two empty sets say nothing about movement and are left out (NaN when every pair is
    empty), so a head without sinks cannot read as pinned."""
    if sets.shape[0] < 2:
        return torch.full(sets.shape[1:-1], float("nan"))
    a, b = sets[1:], sets[:-1]
    inter, union = (a & b).sum(-1).float(), (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), float("nan")).nanmean(0)


def distinct_positions(positions: Tensor, n_keys: int) -> Tensor:
    """(S, ...) positions -> how many different positions occur over the steps."""
    return F.one_hot(positions, n_keys).any(0).sum(-1)


def distinct_sinks(sets: Tensor) -> Tensor:
    """(S, ..., K) bool -> size of the union of the sink sets over the steps."""
    return sets.any(0).sum(-1)


def sink_token_counts(sets: Tensor, tokens: Tensor, n_sink: int) -> Counter:
    """Token ids of detected content sinks. sets (S, L, B, H, K), tokens (S, B, T) model inputs."""
    hits = sets[..., n_sink:].any(dim=(1, 3))  # (S, B, T): a sink in some layer/head
    return Counter(tokens[hits].tolist())


def mask_share(sets: Tensor, tokens: Tensor, n_sink: int, mask_id: int, dims: tuple[int, ...] = (0, 2, 3)) -> Tensor:
    """Share of detected content sinks whose input token is [MASK], pooled (counts) over the cell axes
    `dims` (default: per layer); NaN where no content sink was detected. sets (S, L, B, H, K)."""
    content = sets[..., n_sink:]
    is_mask = (tokens == mask_id)[:, None, :, None, :]  # (S, 1, B, 1, T)
    return pooled((content & is_mask).sum(-1), content.sum(-1), dims)


def nan_mean(x: Tensor, dim: int | tuple[int, ...] | None = None) -> Tensor:
    return x.float().nanmean() if dim is None else x.float().nanmean(dim=dim)


def to_py(x: Any) -> Any:
    """Tensors/floats -> JSON-ready lists and numbers (NaN -> None)."""
    if isinstance(x, Tensor):
        return to_py(x.tolist())
    if isinstance(x, float):
        return None if x != x else round(x, 6)
    if isinstance(x, dict):
        return {str(k): to_py(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [to_py(v) for v in x]
    return x


# ---- everything at once -------------------------------------------------------------------------


@dataclass
class Trajectory:
    """What a recording keeps: per step (a denoising step or a masking level) the model's input and,
    for the recorded layers, per-head column sums and norms. Attention maps only for `maps` steps."""

    layers: list[int]
    n_sink: int
    tokens: Tensor  # (S, B, T) model input at each step
    key_valid: Tensor  # (S, B, K) bool: keys [sinks; content] that queries may see
    query_valid: Tensor  # (S, B, T) bool: real (non-padding) queries
    colsum: Tensor  # (S, L, B, H, K)
    value_norm: Tensor  # (S, L, B, H, K)
    key_norm: Tensor  # (S, L, B, H, K)
    maps: dict[int, Tensor] = field(default_factory=dict)  # step -> (L, H, T, K), batch item 0
    outputs: list[list[int]] | None = None  # generated tokens (trajectory mode)
    # on a synthetic copy task (analysis.query_classes): each query's class, and the column sums per class
    query_class: Tensor | None = None  # (S, B, T) index into query_classes.QUERY_CLASSES; -1 = padding
    class_colsum: Tensor | None = None  # (S, L, B, H, C, K); summed over C it is colsum

    @property
    def n_steps(self) -> int:
        return self.colsum.shape[0]

    def share(self) -> Tensor:
        """Incoming attention per key as a share of all queries: (S, L, B, H, K), sums to 1 over K."""
        n = self.query_valid.sum(-1).float().clamp(min=1)  # (S, B)
        return self.colsum / n[:, None, :, None, None]

    def positions(self, keys: Tensor) -> Tensor:
        """Key index -> sequence position; dedicated sinks become -S..-1."""
        return keys - self.n_sink


def detected_sets(tr: Trajectory, margin: float, std_k: float,
                  gu_threshold: float = DEFAULT_GU_THRESHOLD) -> dict[str, Tensor]:
    valid = tr.key_valid[:, None, :, None, :]
    return {rule: detect(tr.colsum, rule, valid, margin, std_k, gu_threshold) for rule in RULES}


# how each table pools: (axes of the (S, L, B, H) cells, axes of the (L, B, H) moving-sink tables)
POOLING = {"summary": ((0, 1, 2, 3), (0, 1, 2)), "per_layer": ((0, 2, 3), (1, 2)),
           "per_layer_head": ((0, 2), (1,))}
NORMS = ("value", "key")
# a key picked by uniform attention sits mid-way in the norm ranking and has the mean norm
NORM_BASELINES = {"rank": 0.5, "norm_ratio": 1.0, "rank_same_type": 0.5}


def key_types(tr: Trajectory, mask_id: int) -> Tensor:
    """(S, B, K) index into KEY_TYPES of every key: dedicated sink, [MASK] input, content position 0 (not
    masked), other content."""
    steps, batch, _ = tr.tokens.shape
    content = torch.full_like(tr.tokens, KEY_TYPES.index("content"))
    content[..., 0] = KEY_TYPES.index("first")
    content[tr.tokens == mask_id] = KEY_TYPES.index("mask")
    dedicated = torch.full((steps, batch, tr.n_sink), KEY_TYPES.index("dedicated"), dtype=content.dtype)
    return torch.cat([dedicated, content], -1)


class Cells:
    """Per-cell quantities of one recording and its detected sinks (S, L, B, H, K) bool (dedicated
    sinks included where detected), computed once for every table."""

    def __init__(self, tr: Trajectory, sinks: Tensor, mask_id: int,
                 gu_threshold: float = DEFAULT_GU_THRESHOLD) -> None:
        self.tr, self.sinks, self.mask_id = tr, sinks, mask_id
        n = tr.n_sink
        self.valid = tr.key_valid[:, None, :, None, :]
        self.queries = tr.query_valid.sum(-1).float()[:, None, :, None].expand(tr.colsum.shape[:-1])
        self.n_keys = self.valid.sum(-1).float().expand_as(self.queries)
        self.types = key_types(tr, mask_id)[:, None, :, None, :]
        self.mask_keys = self.valid & (self.types == KEY_TYPES.index("mask"))
        self.content_sinks = self.sinks.clone()
        self.content_sinks[..., :n] = False
        self.content_valid = self.valid.clone()
        self.content_valid[..., :n] = False
        self.dominant = dominant(tr.colsum, self.valid)  # (S, L, B, H)
        self.dominant_content = dominant(tr.colsum, self.content_valid)
        top_share = key_share(tr.colsum, self.valid).gather(-1, self.dominant[..., None])[..., 0]
        self.gu_sink = top_share > gu_threshold  # (S, L, B, H): the head has a Gu sink ...
        self.gu_type = self.types.expand_as(tr.colsum).gather(-1, self.dominant[..., None])[..., 0]  # ... of this type
        self.norm_of = {"value": tr.value_norm, "key": tr.key_norm}

    # norms and ranks are computed once, when a table first asks (the uniform baselines never do)
    @functools.cached_property
    def rank(self) -> dict[str, Tensor]:
        return {k: self._ranks(v) for k, v in self.norm_of.items()}

    @functools.cached_property
    def ratio(self) -> dict[str, Tensor]:
        # over the content keys' mean: a zero-value dedicated sink must not move the content ratios
        return {k: norm_ratio(v, self.content_valid) for k, v in self.norm_of.items()}

    @functools.cached_property
    def same_type(self) -> dict[str, Tensor]:
        return {k: self._same_type(v) for k, v in self.norm_of.items()}

    @functools.cached_property
    def value_attention_rho(self) -> Tensor:
        """(S, L, B, H) Spearman's rho of attention received and value norm over the content keys."""
        return spearman(self.tr.colsum, self.tr.value_norm, self.content_valid.expand_as(self.tr.colsum))

    def _ranks(self, norms: Tensor) -> Tensor:
        """Content keys ranked among the content keys (a dedicated sink, whose value may be zero by
        design, does not shift them); dedicated sinks ranked among every valid key."""
        content_valid, valid = self.content_valid.expand_as(norms), self.valid.expand_as(norms)
        is_content = torch.zeros_like(valid)
        is_content[..., self.tr.n_sink:] = True
        return torch.where(is_content, mid_rank(norms, content_valid), mid_rank(norms, valid))

    def _same_type(self, norms: Tensor) -> Tensor:
        """Per content key, the share of the non-sink content keys of its own kind ([MASK] or not) with a
        lower norm, ties half: 0.5 = a typical key of its kind, whatever the mask embedding's norm."""
        others = self.content_valid & ~self.content_sinks
        is_mask = self.mask_keys.expand_as(norms)
        mask_ref, other_ref = others & is_mask, others & ~is_mask
        return torch.where(is_mask, share_below(norms, mask_ref), share_below(norms, other_ref))

    def shares(self, dims: tuple[int, ...]) -> dict[str, Tensor]:
        """Attention shares pooled over the cell axes `dims`, and where they went."""
        colsum, n = self.tr.colsum, self.tr.n_sink
        out = {"sink_mass": pooled((colsum * self.sinks).sum(-1), colsum.sum(-1), dims),
               "n_sinks": self.sinks.sum(-1).float().mean(dims), **self.gu_rates(dims)}
        out["mask_absorption"] = pooled((colsum * self.mask_keys).sum(-1), colsum.sum(-1), dims)
        uniform_mask = self.uniform_share(self.mask_keys.sum(-1).float(), dims)
        out["mask_absorption_ratio"] = torch.where(uniform_mask > 0, out["mask_absorption"] / uniform_mask,
                                                   float("nan"))
        out["mask_absorption_uniform"] = uniform_mask
        if n:
            out["absorption_rate"] = pooled(colsum[..., :n].sum(-1), colsum.sum(-1), dims)
            out["absorption_ratio"] = out["absorption_rate"] / self.uniform_absorption(dims)
            out["dedicated_top1_rate"] = dedicated_top1(colsum, n, self.valid).float().mean(dims)
            out["dedicated_capture_share"] = capture_share(colsum, self.sinks, n, dims)
        return out

    def gu_rates(self, dims: tuple[int, ...]) -> dict[str, Tensor]:
        """Share of (step, sequence, head) cells with a Gu sink, and split by the winning key's type. A
        cell without queries (a query class absent from a sequence at a step) has no mean attention
        and is left out: NaN when no cell has a query."""
        has_queries = (self.queries > 0).float()
        out = {"gu_sink_rate": pooled(self.gu_sink * has_queries, has_queries, dims)}
        for index, kind in enumerate(KEY_TYPES):
            if kind != "dedicated" or self.tr.n_sink:
                won = self.gu_sink & (self.gu_type == index)
                out[f"gu_sink_rate_{kind}"] = pooled(won * has_queries, has_queries, dims)
        return out

    def uniform_share(self, n_keys_of_kind: Tensor, dims: tuple[int, ...]) -> Tensor:
        """The pooled share that keys of one kind would draw if every query attended uniformly."""
        return pooled(self.queries * n_keys_of_kind / self.n_keys, self.queries, dims)

    def uniform_absorption(self, dims: tuple[int, ...]) -> Tensor:
        """The dedicated sinks' pooled share if every query attended uniformly over its valid keys."""
        return self.uniform_share(torch.full_like(self.queries, float(self.tr.n_sink)), dims)

    def norms(self, dims: tuple[int, ...]) -> dict[str, Tensor]:
        """Attention-weighted norm ranks and ratios of content sinks and of the dedicated sinks, the
        content sinks' rank among non-sinks of their own kind, and the per-head Spearman correlation of
        attention received with value norm."""
        colsum, n = self.tr.colsum, self.tr.n_sink
        out = {}
        for kind in NORMS:
            weights = colsum * self.content_sinks
            out[f"{kind}_rank_sinks"] = weighted_mean(self.rank[kind], weights, dims)
            out[f"{kind}_norm_ratio_sinks"] = weighted_mean(self.ratio[kind], weights, dims)
            out[f"{kind}_rank_same_type_sinks"] = weighted_mean(self.same_type[kind], weights, dims)
            if n:
                out[f"{kind}_rank_dedicated"] = weighted_mean(self.rank[kind][..., :n], colsum[..., :n], dims)
                out[f"{kind}_norm_ratio_dedicated"] = weighted_mean(self.ratio[kind][..., :n], colsum[..., :n],
                                                                    dims)
        out["value_attention_spearman"] = nan_mean(self.value_attention_rho, dims)
        return out

    def moving(self, dims: tuple[int, ...]) -> dict[str, Tensor]:
        """Over the steps, per (layer, sequence, head), then averaged over the axes `dims` of those."""
        tr, k = self.tr, self.tr.colsum.shape[-1]
        step_pairs = (0, *(d + 1 for d in dims))  # the same axes of the (S - 1, L, B, H) step pairs
        events = movement.event_locked(self.dominant, tr.tokens, tr.query_valid, self.mask_id, tr.n_sink,
                                       step_pairs)
        return {"dominant_stability": nan_mean(stability(self.dominant), dims),
                "content_dominant_stability": nan_mean(stability(self.dominant_content), dims),
                "sink_set_iou": nan_mean(consecutive_iou(self.sinks), dims),
                "distinct_dominant_positions": distinct_positions(self.dominant, k).float().mean(dims),
                "distinct_sink_positions": distinct_sinks(self.sinks).float().mean(dims), **events}

    def across_layers(self) -> Tensor:
        """(L,) share of (step, sequence) in which a layer's top key (heads summed) is the next layer's."""
        summed = dominant(self.tr.colsum.sum(3), self.tr.key_valid[:, None])  # (S, L, B)
        return movement.same_as_next_layer(summed)

    def table(self, level: str) -> dict[str, Tensor]:
        cells, moving = POOLING[level]
        out = {**self.shares(cells), **self.norms(cells), **self.moving(moving),
               "mask_share_of_sinks": mask_share(self.sinks, self.tr.tokens, self.tr.n_sink, self.mask_id, cells)}
        if level == "summary":
            out["cross_layer_stability"] = nan_mean(self.across_layers())
        elif level == "per_layer":
            out["same_top_key_as_next_layer"] = self.across_layers()
        return out


def dominant_by_layer(tr: Trajectory, item: int = 0) -> Tensor:
    """(L, S) position of the most-attended key (heads summed) of sequence `item`; sinks < 0."""
    colsum = tr.colsum[:, :, item].sum(2)  # (S, L, K)
    return tr.positions(dominant(colsum, tr.key_valid[:, None, item])).T


def trajectory_metrics(tr: Trajectory, mask_id: int, margin: float = DEFAULT_MARGIN, std_k: float = DEFAULT_STD_K,
                       rule: str = "gu", gu_threshold: float = DEFAULT_GU_THRESHOLD) -> dict[str, Any]:
    """Every sink metric of a recording: the summary (pooled over all cells) with its uniform
    baselines, and tables per layer and per (layer, head), as nested lists [layer][head] / [layer]."""
    sets = detected_sets(tr, margin, std_k, gu_threshold)
    main = sets[rule]
    per_rule = {}
    for name, s in sets.items():
        content = s[..., tr.n_sink:]
        per_rule[name] = {"n_sinks": s.sum(-1).float().mean(), "content_sinks": content.sum(-1).float().mean(),
                          "iou": nan_mean(consecutive_iou(s)), "distinct_sinks": distinct_sinks(s).float().mean()}
    cells = Cells(tr, main, mask_id, gu_threshold)
    counts = sink_token_counts(main, tr.tokens, tr.n_sink)
    table = cells.table("summary")
    summary = {key: table.get(key) for key in SUMMARY_KEYS}  # None: undefined for this model
    return to_py({
        # "eps" is column_margin's old name, kept for readers of earlier metrics.json
        "rule": rule, "gu_threshold": gu_threshold, "column_margin": margin, "eps": margin, "std_k": std_k,
        "steps": tr.n_steps, "layers": tr.layers, "n_sink": tr.n_sink, "heads": tr.colsum.shape[3],
        "key_types": list(KEY_TYPES),
        "summary": summary, "baselines": uniform_baselines(tr, mask_id, main, gu_threshold),
        "per_layer_head": cells.table("per_layer_head"),
        "per_layer": {**cells.table("per_layer"), "dominant_position": dominant_by_layer(tr)},
        "rules": per_rule,
        "sink_tokens": [[tok, n] for tok, n in counts.most_common(TOP_TOKENS)],
    })


def column_margin_of(sinks: dict[str, Any]) -> float:
    """The margin rule's margin of a metrics.json "sinks" entry (written as "eps" before it was named)."""
    return sinks.get("column_margin", sinks.get("eps", DEFAULT_MARGIN))


GU_KEYS = ("gu_sink_rate", *(f"gu_sink_rate_{kind}" for kind in KEY_TYPES))
MOVING_KEYS = ("dominant_stability", "content_dominant_stability", "sink_set_iou", "distinct_dominant_positions",
               "distinct_sink_positions", "event_change_rate", "no_event_change_rate", "event_locked_change",
               "cross_layer_stability")
# the scalars of a recording, in report order; those of the dedicated sink are None without one
SUMMARY_KEYS = (
    *GU_KEYS, "mask_absorption", "mask_absorption_ratio",
    "absorption_rate", "absorption_ratio", "dedicated_top1_rate", "dedicated_capture_share", "sink_mass",
    *MOVING_KEYS,
    "value_rank_sinks", "value_norm_ratio_sinks", "value_rank_same_type_sinks", "key_rank_sinks",
    "key_norm_ratio_sinks", "key_rank_same_type_sinks", "value_attention_spearman",
    "value_rank_dedicated", "value_norm_ratio_dedicated", "key_rank_dedicated", "key_norm_ratio_dedicated",
    "mask_share_of_sinks",
)


def moving_sink_summary(metrics: dict[str, Any]) -> dict[str, float | None]:
    """The summary scalars of an analysis (every SUMMARY_KEYS entry; None = not defined, e.g. the
    dedicated-sink metrics of a plain model, or a norm rank when no content sink was detected)."""
    summary = metrics.get("sinks", metrics)["summary"]
    return {key: summary.get(key) for key in SUMMARY_KEYS}


def uniform_baselines(tr: Trajectory, mask_id: int, sinks: Tensor | None = None,
                      gu_threshold: float = DEFAULT_GU_THRESHOLD) -> dict[str, float]:
    """What the summary metrics would read if every query attended uniformly over its valid keys (and
    a head's most-attended key were drawn uniformly at every step), with the same detected sinks:
    the reference each share is read against, computed exactly (no simulation). Metrics without a
    uniform reference are left out (the fixed-text and one-token-reveal nulls cover those)."""
    if sinks is None:
        sinks = torch.zeros_like(tr.colsum, dtype=torch.bool)
    cells, everything = Cells(tr, sinks, mask_id, gu_threshold), POOLING["summary"][0]
    content_valid = tr.key_valid.clone()
    content_valid[..., :tr.n_sink] = False
    is_mask = (tr.tokens == mask_id) & tr.query_valid
    per_key = cells.queries / cells.n_keys  # what each key gets under uniform attention
    out = {
        "gu_sink_rate": (1 / cells.n_keys > gu_threshold).float().mean(),  # every key draws 1/K
        "mask_absorption": cells.uniform_share(cells.mask_keys.sum(-1).float(), everything),
        "mask_absorption_ratio": 1.0,
        "sink_mass": pooled(per_key * sinks.sum(-1), cells.queries, everything),
        "dominant_stability": movement.uniform_stability(tr.key_valid),
        "content_dominant_stability": movement.uniform_stability(content_valid),
        "distinct_dominant_positions": movement.uniform_distinct(tr.key_valid),
        "event_locked_change": 0.0,  # the top key ignores the input: a reveal changes nothing
        "cross_layer_stability": movement.uniform_same_layer(tr.key_valid),
        "value_attention_spearman": 0.0,
        "mask_share_of_sinks": is_mask.sum().item() / tr.query_valid.sum().clamp(min=1).item(),
        **{f"{kind}_{stat}_sinks": NORM_BASELINES[stat] for kind in NORMS for stat in NORM_BASELINES},
    }
    if tr.n_sink:
        content = cells.content_sinks.sum(-1)
        out["absorption_rate"] = cells.uniform_absorption(everything)
        out["absorption_ratio"] = 1.0
        out["dedicated_top1_rate"] = (tr.n_sink / cells.n_keys).mean()
        out["dedicated_capture_share"] = pooled(per_key * tr.n_sink, per_key * (tr.n_sink + content), everything)
        out.update({f"{kind}_{stat}_dedicated": NORM_BASELINES[stat] for kind in NORMS
                    for stat in ("rank", "norm_ratio")})
    return {k: float(v) for k, v in out.items()}
