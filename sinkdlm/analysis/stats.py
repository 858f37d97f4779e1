"""Attention-sink statistics as pure functions of per-head column sums and norms.

Layout used throughout: keys are [dedicated sinks; content] (the model's observer order, for front
and end placement alike: placement changes the sink's RoPE position, not its key index). A trailing
K axis indexes keys; leading axes are free (step, layer, batch, head ...). `key_valid` marks keys
that are not padding. The incoming attention of key j is the column sum  c_j = sum_i A_ij  over the
real queries i (2510.15731); it sums to the number of queries over j.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
import typing
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor

Rule = Literal["eps", "std", "top1"]  # how a sink is detected (see detect)
RULES: tuple[str, ...] = typing.get_args(Rule)
DEFAULT_EPS = 3.0  # 2510.15731: a sink's column sum exceeds the mean of the others by 3
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


def detect_eps(colsum: Tensor, eps: float = DEFAULT_EPS, key_valid: Tensor | None = None) -> Tensor:
    """2510.15731: key j is a sink when c_j > mean of the other keys' c + eps."""
    valid = _valid(colsum, key_valid)
    c = colsum.masked_fill(~valid, 0.0)
    n = valid.sum(-1, keepdim=True)
    others_mean = (c.sum(-1, keepdim=True) - c) / (n - 1).clamp(min=1)
    return valid & (c > others_mean + eps)


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


def detect(colsum: Tensor, rule: str, key_valid: Tensor | None = None, eps: float = DEFAULT_EPS,
           std_k: float = DEFAULT_STD_K) -> Tensor:
    if rule == "eps":
        return detect_eps(colsum, eps, key_valid)
    if rule == "std":
        return detect_std(colsum, std_k, key_valid)
    if rule == "top1":
        return detect_top1(colsum, key_valid)
    raise ValueError(f"sink rule {rule!r} is not one of {RULES}")


def dominant(colsum: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Index of the most-attended valid key, (...,) long."""
    return colsum.masked_fill(~_valid(colsum, key_valid), float("-inf")).argmax(-1)


# ---- the dedicated sink ---------------------------------------------------------------------------


def absorption_rate(colsum: Tensor, n_sink: int) -> Tensor:
    """Share of all incoming attention that lands on the dedicated sinks (the first n_sink keys)."""
    return colsum[..., :n_sink].sum(-1) / colsum.sum(-1).clamp(min=torch.finfo(colsum.dtype).tiny)


def capture_share(colsum: Tensor, sinks: Tensor, n_sink: int) -> Tensor:
    """Of all sink mass (dedicated sinks + detected content sinks), the dedicated sinks' share."""
    dedicated = colsum[..., :n_sink].sum(-1)
    content = (colsum[..., n_sink:] * sinks[..., n_sink:]).sum(-1)
    return dedicated / (dedicated + content).clamp(min=torch.finfo(colsum.dtype).tiny)


def norm_rank(norms: Tensor, key_valid: Tensor | None = None) -> Tensor:
    """Rank of each key's norm among the valid keys, scaled to [0, 1]: 0 = lowest norm, 1 = highest."""
    valid = _valid(norms, key_valid)
    ranks = norms.masked_fill(~valid, float("inf")).argsort(-1).argsort(-1).float()
    return ranks / (valid.sum(-1, keepdim=True) - 1).clamp(min=1)


# ---- moving sinks: a leading step axis ------------------------------------------------------------


def stability(positions: Tensor) -> Tensor:
    """(S, ...) dominant position per step -> share of consecutive steps where it stays put."""
    if positions.shape[0] < 2:
        return torch.full(positions.shape[1:], float("nan"))
    return (positions[1:] == positions[:-1]).float().mean(0)


def consecutive_iou(sets: Tensor) -> Tensor:
    """(S, ..., K) bool sink sets -> mean IoU of consecutive steps (two empty sets count as 1)."""
    if sets.shape[0] < 2:
        return torch.full(sets.shape[1:-1], float("nan"))
    a, b = sets[1:], sets[:-1]
    inter, union = (a & b).sum(-1).float(), (a | b).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(union)).mean(0)


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


