"""Sinks over training: the sink analysis of several checkpoints of a run, or of every run of a study
folder, one row of summary metrics per checkpoint, and a figure of the headline metrics against the
training step (tokens on the top axis), one line per variant (mean over seeds, error bars = sd).

Each run's rows are cached in <out>/<run>.json with the analysis settings: a second call analyses only
the checkpoints it has not seen, so a study that stopped part-way continues.
"""

from __future__ import annotations

import json
import re
import statistics
from collections.abc import Callable, Sequence
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from sinkdlm import checkpoint as ckpt
from sinkdlm.analysis.pipeline import AnalysisConfig, analyze_checkpoint
from sinkdlm.analysis.stats import to_py
from sinkdlm.errors import UserError
from sinkdlm.fields import comma_ints
from sinkdlm.files import atomic_write

ROWS_FILE = "training.json"
FIGURE_FILE = "training.png"
TABLE_FILE = "training.md"
RUN_NAME = re.compile(r"^(?P<variant>.+)-seed(?P<seed>\d+)$")  # how `sinkdlm study` names its runs
# panel metric -> (title, its uniform reference line or None, whether it is a share in [0, 1])
CURVES = {
    "gu_sink_rate": ("Gu sink rate (heads with > 0.3 on one key)", None, True),
    "gu_sink_rate_dedicated": ("Gu rate won by the dedicated sink", None, True),
    "mask_absorption_ratio": ("[MASK] keys' attention / uniform share", 1.0, False),
    "absorption_ratio": ("absorption / its uniform baseline", 1.0, False),
    "dominant_stability": ("dominant-key stability (dotted: one-token-reveal null)", None, True),
    "value_rank_same_type_sinks": ("content sinks' value rank among their kind", 0.5, True),
    "value_rank_dedicated": ("dedicated sink's value-norm rank (weighted)", 0.5, True),
    "val_elbo": ("validation ELBO (nats/token)", None, False),
}
PANELS_PER_ROW = 4
NULL_CURVE = ("dominant_stability", "one_token_reveal")  # drawn dotted beside its metric


def parse_steps(text: str) -> str | list[int]:
    """`all` or comma-separated training steps, e.g. 100,200."""
    if text.strip() == "all":
        return "all"
    return comma_ints(text, f"--checkpoint-steps {text!r} should be `all` or comma-separated steps, e.g. 200,400")


def find_runs(path: str | Path) -> list[Path]:
    """A run folder itself, or every run folder (one holding step-* checkpoints) directly under a study."""
    root = Path(path)
    if ckpt.list_checkpoints(root):
        return [root]
    runs = sorted(p for p in root.iterdir() if p.is_dir() and ckpt.list_checkpoints(p)) if root.is_dir() else []
    if not runs:
        raise UserError(f"{root} holds no step-* checkpoints and no run folders with some; pass a run folder "
                        f"(train.out_dir) or a study folder")
    return runs


def select_checkpoints(run: Path, steps: str | Sequence[int]) -> list[Path]:
    found = {int(ckpt.load_meta(p)["step"]): p for p in ckpt.list_checkpoints(run)}
    if steps == "all":
        return [found[s] for s in sorted(found)]
    missing = [s for s in steps if s not in found]
    if missing:
        raise UserError(f"{run} has no checkpoint at step(s) {missing}; it has {sorted(found)} (train.save_every "
                        f"and train.keep_last decide which are kept)")
    return [found[s] for s in steps]


def run_label(run: Path) -> tuple[str, int | None]:
    """(variant, seed) from a study's `<variant>-seed<S>` folder name; else (folder name, None)."""
    match = RUN_NAME.match(run.name)
    return (match["variant"], int(match["seed"])) if match else (run.name, None)


