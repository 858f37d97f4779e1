"""Does a pretrained AR model's first-token sink survive bidirectional attention, and does it break
when its anchor (position 0) is masked? Forward passes only (docs/study-smollm2.md).

Each window is masked at each level once (record.masked_inputs), then fed twice: with position 0
shown and with position 0 masked, the rest of the mask identical, so the split by position 0 is
paired and balanced at every level. Every number is first computed per window (pooled over the
window's heads, per layer), then averaged over windows with a t interval over windows.

    python -m sinkdlm.experiments.pretrained_sinks --model causal=/work/smol/plain:causal \
        --model plain=/work/smol/plain --model sink=/work/smol/sink --data /work/demo-runs/data --out OUT
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from sinkdlm import intervals
from sinkdlm.analysis.record import masked_inputs, record_inputs
from sinkdlm.analysis.stats import DEFAULT_GU_THRESHOLD, KEY_TYPES, Cells, Trajectory, detect_gu
from sinkdlm.errors import EXIT_BAD_INPUT, UserError

LEVELS = (0.1, 0.25, 0.5, 0.75)
SPLITS = ("visible", "masked")  # position 0 shown / replaced by [MASK]
GU_METRICS = tuple(f"gu_sink_rate_{kind}" for kind in KEY_TYPES)
METRICS = ("gu_sink_rate", *GU_METRICS, "pos0_share", "pos0_ratio", "dedicated_share", "dedicated_ratio",
           "mask_absorption_ratio")
DELTA_METRICS = ("gu_sink_rate", "gu_sink_rate_first", "gu_sink_rate_mask", "pos0_share", "dedicated_share",
                 "mask_absorption_ratio")


def paired_inputs(windows: Tensor, levels: Sequence[float], seed: int, mask_id: int) -> list[Tensor]:
    """Per level, the same random mask twice: position 0 shown, then position 0 masked (step 2i, 2i+1)."""
    out = []
    for i, level in enumerate(levels):
        noisy = masked_inputs(windows, level, i, seed, mask_id)
        shown, hidden = noisy.clone(), noisy.clone()
        shown[:, 0], hidden[:, 0] = windows[:, 0], mask_id
        out += [shown, hidden]
    return out


def uniform_shares(tokens: Tensor, mask_id: int, n_sink: int, causal: bool) -> tuple[Tensor, Tensor]:
    """(S, B, T) inputs -> the shares that position 0 and the [MASK] keys would draw, (S, B) each, if
    every query attended uniformly over the keys it may see (all of them, or the sinks and the keys
    up to itself under causal attention)."""
    is_mask = (tokens == mask_id).float()
    length = tokens.shape[-1]
    if causal:
        seen = n_sink + torch.arange(1, length + 1, dtype=torch.float32)  # keys query i sees
        return (1 / seen).mean(), (is_mask.cumsum(-1) / seen).mean(-1)
    return torch.tensor(1 / (n_sink + length)), is_mask.sum(-1) / (n_sink + length)


def window_metrics(tr: Trajectory, mask_id: int, gu_threshold: float = DEFAULT_GU_THRESHOLD,
                   causal: bool = False) -> dict[str, Tensor]:
    """Per (step, layer, window): each metric pooled over the heads of that layer. The share of
    position 0 is the attention its key draws whatever its input ([MASK] or the first token); the
    ratios divide a share by its uniform-attention share (uniform_shares)."""
    valid = tr.key_valid[:, None, :, None, :]
    cells = Cells(tr, detect_gu(tr.colsum, gu_threshold, valid), mask_id, gu_threshold)
    shares = cells.shares((3,))  # (S, L, B)
    n, colsum = tr.n_sink, tr.colsum.sum(3)  # heads summed: (S, L, B, K)
    total = colsum.sum(-1)
    pos0_uniform, mask_uniform = uniform_shares(tr.tokens, mask_id, n, causal)
    out = {name: shares[name] for name in ("gu_sink_rate", *GU_METRICS) if name in shares}
    out["pos0_share"] = colsum[..., n] / total
    out["pos0_ratio"] = out["pos0_share"] / pos0_uniform
    mask_share = (colsum * cells.mask_keys[:, :, :, 0]).sum(-1) / total
    out["mask_absorption_ratio"] = mask_share / mask_uniform[:, None]  # NaN/inf-free: every input has a mask
    if n:
        out["dedicated_share"] = colsum[..., :n].sum(-1) / total
        out["dedicated_ratio"] = out["dedicated_share"] * (n + tr.tokens.shape[-1]) / n
    return out


def summarize(values: Tensor) -> dict[str, Any]:
    """(B,) per-window values -> mean and 95% t interval over the windows (NaN windows left out)."""
    kept = [float(v) for v in values.tolist() if v == v]
    if not kept:
        return {"mean": None, "lo": None, "hi": None, "windows": 0}
    ci = intervals.t_interval(kept)
    return {"mean": sum(kept) / len(kept), "lo": ci[0] if ci else None, "hi": ci[1] if ci else None,
            "windows": len(kept)}


def rows_of(per_window: dict[str, Tensor], levels: Sequence[float]) -> list[dict[str, Any]]:
    """One row per (level, position-0 split), pooled over layers and per layer, plus one paired
    'masked - visible' row per level."""
    rows = []
    for i, level in enumerate(levels):
        for j, split in enumerate(SPLITS):
            step = 2 * i + j
            pooled = {m: summarize(v[step].mean(0)) for m, v in per_window.items()}
            per_layer = {m: [summarize(layer) for layer in v[step]] for m, v in per_window.items()}
            rows.append({"level": level, "position0": split, "pooled": pooled, "per_layer": per_layer})
        delta = {m: summarize(per_window[m][2 * i + 1].mean(0) - per_window[m][2 * i].mean(0))
                 for m in DELTA_METRICS if m in per_window}
        rows.append({"level": level, "position0": "masked - visible", "pooled": delta})
    return rows


def measure(model, windows: Tensor, levels: Sequence[float] = LEVELS, seed: int = 0,
            gu_threshold: float = DEFAULT_GU_THRESHOLD, progress: bool = False) -> list[dict[str, Any]]:
    """The rows of one model on the given (B, T) windows (see rows_of)."""
    if windows.shape[1] < 2:
        raise UserError(f"windows of {windows.shape[1]} tokens are too short; use at least 2")
    tr = record_inputs(model, paired_inputs(windows, levels, seed, model.mask_id), progress=progress,
                       desc="forwards")
    return rows_of(window_metrics(tr, model.mask_id, gu_threshold, model.cfg.causal), levels)


def heldout_windows(data_dir: Path, tokenizer, n: int, length: int) -> Tensor:
    """n evenly spaced windows of `length` tokens from a prepared folder's val split, decoded with the
    folder's tokenizer and re-encoded with the model's (`tokenizers.Tokenizer`)."""
    from sinkdlm.data.shards import read_meta, split_shards, token_dtype
    from sinkdlm.data.tokenizer import read_tokenizer_file

    meta = read_meta(data_dir)
    ids = np.concatenate([np.fromfile(data_dir / f, dtype=token_dtype(meta["vocab_size"]))
                          for f, _ in split_shards(meta, "val")])
    text = read_tokenizer_file(data_dir / meta["tokenizer_file"], "re-prepare the data").decode(ids.tolist())
    tokens = tokenizer.encode(text).ids
    if len(tokens) < n * length:
        raise UserError(f"{data_dir}'s val split has {len(tokens)} model tokens, fewer than {n} windows of "
                        f"{length}; lower --windows or --length")
    starts = np.linspace(0, len(tokens) - length, n).round().astype(int)
    return torch.tensor([tokens[s:s + length] for s in starts])


def _fmt(cell: dict[str, Any] | None) -> str:
    if not cell or cell["mean"] is None:
        return "-"
    if cell["lo"] is None:
        return f"{cell['mean']:.3f}"
    return f"{cell['mean']:.3f} [{cell['lo']:.3f}, {cell['hi']:.3f}]"


def markdown(results: dict[str, Any]) -> str:
    """Pooled table per model, the paired deltas, and per-layer means of the key metrics."""
    lines = []
    for name, res in results["models"].items():
        lines += [f"### {name} ({res['path']}, causal={res['causal']}, {res['wall_s']:.0f} s)", "",
                  "| level | pos 0 | " + " | ".join(METRICS) + " |", "|" + "---|" * (len(METRICS) + 2)]
        for row in res["rows"]:
            lines.append(f"| {row['level']} | {row['position0']} | "
                         + " | ".join(_fmt(row["pooled"].get(m)) for m in METRICS) + " |")
        lines += ["", "Per layer (means; gu_first / gu_mask / pos0_ratio / mask_absorption_ratio"
                  + (" / dedicated_ratio" if res["n_sink"] else "") + "):", "",
                  "| level | pos 0 | " + " | ".join(f"L{i}" for i in range(res["n_layer"])) + " |",
                  "|" + "---|" * (res["n_layer"] + 2)]
        keys = ["gu_sink_rate_first", "gu_sink_rate_mask", "pos0_ratio", "mask_absorption_ratio"]
        keys += ["dedicated_ratio"] if res["n_sink"] else []
        for row in (r for r in res["rows"] if "per_layer" in r):
            cells = [" / ".join("-" if row["per_layer"][k][layer]["mean"] is None
                                else f"{row['per_layer'][k][layer]['mean']:.2f}" for k in keys)
                     for layer in range(res["n_layer"])]
            lines.append(f"| {row['level']} | {row['position0']} | " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    from sinkdlm.checkpoint import load_model, load_tokenizer

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", action="append", required=True, help="NAME=CHECKPOINT[:causal], repeatable")
    p.add_argument("--data", type=Path, required=True, help="prepared data folder; its val split is used")
    p.add_argument("--windows", type=int, default=32)
    p.add_argument("--length", type=int, default=64)
    p.add_argument("--levels", type=float, nargs="+", default=list(LEVELS))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--gu-threshold", type=float, default=DEFAULT_GU_THRESHOLD)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--overwrite", action="store_true")
    a = p.parse_args(argv)
    if (a.out / "results.json").exists() and not a.overwrite:
        raise UserError(f"{a.out}/results.json exists; pass --overwrite to replace it, or another --out")
    if a.windows < 2 or not all(0 < level < 1 for level in a.levels):
        raise UserError(f"--windows {a.windows} / --levels {a.levels}: need at least 2 windows (for an "
                        "interval) and levels strictly between 0 and 1")
    specs = []
    for spec in a.model:
        name, _, path = spec.partition("=")
        if not name or not path:
            raise UserError(f"--model {spec!r}: write NAME=CHECKPOINT, or NAME=CHECKPOINT:causal")
        causal = path.endswith(":causal")
        specs.append((name, path.removesuffix(":causal"), causal))
    results = {"windows": a.windows, "length": a.length, "levels": a.levels, "seed": a.seed,
               "gu_threshold": a.gu_threshold, "data": str(a.data), "models": {}}
    for name, path, causal in specs:
        start = time.perf_counter()
        model, cfg = load_model(path, causal=causal)
        windows = heldout_windows(a.data, load_tokenizer(path), a.windows, a.length)
        rows = measure(model, windows, a.levels, a.seed, a.gu_threshold, progress=True)
        results["models"][name] = {"path": path, "causal": causal, "n_sink": cfg.model.sink_tokens,
                                   "n_layer": cfg.model.n_layer, "rows": rows,
                                   "wall_s": time.perf_counter() - start}
        print(f"{name}: {results['models'][name]['wall_s']:.0f} s", flush=True)
    a.out.mkdir(parents=True, exist_ok=True)
    (a.out / "results.json").write_text(json.dumps(results, indent=1))
    (a.out / "results.md").write_text(markdown(results))


if __name__ == "__main__":
    try:
        main()
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)