def mask_share(sets: Tensor, tokens: Tensor, n_sink: int, mask_id: int) -> Tensor:
    """Per layer: share of detected content sinks whose input token is [MASK]. sets (S, L, B, H, K)."""
    content = sets[..., n_sink:]
    is_mask = (tokens == mask_id)[:, None, :, None, :]  # (S, 1, B, 1, T)
    n = content.sum(dim=(0, 2, 3, 4)).float()
    return (content & is_mask).sum(dim=(0, 2, 3, 4)).float() / n.clamp(min=1)


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


def detected_sets(tr: Trajectory, eps: float, std_k: float) -> dict[str, Tensor]:
    valid = tr.key_valid[:, None, :, None, :]
    return {rule: detect(tr.colsum, rule, valid, eps, std_k) for rule in RULES}


def _per_layer_head(tr: Trajectory, sinks: Tensor) -> dict[str, Tensor]:
    """(L, H) tables, averaged over steps and sequences."""
    n_keys = tr.colsum.shape[-1]
    valid = tr.key_valid[:, None, :, None, :]
    content_valid = valid.clone()
    content_valid[..., : tr.n_sink] = False
    dom_all, dom_content = dominant(tr.colsum, valid), dominant(tr.colsum, content_valid)
    out = {
        "sink_mass": (tr.share() * sinks).sum(-1).mean(dim=(0, 2)),
        "n_sinks": sinks.sum(-1).float().mean(dim=(0, 2)),
        "stability": nan_mean(stability(dom_all), 1),
        "stability_content": nan_mean(stability(dom_content), 1),
        "iou": nan_mean(consecutive_iou(sinks), 1),
        "distinct_dominant": distinct_positions(dom_all, n_keys).float().mean(1),
        "distinct_sinks": distinct_sinks(sinks).float().mean(1),
    }
    if tr.n_sink:
        out["absorption"] = absorption_rate(tr.colsum, tr.n_sink).mean(dim=(0, 2))
        out["capture_share"] = capture_share(tr.colsum, sinks, tr.n_sink).mean(dim=(0, 2))
    return out


def _value_ranks(tr: Trajectory, sinks: Tensor) -> dict[str, Tensor]:
    """Per layer: mean norm rank (0 = lowest of all keys) of detected content sinks / dedicated sinks."""
    valid = tr.key_valid[:, None, :, None, :]
    ranks = norm_rank(tr.value_norm, valid)
    content = sinks.clone()
    content[..., : tr.n_sink] = False
    others = valid & ~sinks
    dims = (0, 2, 3, 4)
    out = {
        "value_rank_sinks": (ranks * content).sum(dims) / content.sum(dims).clamp(min=1),
        "value_norm_sinks": (tr.value_norm * content).sum(dims) / content.sum(dims).clamp(min=1),
        "value_norm_others": (tr.value_norm * others).sum(dims) / others.sum(dims).clamp(min=1),
    }
    for key in ("value_rank_sinks", "value_norm_sinks"):  # undefined where no content sink was seen
        out[key][content.sum(dims) == 0] = float("nan")
    if tr.n_sink:
        out["value_rank_dedicated"] = ranks[..., : tr.n_sink].mean(dim=(0, 2, 3, 4))
        out["value_norm_dedicated"] = tr.value_norm[..., : tr.n_sink].mean(dim=(0, 2, 3, 4))
        out["key_norm_dedicated"] = tr.key_norm[..., : tr.n_sink].mean(dim=(0, 2, 3, 4))
    out["key_norm_content"] = (tr.key_norm[..., tr.n_sink:] * tr.key_valid[:, None, :, None, tr.n_sink:]
                               ).sum(dims) / tr.key_valid[:, None, :, None, tr.n_sink:].sum(dims).clamp(min=1)
    return out


def dominant_by_layer(tr: Trajectory, item: int = 0) -> Tensor:
    """(L, S) position of the most-attended key (heads summed) of sequence `item`; sinks < 0."""
    colsum = tr.colsum[:, :, item].sum(2)  # (S, L, K)
    return tr.positions(dominant(colsum, tr.key_valid[:, None, item])).T