def analyze_run(run: Path, steps: str | Sequence[int], settings: AnalysisConfig, cache: Path,
                texts: Sequence[str] | None = None, prompts: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """One row per chosen checkpoint of `run`; rows cached in `cache` under the same settings are reused."""
    key = to_py(asdict(settings))
    known: dict[int, dict] = {}
    if cache.is_file():
        stored = json.loads(cache.read_text())
        if stored.get("settings") == key and stored.get("texts") == texts and stored.get("prompts") == prompts:
            known = {row["step"]: row for row in stored["rows"]}
    variant, seed = run_label(run)
    rows = []
    for folder in select_checkpoints(run, steps):
        meta = ckpt.load_meta(folder)
        if meta["step"] not in known:
            metrics = analyze_checkpoint(folder, texts, prompts, settings)
            known[meta["step"]] = {"run": run.name, "variant": variant, "seed": seed, "step": meta["step"],
                                   "tokens": meta.get("tokens"), "val_elbo": to_py(meta.get("val_loss")),
                                   **metrics["summary"], "baselines": metrics["baselines"],
                                   "nulls": metrics.get("nulls")}
            _write_json(cache, {"settings": key, "texts": texts, "prompts": prompts,
                                "rows": [known[s] for s in sorted(known)]})
        rows.append(known[meta["step"]])
    return rows


def _write_json(path: Path, data: Any) -> None:
    """Write atomically: a kill part-way leaves the previous file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, json.dumps(data, indent=1))


def analyze_over_training(path: str | Path, out: str | Path, steps: str | Sequence[int] = "all",
                          settings: AnalysisConfig | None = None, texts: Sequence[str] | None = None,
                          prompts: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Analyse the chosen checkpoints of a run or of every run of a study; write training.json,
    training.md and training.png into `out`. Returns the rows."""
    s = replace(settings or AnalysisConfig(), interventions=False, progress=False)
    out = Path(out)
    rows = []
    for run in find_runs(path):
        rows += analyze_run(run, steps, s, out / f"{run.name}.json", texts, prompts)
    write_training(rows, out, f"sinks over training: {Path(path).name}")
    return rows


def write_training(rows: list[dict[str, Any]], out: Path, title: str) -> None:
    """training.json, training.md and training.png of the rows into `out`."""
    _write_json(out / ROWS_FILE, rows)
    (out / TABLE_FILE).write_text(training_table(rows))
    plot_training(rows, out / FIGURE_FILE, title)


def by_variant(rows: list[dict[str, Any]], metric: str,
               source: Callable[[dict], dict] = lambda row: row) -> dict[str, list[tuple[int, float, float, int]]]:
    """variant -> [(step, mean, sd over seeds, n)] of `metric` in source(row), where it is defined."""
    out: dict[str, list[tuple[int, float, float, int]]] = {}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        points = []
        for step in sorted({r["step"] for r in rows if r["variant"] == variant}):
            values = [source(r).get(metric) for r in rows if r["variant"] == variant and r["step"] == step]
            values = [v for v in values if v is not None]
            if values:
                sd = statistics.stdev(values) if len(values) > 1 else 0.0
                points.append((step, statistics.fmean(values), sd, len(values)))
        out[variant] = points
    return out


def training_table(rows: list[dict[str, Any]]) -> str:
    """Markdown: one line per (variant, step), the curve metrics as mean ± sd over seeds."""
    lines = ["| variant | step | tokens | seeds | " + " | ".join(CURVES) + " |", "|---" * (len(CURVES) + 4) + "|"]
    curves = {metric: by_variant(rows, metric) for metric in CURVES}
    for variant in dict.fromkeys(r["variant"] for r in rows):
        for step in sorted({r["step"] for r in rows if r["variant"] == variant}):
            same = [r for r in rows if r["variant"] == variant and r["step"] == step]
            cells = []
            for metric in CURVES:
                point = next((p for p in curves[metric][variant] if p[0] == step), None)
                cells.append("n/a" if point is None else
                             f"{point[1]:.3f}" + (f" ± {point[2]:.3f}" if point[3] > 1 else "")
                             + (f" (n={point[3]})" if point[3] < len(same) else ""))  # defined in fewer seeds
            lines.append(f"| {variant} | {step} | {same[0].get('tokens')} | {len(same)} | " + " | ".join(cells) + " |")
    return "\n".join(lines + ["", "Cells: mean ± standard deviation over the seeds (the value alone with one "
                                  "seed); (n=K): defined in only K of the row's seeds; n/a: undefined (no "
                                  "dedicated sink, or no content sink detected).", ""])


def plot_training(rows: list[dict[str, Any]], path: Path, title: str) -> Path:
    """The CURVES panels against training step, tokens on the top axis, one line per variant."""
    from sinkdlm.analysis.plots import plt, save  # says in one line when matplotlib is missing

    Line2D = plt.Line2D

    ncols = PANELS_PER_ROW
    fig, axes = plt.subplots(-(-len(CURVES) // ncols), ncols, figsize=(5.0 * ncols, 8.0), squeeze=False,
                             layout="constrained")
    variants = list(dict.fromkeys(r["variant"] for r in rows))
    colours = {v: plt.cm.tab10.colors[i % 10] for i, v in enumerate(variants)}
    null_metric, null_name = NULL_CURVE
    nulls = by_variant(rows, null_metric, lambda row: (row.get("nulls") or {}).get(null_name) or {})
    for ax, (metric, (label, reference, share)) in zip(axes.flat, CURVES.items()):
        curves = by_variant(rows, metric)
        for variant, points in curves.items():
            if points:
                steps, means, sds, _ = zip(*points)
                ax.errorbar(steps, means, yerr=sds, color=colours[variant], marker="o", ms=4, capsize=3)
            if metric == null_metric and nulls.get(variant):
                steps, means, _, _ = zip(*nulls[variant])
                ax.plot(steps, means, color=colours[variant], ls=":", lw=1)
        if reference is not None:
            ax.axhline(reference, color="0.4", lw=0.8, ls="--")
        if not any(curves.values()):
            ax.text(0.5, 0.7, "undefined for every run", transform=ax.transAxes, ha="center", color="0.4")
        if share:
            ax.set_ylim(0, 1)
        ax.set_title(label, fontsize=10)
        ax.set_xlabel("training step")
        ax.grid(alpha=0.3)
        _tokens_axis(ax, rows)
    handles = [Line2D([], [], color=colours[v], marker="o", label=v) for v in variants]
    handles += [Line2D([], [], color="0.4", ls="--", lw=0.8, label="uniform baseline")]
    fig.legend(handles=handles, loc="outside lower center", ncols=min(len(handles), 6), fontsize=9)
    seeds = max((len({r["seed"] for r in rows if r["variant"] == v}) for v in variants), default=1)
    fig.suptitle(title + ("" if seeds == 1 else f"\nmean over {seeds} seeds, error bars: sd"))
    return save(fig, path)


def _tokens_axis(ax, rows: list[dict[str, Any]]) -> None:
    """Training tokens on the top axis, when every run sees the same tokens per step."""
    rates = {r["tokens"] / r["step"] for r in rows if r.get("tokens") and r["step"]}
    if len(rates) == 1:
        rate = rates.pop()
        top = ax.secondary_xaxis("top", functions=(lambda s: s * rate, lambda t: t / rate))
        top.set_xlabel("training tokens", fontsize=8)
