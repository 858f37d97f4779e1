"""Probes of the synthetic copy task (sinkdlm.data.synthetic): copy accuracy, the ELBO per mask-ratio
bin, and where each head's attention goes for active and dormant queries (docs/study-mechanism.md).

A window is masked with a fixed seed per (mask level, window index), so a probe's number for a
window never depends on the other windows of its batch. **Active** queries are masked copy targets
whose rule inputs (the trigger and the copy source) are visible; **dormant** queries are the other
masked positions. Keys are the model's observer order: [dedicated sinks; content].
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from sinkdlm import diffusion
from sinkdlm.analysis.stats import DEFAULT_GU_THRESHOLD
from sinkdlm.data.synthetic import NO_SOURCE, CopyRule, active_sources
from sinkdlm.errors import UserError
from sinkdlm.files import atomic_write

MASK_LEVELS = (0.15, 0.5)  # the pre-registered levels (docs/study-mechanism.md)
ELBO_BINS = 5  # t in [0, 0.2), [0.2, 0.4), ..., [0.8, 1.0]
T_PER_BIN = 8  # t values per bin: the bin's midpoints of 8 equal parts
# Gu et al. 2024: a head has a sink when its mean attention on one key exceeds this; the analysis' threshold. The
# probes count per (window, head) with their own key types (EOS is a type of the synthetic task)
GU_EPSILON = DEFAULT_GU_THRESHOLD
KEY_TYPES = ("sink", "mask", "eos", "first", "content")  # the winning key's type, in this precedence
LEVEL_STREAM = 2**20  # keeps the probe masks apart from training's (seed, step, index) draws


def masked_windows(windows: Tensor, level: float, seed: int, mask_id: int) -> tuple[Tensor, Tensor]:
    """(noisy, masked): each token masked with probability `level`, drawn per (seed, level, window)."""
    n, length = windows.shape
    uniforms = diffusion.draw_uniforms(seed, LEVEL_STREAM + round(level * 1e6), range(n), length)
    return diffusion.mask_tokens(windows, torch.full((n,), float(level)), uniforms, mask_id)


@torch.no_grad()
def copy_accuracy(model, windows: Tensor, task: CopyRule, level: float, seed: int = 0,
                  mask_id: int | None = None) -> tuple[int, int]:
    """(correct, active queries): the argmax prediction equals the true token at active queries.
    `mask_id`: the model's unless given (a wrapped model has none of its own)."""
    noisy, masked = masked_windows(windows, level, seed, model.mask_id if mask_id is None else mask_id)
    active = active_sources(windows, masked, task) != NO_SOURCE
    if not active.any():
        return 0, 0
    device = next(model.parameters()).device
    logits = model(noisy.to(device)).float().cpu()
    return int((logits.argmax(-1) == windows)[active].sum()), int(active.sum())


def bin_levels(bins: int = ELBO_BINS, per_bin: int = T_PER_BIN) -> list[list[float]]:
    """The t values of each bin: bin b's midpoints of `per_bin` equal parts of [b / bins, (b + 1) / bins)."""
    return [[(b + (j + 0.5) / per_bin) / bins for j in range(per_bin)] for b in range(bins)]


@torch.no_grad()
def elbo_by_bin(model, windows: Tensor, seed: int = 0, bins: int = ELBO_BINS,
                per_bin: int = T_PER_BIN, mask_id: int | None = None) -> list[float]:
    """Per mask-ratio bin, the training objective in nats/token: the mean over the bin's t of
    sum over masked tokens of CE / t, divided by the tokens (n x T)."""
    device = next(model.parameters()).device
    mask_id = model.mask_id if mask_id is None else mask_id
    out = []
    for levels in bin_levels(bins, per_bin):
        total = 0.0
        for t in levels:
            noisy, masked = masked_windows(windows, t, seed, mask_id)
            logits = model(noisy.to(device)).float().cpu()
            ce = F.cross_entropy(logits.flatten(0, 1), windows.flatten(), reduction="none").view_as(windows)
            total += float((ce * masked).sum()) / t / windows.numel()
        out.append(total / len(levels))
    return out