def trajectory_metrics(tr: Trajectory, mask_id: int, eps: float = DEFAULT_EPS, std_k: float = DEFAULT_STD_K,
                       rule: str = "eps") -> dict[str, Any]:
    """Every sink metric of a recording; tables are nested lists [layer][head] / [layer]."""
    sets = detected_sets(tr, eps, std_k)
    main = sets[rule]
    per_rule = {}
    for name, s in sets.items():
        content = s[..., tr.n_sink:]
        per_rule[name] = {"n_sinks": s.sum(-1).float().mean(), "content_sinks": content.sum(-1).float().mean(),
                          "iou": nan_mean(consecutive_iou(s)), "distinct_sinks": distinct_sinks(s).float().mean()}
    counts = sink_token_counts(main, tr.tokens, tr.n_sink)
    return to_py({
        "rule": rule, "eps": eps, "std_k": std_k, "steps": tr.n_steps, "layers": tr.layers,
        "n_sink": tr.n_sink, "heads": tr.colsum.shape[3],
        "per_layer_head": _per_layer_head(tr, main),
        "per_layer": {**_value_ranks(tr, main), "mask_share": mask_share(main, tr.tokens, tr.n_sink, mask_id),
                      "dominant_position": dominant_by_layer(tr)},
        "rules": per_rule,
        "sink_tokens": [[tok, n] for tok, n in counts.most_common(TOP_TOKENS)],
    })


SUMMARY_KEYS = {  # summary name -> (table, key)
    "dominant_stability": ("per_layer_head", "stability"),
    "content_dominant_stability": ("per_layer_head", "stability_content"),
    "sink_set_iou": ("per_layer_head", "iou"),
    "distinct_dominant_positions": ("per_layer_head", "distinct_dominant"),
    "distinct_sink_positions": ("per_layer_head", "distinct_sinks"),
    "sink_mass": ("per_layer_head", "sink_mass"),
    "absorption_rate": ("per_layer_head", "absorption"),
    "dedicated_capture_share": ("per_layer_head", "capture_share"),
    "value_rank_sinks": ("per_layer", "value_rank_sinks"),
    "value_rank_dedicated": ("per_layer", "value_rank_dedicated"),
    "mask_share_of_sinks": ("per_layer", "mask_share"),
}


def moving_sink_summary(metrics: dict[str, Any]) -> dict[str, float | None]:
    """Scalars a study can tabulate: each table averaged over layers (and heads); None = not defined
    (e.g. dedicated-sink metrics of a plain model, or a rank when no content sink was detected)."""
    m = metrics.get("sinks", metrics)
    out: dict[str, float | None] = {}
    for name, (table, key) in SUMMARY_KEYS.items():
        values = m[table].get(key)
        flat = torch.tensor(_flatten(values), dtype=torch.float64) if values is not None else torch.empty(0)
        out[name] = None if not flat.numel() or flat.isnan().all() else round(float(flat.nanmean()), 6)
    return out


def _flatten(values: Any) -> list[float]:
    if isinstance(values, list):
        return [v for item in values for v in _flatten(item)]
    return [float("nan") if values is None else float(values)]


def uniform_baselines(tr: Trajectory, mask_id: int) -> dict[str, float]:
    """What the summary metrics would read if every head attended uniformly (or chose its dominant key
    uniformly at random at every step), with the recording's mean numbers of keys: the reference each
    share is read against. Metrics without a simple uniform reference are left out."""
    keys = tr.key_valid.sum(-1).float().mean().item()  # K: dedicated sinks + real content keys
    content = keys - tr.n_sink
    steps = tr.n_steps
    is_mask = (tr.tokens == mask_id) & tr.query_valid
    out = {
        "dominant_stability": 1 / keys,
        "content_dominant_stability": 1 / content,
        "distinct_dominant_positions": keys * (1 - (1 - 1 / keys) ** steps),  # expected distinct of S draws
        "value_rank_sinks": 0.5,  # a key picked at random sits mid-way in the norm ranking
        "mask_share_of_sinks": is_mask.sum().item() / tr.query_valid.sum().clamp(min=1).item(),
    }
    if tr.n_sink:
        out["absorption_rate"] = tr.n_sink / keys
        out["value_rank_dedicated"] = 0.5
    return out