# ---- attention: where active and dormant queries look -----------------------------------------------


@torch.no_grad()
def attention_maps(model, noisy: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """Per layer, the attention (n, H, T, K) and the values' L2 norms (n, H, K) of one forward."""
    probs: dict[int, Tensor] = {}
    norms: dict[int, Tensor] = {}

    def observe(layer: int, p: Tensor, keys: Tensor, values: Tensor, n_sink: int) -> None:
        probs[layer] = p.float().cpu()
        norms[layer] = values.float().norm(dim=-1).expand(p.shape[0], -1, -1).cpu()

    device = next(model.parameters()).device
    model(noisy.to(device), observer=observe)
    return [probs[i] for i in sorted(probs)], [norms[i] for i in sorted(norms)]


def key_types(noisy: Tensor, n_sink: int, mask_id: int, eos: int) -> Tensor:
    """(n, K) index into KEY_TYPES of every key: sink, [MASK], EOS, the first content position, other."""
    n, length = noisy.shape
    types = torch.full((n, n_sink + length), KEY_TYPES.index("content"))
    content = types[:, n_sink:]
    content[:, 0] = KEY_TYPES.index("first")
    content[noisy == eos] = KEY_TYPES.index("eos")
    content[noisy == mask_id] = KEY_TYPES.index("mask")
    types[:, :n_sink] = KEY_TYPES.index("sink")
    return types


def gu_rates(probs: Tensor, types: Tensor, epsilon: float = GU_EPSILON) -> dict[str, float]:
    """Gu et al.'s rate for one layer: the share of (window, head) whose mean attention over all
    queries on one key exceeds epsilon, in total and split by that key's type; and the largest such
    mean (how close the layer is to a sink)."""
    mean = probs.mean(dim=2)  # (n, H, K): mean attention of each head on each key
    top, where = mean.max(dim=-1)
    has = top > epsilon
    winner = types.gather(1, where)  # (n, H)
    out = {"rate": float(has.float().mean()), "max_key_attention": float(top.max())}
    for i, name in enumerate(KEY_TYPES):
        out[f"rate_{name}"] = float((has & (winner == i)).float().mean())
    return out


def _query_mean(values: Tensor, queries: Tensor) -> Tensor:
    """values (n, H, T) averaged over the selected queries (n, T) of every window and head -> (H,)."""
    if not queries.any():
        return torch.full(values.shape[1:2], float("nan"))
    weight = queries[:, None, :].float()
    return (values * weight).sum((0, 2)) / weight.sum((0, 2))


def head_attention(probs: Tensor, norms: Tensor, noisy: Tensor, sources: Tensor, n_sink: int,
                   mask_id: int) -> dict[str, Tensor]:
    """One layer's per-head (H,) means: attention of active queries on their copy source and on the
    sink, of dormant queries on the sink, dormant mass on [MASK] keys over its uniform share, and
    the sink's value norm over the mean value norm of the head's keys."""
    active = sources != NO_SOURCE
    masked = noisy == mask_id
    dormant = masked & ~active
    on_source = probs[..., n_sink:].gather(3, sources.clamp(min=0)[:, None, :, None].expand(
        -1, probs.shape[1], -1, 1)).squeeze(-1)
    on_sink = probs[..., :n_sink].sum(-1)
    mask_keys = torch.cat([torch.zeros_like(masked[:, :n_sink]), masked], 1)  # (n, K)
    uniform = mask_keys.float().sum(-1) / mask_keys.shape[1]  # (n,) the masks' share of the keys
    mask_mass = (probs * mask_keys[:, None, None, :]).sum(-1) / uniform.clamp(min=1e-9)[:, None, None]
    sink_norm = norms[..., :n_sink].mean(-1) if n_sink else torch.full(norms.shape[:2], float("nan"))
    return {"active_on_source": _query_mean(on_source, active), "active_on_sink": _query_mean(on_sink, active),
            "dormant_on_sink": _query_mean(on_sink, dormant), "dormant_mask_ratio": _query_mean(mask_mass, dormant),
            "sink_value_ratio": (sink_norm / norms.mean(-1)).mean(0)}


def probe(model, windows: Tensor, task: CopyRule, levels: Sequence[float] = MASK_LEVELS, seed: int = 0,
          epsilon: float = GU_EPSILON) -> dict[str, Any]:
    """Every probe at each mask level (docs/study-mechanism.md): copy accuracy, per layer the Gu
    rate by key type, the sink share against uniform, the dormant [MASK] ratio, and the copy head's
    numbers (the head whose active queries look most at the copy source)."""
    n_sink = model.cfg.sink_tokens
    out: dict[str, Any] = {"levels": {}}
    for level in levels:
        correct, total = copy_accuracy(model, windows, task, level, seed)
        noisy, masked = masked_windows(windows, level, seed, model.mask_id)
        sources = active_sources(windows, masked, task)
        probs, norms = attention_maps(model, noisy)
        types = key_types(noisy, n_sink, model.mask_id, task.eos)
        layers, heads = [], []
        for p, v in zip(probs, norms):
            layer = gu_rates(p, types, epsilon)
            layer["sink_share"] = float(p[..., :n_sink].sum(-1).mean()) if n_sink else None
            layer["uniform_share"] = 1.0 / p.shape[-1]
            layers.append(layer)
            heads.append(head_attention(p, v, noisy, sources, n_sink, model.mask_id))
        stacked = {k: torch.stack([h[k] for h in heads]) for k in heads[0]}  # (layers, H)
        best = int(stacked["active_on_source"].flatten().argmax())
        copy_head = divmod(best, stacked["active_on_source"].shape[1])
        out["levels"][str(level)] = {
            "copy_accuracy": correct / total if total else None, "active_queries": total, "layers": layers,
            "copy_head": {"layer": copy_head[0], "head": copy_head[1],
                          **{k: float(v[copy_head]) for k, v in stacked.items()}},
            "heads": {k: v.tolist() for k, v in stacked.items()}}
    return out


# ---- checkpoints and runs ---------------------------------------------------------------------------

DEFAULT_WINDOWS = 64
PROBE_CACHE = "probes.json"


def task_windows(data_path: str | Path, seq_len: int, n: int) -> tuple[CopyRule, Tensor]:
    """The task of a prepared synthetic corpus and n fixed windows of its validation split."""
    from sinkdlm.data.shards import PackedData, fixed_windows

    data = PackedData(data_path)
    if "task" not in data.meta:
        raise UserError(f"{data_path} was not prepared from a synthetic source; the probes need one: "
                        f"sinkdlm prepare --source synthetic:bigram-backcopy --out DIR")
    return CopyRule.from_meta(data.meta), fixed_windows(data.tokens("val"), seq_len, n)


def probe_checkpoint(path: str | Path, n_windows: int = DEFAULT_WINDOWS, levels: Sequence[float] = MASK_LEVELS,
                     seed: int = 0, data: str | Path | None = None) -> dict[str, Any]:
    """Every probe of one checkpoint on its own corpus's validation windows (or `data`'s), plus
    the ELBO per mask-ratio bin."""
    from sinkdlm.checkpoint import load_model, resolve

    model, cfg = load_model(path)
    task, windows = task_windows(data or cfg.data.path, cfg.seq_len, n_windows)
    out = probe(model, windows, task, levels, seed)
    out["elbo_bins"] = elbo_by_bin(model, windows, seed)
    out["checkpoint"] = resolve(path).name
    return out


def probe_run(run_dir: str | Path, n_windows: int = DEFAULT_WINDOWS, levels: Sequence[float] = MASK_LEVELS,
              seed: int = 0, progress: bool = True) -> list[dict[str, Any]]:
    """probe_checkpoint for every checkpoint of a run, oldest first; cached in <run>/probes.json by
    (checkpoint, settings), so a second call probes only new checkpoints."""
    from sinkdlm.checkpoint import list_checkpoints, load_meta

    run = Path(run_dir)
    found = list_checkpoints(run)
    if not found:
        raise UserError(f"no checkpoints in {run}; pass a run folder written by sinkdlm train")
    key = {"windows": n_windows, "levels": list(levels), "seed": seed}
    path = run / PROBE_CACHE
    cache = json.loads(path.read_text()) if path.is_file() else {}
    if cache.get("key") != key:
        cache = {"key": key, "checkpoints": {}}
    rows = []
    for ckpt in tqdm(found, desc=f"probing {run.name}", disable=not progress):
        if ckpt.name not in cache["checkpoints"]:
            row = probe_checkpoint(ckpt, n_windows, levels, seed)
            row["step"] = int(load_meta(ckpt).get("step", 0))
            cache["checkpoints"][ckpt.name] = row
            atomic_write(path, json.dumps(cache, indent=1))
        rows.append(cache["checkpoints"][ckpt.name])
    return rows


def summary_row(row: dict[str, Any], level: float = MASK_LEVELS[0]) -> dict[str, Any]:
    """One table row of a probed checkpoint at one mask level: the pilot's columns."""
    at = row["levels"][str(level)]
    layers, head = at["layers"], at["copy_head"]
    return {"step": row["step"], "copy_accuracy": at["copy_accuracy"],
            "gu_rate": [x["rate"] for x in layers],
            "gu_types": [{k[5:]: x[k] for k in x if k.startswith("rate_") and x[k] > 0} for x in layers],
            "max_key_attention": [x["max_key_attention"] for x in layers],
            "sink_share_x_uniform": [x["sink_share"] / x["uniform_share"] if x["sink_share"] is not None else None
                                     for x in layers],
            "dormant_mask_x_uniform": [_nanmean(v) for v in at["heads"]["dormant_mask_ratio"]],
            "copy_head": f"L{head['layer']}H{head['head']}", "copy_head_dormant_on_sink": head["dormant_on_sink"],
            "copy_head_active_on_sink": head["active_on_sink"], "elbo_bins": row["elbo_bins"]}


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return sum(finite) / len(finite) if finite else math.nan


def markdown_table(runs: dict[str, list[dict[str, Any]]], level: float = MASK_LEVELS[0]) -> str:
    """One row per (run, checkpoint) at one mask level; per-layer columns list layer 0 first."""
    def fmt(values: Sequence[float | None], digits: int = 2) -> str:
        return " / ".join("-" if v is None or math.isnan(v) else f"{v:.{digits}f}" for v in values)

    head = ("| run | step | copy acc | Gu rate per layer (key types) | max mean attention on a key | sink share "
            "x uniform | dormant [MASK] mass x uniform | copy head: dormant / active on sink | ELBO t-bins |\n"
            "|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for name, rows in runs.items():
        for row in rows:
            s = summary_row(row, level)
            types = "; ".join(",".join(f"{k} {v:.3f}" for k, v in t.items()) or "-" for t in s["gu_types"])
            lines.append(f"| {name} | {s['step']} | {s['copy_accuracy']:.3f} | {fmt(s['gu_rate'], 3)} ({types}) | "
                         f"{fmt(s['max_key_attention'])} | {fmt(s['sink_share_x_uniform'])} | "
                         f"{fmt(s['dormant_mask_x_uniform'])} | {s['copy_head']}: "
                         f"{s['copy_head_dormant_on_sink']:.3f} / {s['copy_head_active_on_sink']:.3f} | "
                         f"{fmt(s['elbo_bins'])} |")
    return "\n".join(lines)
