"""A study's statistics, tables and figures: every metric as mean ± sd over seeds, its distance from
its uniform baseline or null model within each variant, and each variant's paired difference from
the reference (same seeds, same data order), all with 95% Student t intervals over the seeds.
"""

from __future__ import annotations

import json
import math
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from sinkdlm.experiments.probe_plots import report_links
from sinkdlm.files import METRICS_LOG, atomic_write
from sinkdlm.intervals import HOLM_NOTE, T_INTERVAL_NOTE, holm, t_interval, t_test_one_sided_p, t_test_p, tost_p

TABLE = "study.md"
RESULTS = "study.json"
REFERENCE = "plain"
# more paired comparisons when both variants ran: gate against sink is the paper's other question
EXTRA_COMPARISONS = (("gate", "sink"), ("gate_matched", "sink"))
ACCURACY_SUFFIX = " acc %"  # benchmark columns: lm-eval's `acc` (not acc_norm), in percent
VAL_ELBO = "val_elbo"
METRIC_PANELS_PER_ROW = 4
LINE_STYLES = ("-", "--", "-.", ":")  # one per variant: curves that coincide stay distinguishable
MARKERS = ("o", "s", "^", "D", "v", "P")
HEADROOM = 1.15  # open-ended metric axes reach this far above the highest point
NOT_RESOLVED = "not resolved"
ALPHA = 0.05  # the pre-registered comparisons' family-wise error rate
SMOOTH_SHARE = 0.02  # the training-loss curve's centred moving average reaches this share of its points each side
IDENTICAL = "identical in every seed"
TABLE_NOTE = ("Cells: mean ± standard deviation over seeds when there are several, else the one value. "
              "val_elbo: validation ELBO in nats/token (lower is better); acc %: lm-eval's `acc` (accuracy, "
              "not acc_norm) in percent. The uniform-baseline row: what each metric reads under uniform "
              "attention over the valid keys (val_elbo: a uniform guess, ln V); a range where variants differ (a "
              "sink adds keys), each variant's in study.json.")
# moving_sink_summary key (or (null model, key)) -> table column. The uniform-attention null is each
# column's uniform baseline (exact), so it has no column of its own.
SINK_COLUMNS = {
    "gu_sink_rate": "Gu sink rate",
    "gu_sink_rate_dedicated": "Gu rate, dedicated sink",
    "mask_absorption_ratio": "[MASK] absorption / uniform",
    "absorption_rate": "absorption",
    "dedicated_top1_rate": "sink top-1 rate",
    "dedicated_capture_share": "dedicated-sink capture",
    "dominant_stability": "dominant-key stability",
    ("fixed_text", "dominant_stability"): "stability, fixed-text null",
    ("one_token_reveal", "dominant_stability"): "stability, one-token-reveal null",
    "event_locked_change": "event-locked change",
    ("one_token_reveal", "event_locked_change"): "event-locked change, one-token-reveal null",
    "sink_set_iou": "sink-set IoU (non-empty pairs)",
    "value_rank_sinks": "sink value-norm mid-rank",
    "value_rank_same_type_sinks": "sink value rank among its kind",
    "value_attention_spearman": "attention-value Spearman",
    "value_rank_dedicated": "dedicated value-norm rank",
}
SIGNED_COLUMNS = {"event-locked change", "event-locked change, one-token-reveal null", "attention-value Spearman"}
# values in [0, 1] (absorption is small, the [MASK] ratio open-ended, the signed ones in [-1, 1])
SHARE_COLUMNS = set(SINK_COLUMNS.values()) - {"absorption", "[MASK] absorption / uniform"} - SIGNED_COLUMNS
# within a variant: metric minus its reference (a column, or None = the metric's uniform baseline)
EXCESS = {
    "Gu rate − uniform": ("Gu sink rate", None),
    "[MASK] absorption ratio − uniform": ("[MASK] absorption / uniform", None),
    "absorption − uniform": ("absorption", None),
    "sink top-1 − uniform": ("sink top-1 rate", None),
    "stability − uniform": ("dominant-key stability", None),
    "stability − fixed-text null": ("dominant-key stability", "stability, fixed-text null"),
    "stability − one-token-reveal null": ("dominant-key stability", "stability, one-token-reveal null"),
    "event-locked − one-token-reveal null": ("event-locked change", "event-locked change, one-token-reveal null"),
    "sink value rank − uniform": ("sink value-norm mid-rank", None),
    "sink value rank among its kind − uniform": ("sink value rank among its kind", None),
    "dedicated value rank − uniform": ("dedicated value-norm rank", None),
}
EXPLORATORY_NOTE = ("Every interval not listed under the pre-registered comparisons is exploratory: a 95% interval "
                    "with no correction for the {n} intervals shown, so about 1 in 20 excludes 0 by chance.")


@dataclass
class Run:
    """One trained (variant, seed) of a study and what was measured on it."""

    variant: str
    seed: int
    out: Path
    metrics: dict[str, float] = field(default_factory=dict)
    baselines: dict[str, float] = field(default_factory=dict)  # column -> its uniform baseline
    info: dict[str, Any] = field(default_factory=dict)  # steps, tokens, epochs, params
    # the same final checkpoint analysed again on other held-out prompts (analysis.pipeline.analysis_noise):
    # column -> value; the analysis seed alone does not move a greedy trajectory
    repeat: dict[str, float] = field(default_factory=dict)


@dataclass
class Interval:
    """A mean over seeds with its sd, n and 95% t interval (None with one seed)."""

    mean: float
    sd: float
    n: int
    low: float | None
    high: float | None
    p: float | None = None  # two-sided t test of mean 0

    @classmethod
    def of(cls, values: list[float]) -> Interval:
        bounds = t_interval(values)
        sd = statistics.stdev(values) if len(values) > 1 else 0.0
        return cls(statistics.fmean(values), sd, len(values), *(bounds or (None, None)), t_test_p(values))

    @property
    def resolved(self) -> bool:
        """Whether the interval excludes zero (a difference told from noise at 95%)."""
        return self.low is not None and (self.low > 0 or self.high < 0)

    def cell(self) -> str:
        if self.low is None:
            return f"{self.mean:.4g} (n=1: no interval)"
        if self.mean == 0 and self.sd == 0:  # e.g. a null model that does not depend on the variant
            return f"0 ({IDENTICAL})"
        return f"{self.mean:.4g} [{self.low:.4g}, {self.high:.4g}]" + ("" if self.resolved else f" {NOT_RESOLVED}")


# ---- statistics -----------------------------------------------------------------------------------


def columns_of(runs: list[Run]) -> list[str]:
    """Every metric column, in first-seen order."""
    columns: list[str] = []
    for run in runs:
        columns += [k for k in run.metrics if k not in columns]
    return columns


def per_variant(runs: list[Run], columns: list[str], field: str = "metrics"
                ) -> dict[str, dict[str, tuple[float, float, int]]]:
    """variant -> column -> (mean, std over seeds, n seeds) of each run's `field` (metrics or baselines)."""
    table: dict[str, dict[str, tuple[float, float, int]]] = {}
    for variant in dict.fromkeys(r.variant for r in runs):
        table[variant] = {}
        for col in columns:
            values = [getattr(r, field)[col] for r in runs
                      if r.variant == variant and getattr(r, field).get(col) is not None]
            if values:
                std = statistics.stdev(values) if len(values) > 1 else 0.0
                table[variant][col] = (statistics.fmean(values), std, len(values))
    return table


def summarise(runs: list[Run]) -> tuple[list[str], dict[str, dict[str, tuple[float, float, int]]]]:
    """variant -> metric -> (mean, std over seeds, n seeds), keeping the metrics' first-seen order."""
    columns = columns_of(runs)
    return columns, per_variant(runs, columns)


def baselines(runs: list[Run], columns: list[str]) -> dict[str, dict[str, float]]:
    """Variant -> column -> its uniform baseline, averaged over the variant's runs (variants differ:
    a sink adds a key, so a uniform share is 1/49 beside plain's 1/48)."""
    return {variant: {col: cell[0] for col, cell in row.items()}
            for variant, row in per_variant(runs, columns, "baselines").items() if row}


def baseline_cell(values: list[float]) -> str:
    """One value where every variant has the same baseline (to 4 digits), else the range."""
    low, high = f"{min(values):.4g}", f"{max(values):.4g}"
    return low if low == high else f"{low}-{high} (by variant)"


def excess(runs: list[Run]) -> dict[str, dict[str, Interval]]:
    """variant -> EXCESS name -> interval of (metric − its reference) over the variant's seeds."""
    out: dict[str, dict[str, Interval]] = {}
    for variant in dict.fromkeys(r.variant for r in runs):
        out[variant] = {}
        for name, (col, ref) in EXCESS.items():
            values = [r.metrics[col] - (r.metrics.get(ref) if ref else r.baselines.get(col))
                      for r in runs if r.variant == variant and col in r.metrics
                      and (r.metrics.get(ref) if ref else r.baselines.get(col)) is not None]
            if values:
                out[variant][name] = Interval.of(values)
    return out


def comparisons(runs: list[Run]) -> list[tuple[str, str]]:
    """(variant, reference) pairs: every variant against plain, and gate(s) against sink."""
    variants = list(dict.fromkeys(r.variant for r in runs))
    pairs = [(v, REFERENCE) for v in variants if v != REFERENCE and REFERENCE in variants]
    return pairs + [(a, b) for a, b in EXTRA_COMPARISONS if a in variants and b in variants]


def paired(runs: list[Run]) -> dict[str, dict[str, Interval]]:
    """'variant − reference' -> column -> interval of the per-seed differences (seeds both ran)."""
    by_key = {(r.variant, r.seed): r for r in runs}
    out: dict[str, dict[str, Interval]] = {}
    for variant, reference in comparisons(runs):
        name = f"{variant} − {reference}"
        out[name] = {}
        seeds = [s for (v, s) in by_key if v == variant and (reference, s) in by_key]
        for col in columns_of(runs):
            diffs = [by_key[variant, s].metrics[col] - by_key[reference, s].metrics[col] for s in seeds
                     if col in by_key[variant, s].metrics and col in by_key[reference, s].metrics]
            if diffs:
                out[name][col] = Interval.of(diffs)
    return out


# ---- tables ---------------------------------------------------------------------------------------


def markdown(columns: list[str], table: dict[str, dict[str, tuple[float, float, int]]],
             baseline: dict[str, dict[str, float]] | None = None) -> str:
    """Per variant: mean ± sd over seeds, then the uniform-baseline row (a range where the variants'
    baselines differ; study.json has each); the seeds column last."""
    lines = ["| variant | " + " | ".join(columns) + " | seeds |", "|---" * (len(columns) + 2) + "|"]
    for variant, row in table.items():
        cells = []
        for col in columns:
            if col not in row:
                cells.append("-")
                continue
            mean, std, n = row[col]
            cells.append(f"{mean:.4g} ± {std:.2g}" if n > 1 else f"{mean:.4g}")
        seeds = max((n for _, _, n in row.values()), default=0)
        lines.append(f"| {variant} | " + " | ".join(cells) + f" | {seeds} |")
    if baseline:
        per_col = {c: [row[c] for row in baseline.values() if c in row] for c in columns}
        cells = [baseline_cell(per_col[c]) if per_col[c] else "-" for c in columns]
        lines.append("| uniform baseline | " + " | ".join(cells) + " | |")
    return "\n".join(lines + ["", TABLE_NOTE])


def interval_table(rows: dict[str, dict[str, Interval]], first: str) -> str:
    """Rows of intervals (mean [95% t interval], 'not resolved' where it includes zero) and n."""
    columns: list[str] = []
    for row in rows.values():
        columns += [c for c in row if c not in columns]
    lines = [f"| {first} | " + " | ".join(columns) + " | n |", "|---" * (len(columns) + 2) + "|"]
    for name, row in rows.items():
        n = max((i.n for i in row.values()), default=0)
        lines.append(f"| {name} | " + " | ".join(row[c].cell() if c in row else "-" for c in columns) + f" | {n} |")
    return "\n".join(lines)


def runs_table(runs: list[Run]) -> str:
    """What each run trained: steps, tokens, epochs of the training split, parameters."""
    lines = ["| run | steps | tokens | epochs | non-embedding parameters (gate included) |", "|---|---|---|---|---|"]
    for r in runs:
        info = r.info
        epochs = "n/a" if info.get("epochs") is None else f"{info['epochs']:.2f}"
        lines.append(f"| {r.variant}, seed {r.seed} | {info.get('steps')} | {info.get('tokens'):,} | {epochs} | "
                     f"{info.get('params'):,} |")
    return "\n".join(lines)


# a pre-registered comparison: (label, row, column); the row is a paired comparison ("sink − plain") or
# a variant of the within-variant table, the column one of that table's columns; its test is the
# two-sided t test of mean 0. A PlannedTest (below) brings its own per-seed values, test and criterion.
Preregistered = tuple[str, str, str]


@dataclass
class PlannedTest:
    """A pre-registered test computed from the runs: the per-seed statistic it tests, its p-value (the
    pre-registered test's: one-sided, TOST or two-sided), and the outcome's criterion in words.
    `supported`: whether the pre-registered criterion holds (None: a descriptive test without one);
    the outcome also needs the Holm-adjusted p below ALPHA."""

    label: str
    row: str
    column: str
    values: list[float]
    p: float | None
    detail: str = ""
    supported: bool | None = None
    refuted: bool = False


def preregistered_results(planned: list[Preregistered | PlannedTest], within: dict[str, dict[str, Interval]],
                          diffs: dict[str, dict[str, Interval]]) -> list[dict[str, Any]]:
    """Each planned comparison's interval, p and Holm-adjusted p over the family (those measured)."""
    rows = []
    for item in planned:
        if isinstance(item, PlannedTest):
            interval = Interval.of(item.values) if item.values else None
            if interval is not None:
                interval.p = item.p
            rows.append({"label": item.label, "row": item.row, "column": item.column, "detail": item.detail,
                         "supported": item.supported, "refuted": item.refuted,
                         "interval": None if interval is None else asdict(interval)})
        else:
            label, row, col = item
            found = (diffs.get(row) or within.get(row) or {}).get(col)
            rows.append({"label": label, "row": row, "column": col,
                         "interval": None if found is None else asdict(found)})
    adjusted = holm({r["label"]: r["interval"]["p"] for r in rows
                     if r["interval"] is not None and r["interval"]["p"] is not None}, family_size=len(rows))
    for r in rows:
        r["holm_p"] = adjusted.get(r["label"])
        if "supported" in r:
            r["outcome"] = outcome(r["supported"], r["refuted"], r["holm_p"])
    return rows


def outcome(supported: bool | None, refuted: bool, holm_p: float | None) -> str:
    """A pre-registered outcome: refuted by its refutation clause; '' for a descriptive test; not tested
    without a p-value (one seed, or a variant that did not run); supported when its criterion holds and
    its test resolves after Holm; else not supported."""
    if refuted:
        return "refuted"
    if supported is None:
        return ""
    if holm_p is None:
        return "not tested"
    return "supported" if supported and holm_p is not None and holm_p < ALPHA else "not supported"


def preregistered_table(results: list[dict[str, Any]]) -> str:
    lines = ["| | comparison | tested | mean [95% t interval] | p | Holm p | verdict at 5% | outcome | criterion |",
             "|---" * 9 + "|"]
    for r in results:
        interval = r["interval"]
        tail = f" {r.get('outcome', '')} | {r.get('detail', '')} |"
        if interval is None:
            lines.append(f"| {r['label']} | {r['row']} | {r['column']} | not measured | | | |" + tail)
            continue
        p, holm_p = interval["p"], r["holm_p"]
        cell = (f"{interval['mean']:.4g} (n=1)" if interval["low"] is None else
                f"{interval['mean']:.4g} [{interval['low']:.4g}, {interval['high']:.4g}]")
        verdict = "no interval" if holm_p is None else ("resolved" if holm_p < ALPHA else NOT_RESOLVED)
        lines.append(f"| {r['label']} | {r['row']} | {r['column']} | {cell} | {_p(p)} | {_p(holm_p)} | {verdict} |"
                     + tail)
    return "\n".join(lines + ["", HOLM_NOTE + ". p: each test's own (one-sided, TOST or two-sided, in `tested`); "
                                   "the interval is two-sided 95% over seeds. " + OUTCOME_NOTE])


OUTCOME_NOTE = ("Outcome: `refuted` by the pre-registered refutation clause; `supported` when the criterion "
                "holds and the Holm-adjusted p < 0.05; `not tested` without a p (one seed, or a variant missing); "
                "else `not supported` (docs/study-mechanism.md, section 1).")


def _p(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def analysis_noise(runs: list[Run]) -> dict[str, dict[str, dict[str, float]]]:
    """variant -> column -> the sd that analysis noise alone gives (two analyses of one checkpoint on
    disjoint prompt sets: sqrt(mean (a - b)^2 / 2) over the variant's runs) beside the sd over seeds."""
    _, table = summarise(runs)
    out: dict[str, dict[str, dict[str, float]]] = {}
    for variant in dict.fromkeys(r.variant for r in runs):
        pairs: dict[str, list[float]] = {}
        for r in runs:
            if r.variant == variant:
                for col, again in r.repeat.items():
                    if r.metrics.get(col) is not None and again is not None:
                        pairs.setdefault(col, []).append((r.metrics[col] - again) ** 2 / 2)
        out[variant] = {col: {"analysis_sd": math.sqrt(statistics.fmean(sq)), "runs": len(sq),
                              "seed_sd": table[variant][col][1], "seeds": table[variant][col][2]}
                        for col, sq in pairs.items() if col in table[variant]}
    return {v: row for v, row in out.items() if row}


def analysis_noise_table(noise: dict[str, dict[str, dict[str, float]]]) -> str:
    lines = ["| variant | column | analysis sd (runs) | seed-to-seed sd (seeds) |", "|---|---|---|---|"]
    lines += [f"| {v} | {col} | {c['analysis_sd']:.3g} ({c['runs']}) | {c['seed_sd']:.3g} ({c['seeds']}) |"
              for v, row in noise.items() for col, c in row.items()]
    return "\n".join(lines + ["", "Analysis sd: each run's final checkpoint analysed twice, on two disjoint sets "
                                  "of held-out prompts, sqrt(mean (a - b)^2 / 2) over the runs; where it is close "
                                  "to the seed-to-seed sd, the seeds' spread is mostly the analysis, not training."])


def count_intervals(*tables: dict[str, dict[str, Interval]]) -> int:
    return sum(1 for table in tables for row in table.values() for i in row.values() if i.low is not None)


def render(title: str, command: str, runs: list[Run], preregistered: list[Preregistered | PlannedTest] | None = None,
           folder: Path | None = None) -> tuple[str, dict[str, Any]]:
    """study.md's text and study.json's content; `preregistered` comparisons get a Holm-corrected
    table, every other interval is marked exploratory; the probe figures in `folder` are linked where they exist."""
    columns, table = summarise(runs)
    base, within, diffs = baselines(runs, columns), excess(runs), paired(runs)
    planned = preregistered_results(list(preregistered or []), within, diffs)
    noise = analysis_noise(runs)
    sections = [f"# {title}", f"`{command}`",
                "## Per variant (mean ± sd over seeds)", markdown(columns, table, base)]
    if planned:
        sections += [f"## Pre-registered comparisons (Holm over {len(planned)})", preregistered_table(planned)]
    sections += [
        "## Within each variant: metric minus its uniform baseline or null model (95% t interval; exploratory)",
        interval_table(within, "variant"),
        "## Paired differences (same seeds, same data order; exploratory)", interval_table(diffs, "comparison"),
        f"{T_INTERVAL_NOTE}, over the n seeds (a paired difference: over the seeds both variants ran). "
        f"`{NOT_RESOLVED}`: the interval includes zero, so the sign is not told from noise; `{IDENTICAL}`: the "
        f"difference is exactly 0 in each seed; n=1 gives no interval. "
        + EXPLORATORY_NOTE.format(n=count_intervals(within, diffs))
        + ("" if planned else " No comparison was pre-registered for this study.")]
    if noise:
        sections += ["## Analysis noise beside seed-to-seed spread", analysis_noise_table(noise)]
    probes = report_links(folder) if folder else ""
    text = "\n\n".join(sections + [
        "## Runs", runs_table(runs),
        "![curves](loss_curves.png)\n\n![metrics](metrics.png)\n\n![paired](paired.png)\n\n"
        "![sinks over training](training/training.png)"] + ([probes] if probes else []))
    results = {"runs": [asdict(r) | {"out": str(r.out)} for r in runs],
               "per_variant": {v: {c: dict(zip(("mean", "sd", "n"), cell)) for c, cell in row.items()}
                               for v, row in table.items()},
               "uniform_baseline": base,  # variant -> column -> baseline
               "within_variant": {v: {k: asdict(i) for k, i in row.items()} for v, row in within.items()},
               "paired": {k: {c: asdict(i) for c, i in row.items()} for k, row in diffs.items()},
               "preregistered": planned, "analysis_noise": noise,
               "interval": "95% Student t interval of the mean over seeds; p: two-sided t test of mean 0"}
    return text + "\n", results


def runs_from_results(results: dict[str, Any]) -> list[Run]:
    """The runs of a study.json, to render its tables again (e.g. after the report changed)."""
    return [Run(**{**r, "out": Path(r["out"])}) for r in results["runs"]]


def write_outputs(out: Path, title: str, command: str, runs: list[Run],
                  preregistered: list[Preregistered | PlannedTest] | None = None) -> str:
    """study.md, study.json and the figures (the loss curves where every run's log is at hand);
    returns the markdown."""
    text, results = render(title, command, runs, preregistered, out)
    columns, table = summarise(runs)
    if all((r.out / METRICS_LOG).is_file() for r in runs):
        plot_curves(runs, out / "loss_curves.png", title)
    plot_metric_bars(columns, table, out / "metrics.png", title)
    plot_paired(paired(runs), out / "paired.png", title)
    atomic_write(out / TABLE, text)
    atomic_write(out / RESULTS, json.dumps(results, indent=2))
    return text


# ---- figures --------------------------------------------------------------------------------------


def _plots():
    """sinkdlm.analysis.plots, the one place that sets matplotlib up (imported when a figure is drawn:
    it says in one line when matplotlib is missing)."""
    from sinkdlm.analysis import plots

    return plots


def read_curves(run_dir: Path) -> tuple[list[tuple[int, float]], list[tuple[int, float]]]:
    """(train loss, validation ELBO) points from a run's metrics.jsonl."""
    train_pts, val_pts = [], []
    for line in (run_dir / METRICS_LOG).read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            train_pts.append((rec["step"], rec["loss"]))
        if "val_loss" in rec:
            val_pts.append((rec["step"], rec["val_loss"]))
    return train_pts, val_pts


def _mean_curve(curves: list[list[tuple[int, float]]]) -> tuple[list[int], list[float], list[float]]:
    """Steps every curve has, with the mean and sd over the curves there."""
    steps = sorted(set.intersection(*(set(dict(c)) for c in curves))) if curves else []
    values = [[dict(c)[s] for c in curves] for s in steps]
    return steps, [statistics.fmean(v) for v in values], [statistics.stdev(v) if len(v) > 1 else 0.0 for v in values]


def plot_curves(runs: list[Run], path: Path, title: str) -> Path:
    """Training loss and validation ELBO per variant (mean over seeds; validation error bars = sd) on
    one shared y axis that reaches the uniform guess (ln V); each variant has its own line style and
    marker so that equal curves stay visible."""
    plots = _plots()
    plt = plots.plt
    fig, (ax_train, ax_val) = plt.subplots(1, 2, figsize=(12, 4.8), sharey=True)
    variants = list(dict.fromkeys(r.variant for r in runs))
    for i, variant in enumerate(variants):
        colour, ls, marker = plt.cm.tab10.colors[i % 10], LINE_STYLES[i % len(LINE_STYLES)], MARKERS[i % len(MARKERS)]
        curves = [read_curves(r.out) for r in runs if r.variant == variant]
        seeds = len(curves)
        label = variant + (f" ({seeds} seeds)" if seeds > 1 else "")
        steps, mean, _ = _mean_curve([c[0] for c in curves if c[0]])
        if steps:
            ax_train.plot(steps, mean, color=colour, lw=0.6, alpha=0.25)
            ax_train.plot(steps, _smooth(mean), color=colour, ls=ls, label=label, lw=1.4)
        steps, mean, sd = _mean_curve([c[1] for c in curves if c[1]])
        if steps:
            ax_val.errorbar(steps, mean, yerr=sd, color=colour, ls=ls, marker=marker, label=label, ms=6,
                            mfc="none", capsize=3)
    uniform = _uniform_loss(runs)
    for ax in (ax_train, ax_val):
        if uniform is not None:
            ax.axhline(uniform, color="0.4", lw=0.8, ls=":", label=f"uniform guess, ln V = {uniform:.2f}")
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ax_train.set_ylabel("nats / token")
    ax_train.set_title("training loss (ELBO, mean over seeds; faint: raw, bold: centred average)")
    ax_val.set_title("validation ELBO (fixed masks; error bars: sd over seeds)")
    fig.suptitle(title)
    fig.tight_layout()
    return _plots().save(fig, path)


def _uniform_loss(runs: list[Run]) -> float | None:
    """ln V of the runs' vocabulary: the loss of a uniform guess, the top of every loss axis."""
    values = [r.baselines.get(VAL_ELBO) for r in runs if r.baselines.get(VAL_ELBO) is not None]
    return values[0] if values else None


def _smooth(values: list[float], share: float = SMOOTH_SHARE) -> list[float]:
    """Centred moving average over `share` of the points on each side, the window shrunk symmetrically at
    the ends: it does not lag the raw loss (an exponential average, as TensorBoard draws it, crosses the
    midpoint of a step ~7 points late at weight 0.9, which made training look slower than it was)."""
    half = max(1, round(share * len(values)))
    out = []
    for i in range(len(values)):
        reach = min(half, i, len(values) - 1 - i)
        out.append(statistics.fmean(values[i - reach: i + reach + 1]))
    return out


def _panels(n: int):
    plt = _plots().plt
    ncols = min(n, METRIC_PANELS_PER_ROW)
    nrows = -(-n // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.4 * ncols, 3.2 * nrows), squeeze=False)
    for ax in list(axes.flat)[n:]:
        ax.axis("off")
    return plt, fig, axes


def plot_metric_bars(columns: list[str], table: dict[str, dict[str, tuple[float, float, int]]],
                     path: Path, title: str) -> Path | None:
    """One panel per metric: each variant's mean, with its std over seeds as an error bar. Each axis
    spans the metric's natural range (a share 0..1, an accuracy 0..100 %, a loss from 0), so that a
    difference inside the noise is not blown up to fill the panel; a panel says which variants have no
    value (e.g. dedicated-sink metrics of models without a sink)."""
    if not columns:
        return None
    plt, fig, axes = _panels(len(columns))
    variants = list(table)
    colours = plt.cm.tab10.colors
    for ax, col in zip(axes.flat, columns):
        for i, v in enumerate(variants):
            if col in table[v]:
                mean, std, _ = table[v][col]
                ax.errorbar([i], [mean], yerr=[std], fmt="o", color=colours[i % len(colours)], capsize=4, ms=7)
        ax.set_xticks(range(len(variants)), variants, rotation=30, fontsize=8)
        ax.set_xlim(-0.5, len(variants) - 0.5)
        tops = [mean + std for v in variants if col in table[v] for mean, std, _ in [table[v][col]]]
        ax.set_ylim(*axis_range(col, max(tops, default=1.0)))
        missing = [v for v in variants if col not in table[v]]
        ax.set_title(col + (f"\n(no value for {', '.join(missing)})" if missing else ""), fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    seeds = max(n for row in table.values() for _, _, n in row.values())
    fig.suptitle(title + ("\none seed: no spread over seeds to show" if seeds == 1 else
                          "\nerror bars: std over seeds"))
    fig.tight_layout()
    return _plots().save(fig, path)


def plot_paired(diffs: dict[str, dict[str, Interval]], path: Path, title: str) -> Path | None:
    """One panel per metric: each comparison's mean paired difference with its 95% t interval; the
    zero line is 'no difference' (an interval across it: not resolved)."""
    columns: list[str] = []
    for row in diffs.values():
        columns += [c for c in row if c not in columns]
    if not columns:
        return None
    plt, fig, axes = _panels(len(columns))
    names = list(diffs)
    for ax, col in zip(axes.flat, columns):
        for i, name in enumerate(names):
            if col in diffs[name]:
                d = diffs[name][col]
                err = [[d.mean - d.low], [d.high - d.mean]] if d.low is not None else None
                ax.errorbar([i], [d.mean], yerr=err, fmt="o" if d.resolved else "s", mfc=None if d.resolved else "none",
                            color="tab:blue", capsize=4, ms=6)
        ax.axhline(0, color="0.3", lw=0.8)
        ax.set_xticks(range(len(names)), names, rotation=35, fontsize=7, ha="right")
        ax.set_xlim(-0.5, len(names) - 0.5)
        ax.set_title(col, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle(title + "\npaired differences, error bars: 95% t interval over seeds (hollow: not resolved)")
    fig.tight_layout()
    return _plots().save(fig, path)


def axis_range(column: str, highest: float) -> tuple[float, float]:
    """(bottom, top) of a metric's panel: its natural range; losses and counts from zero to just above
    the highest value (plus its error bar)."""
    if column.endswith(ACCURACY_SUFFIX):
        return 0.0, 100.0
    if column in SHARE_COLUMNS:
        return 0.0, 1.0
    if column in SIGNED_COLUMNS:
        return -1.0, 1.0
    return 0.0, HEADROOM * highest if math.isfinite(highest) else 1.0


# ---- re-rendering a finished study with this report code -------------------------------------------

# columns earlier code measured with a defect that a cache cannot repair (the trajectories are not
# kept), each with the reason it is left out when a study is rendered again (issue 22); today's
# columns for these ideas have other names
RETIRED_COLUMNS = {
    "stability, random-attention null": "a Monte Carlo draw per run; the exact uniform-attention null is the "
                                        "column's uniform baseline (1/K)",
    "sink-set IoU": "scored two empty sink sets as 1, so a head without sinks read as pinned",
    "sink value-norm rank": "ranked tied [MASK] norms in argsort's order and counted the dedicated sink among "
                            "the content keys",
}


def rerender(folder: Path, preregistered: list[Preregistered | PlannedTest] | None = None) -> str:
    """study.md, study.json and the figures of a finished study again from its study.json, with the
    retired columns left out (its title and command read from the old study.md); returns the markdown."""
    old = (folder / TABLE).read_text(encoding="utf-8").splitlines()
    title, command = old[0].removeprefix("# "), old[2].strip("`")
    runs = runs_from_results(json.loads((folder / RESULTS).read_text(encoding="utf-8")))
    for run in runs:
        for column in RETIRED_COLUMNS:
            for values in (run.metrics, run.baselines, run.repeat):
                values.pop(column, None)
    text = write_outputs(folder, title, command, runs, preregistered)
    retired = "; ".join(f"`{c}` ({why})" for c, why in RETIRED_COLUMNS.items())
    note = f"\nRendered again from study.json by the report code of issue 22; left out: {retired}.\n"
    atomic_write(folder / TABLE, text + note)
    return text + note


# ---- the mechanism study's pre-registered family (docs/study-mechanism.md, section 1) ---------------
# Column prefixes are study.probe_columns' (each measured at the two mask levels, "<prefix> @<level>");
# the primary number of a probe is the mean over the levels (and over layers for the per-layer [MASK] ratio).

P1_DORMANT, P1_ACTIVE, P1_SEEDS = 0.3, 0.1, 3  # dormant >= 0.3 and active <= 0.1 on the sink in >= 3 seeds
P1_REFUTE_DORMANT, P1_REFUTE_COPY = 0.1, 0.9  # refuted: dormant < 0.1 while copy accuracy >= 0.9
P2_RATIO, P2_REFUTE_STABILITY = 2.0, 0.9  # [MASK] mass >= 2x uniform; refuted: stability >= 0.9 twice
P3_LOW, P3_REFUTE = 0.5, 1.0  # value-norm ratio < 0.5; refuted at >= 1
P4_MARGIN = 0.02  # copy accuracy and nats
DORMANT_ON_SINK, ACTIVE_ON_SINK = "copy head: dormant on sink", "copy head: active on sink"
VALUE_RATIO, COPY_ACC, MASK_RATIO, ELBO_BIN = ("copy head: sink value ratio", "copy acc",
                                                "dormant [MASK] x uniform L", "ELBO t ")
STEPS_TO_COPY = "steps to 0.9 copy acc"


def level_mean(metrics: dict[str, float], prefix: str) -> float | None:
    """Mean of every column that starts with `prefix` (a probe over its mask levels, the [MASK] ratio
    over layers and levels, the ELBO over its t-bins; a whole column name is its own prefix); None when
    the run has none."""
    values = [v for k, v in metrics.items() if k.startswith(prefix)]
    return statistics.fmean(values) if values else None


def _per_seed(runs: list[Run], variant: str, prefix: str) -> dict[int, float]:
    """seed -> level_mean of `prefix` in the variant's run of that seed."""
    values = {r.seed: level_mean(r.metrics, prefix) for r in runs if r.variant == variant}
    return {seed: v for seed, v in values.items() if v is not None}


def _paired_values(runs: list[Run], variant: str, reference: str, prefix: str) -> list[float]:
    a, b = _per_seed(runs, variant, prefix), _per_seed(runs, reference, prefix)
    return [a[s] - b[s] for s in sorted(a) if s in b]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"


def _interval_text(values: list[float]) -> str:
    bounds = t_interval(values)
    return f"{_fmt(_mean(values))}" + ("" if bounds is None else f" [{bounds[0]:.3g}, {bounds[1]:.3g}]")


def mechanism_family(runs: list[Run]) -> list[PlannedTest]:
    """P1-P5 as pre-registered: one test each, Holm over the five (render applies it)."""
    return [p1_sink_absorbs(runs), p2_moving_mask_sinks(runs), p3_low_value_norm(runs),
            p4_zero_value_is_enough(runs), p5_where_the_gain_is(runs)]


def p1_sink_absorbs(runs: list[Run]) -> PlannedTest:
    """Sink model, copy head: dormant - active attention on the sink > 0 (one-sided t over seeds)."""
    dormant, active = _per_seed(runs, "sink", DORMANT_ON_SINK), _per_seed(runs, "sink", ACTIVE_ON_SINK)
    copy = _per_seed(runs, "sink", COPY_ACC)
    seeds = [s for s in sorted(dormant) if s in active]
    values = [dormant[s] - active[s] for s in seeds]
    hits = sum(dormant[s] >= P1_DORMANT and active[s] <= P1_ACTIVE for s in seeds)
    mean_dormant, mean_copy = _mean([dormant[s] for s in seeds]), _mean(list(copy.values()))
    refuted = (mean_dormant is not None and mean_copy is not None
               and mean_dormant < P1_REFUTE_DORMANT and mean_copy >= P1_REFUTE_COPY)
    detail = (f"{hits} of {len(seeds)} seeds with dormant ≥ {P1_DORMANT} and active ≤ {P1_ACTIVE} (needs ≥ "
              f"{P1_SEEDS}); dormant {_fmt(mean_dormant)}, active {_fmt(_mean([active[s] for s in seeds]))}, "
              f"copy acc {_fmt(mean_copy)}; refuted if dormant < {P1_REFUTE_DORMANT} with copy acc ≥ {P1_REFUTE_COPY}")
    return PlannedTest("P1", "sink", "copy head: dormant − active on sink > 0 (one-sided t)", values,
                       t_test_one_sided_p(values, 0.0, greater=True), detail,
                       bool(seeds) and hits >= P1_SEEDS, refuted)


def p2_moving_mask_sinks(runs: list[Run]) -> PlannedTest:
    """Plain model: dormant [MASK] mass over uniform, pooled over layers, > 2 (one-sided t); the
    event-locked change's interval above its one-token-reveal null is the criterion's second half."""
    ratio = _per_seed(runs, REFERENCE, MASK_RATIO)
    values = [ratio[s] - P2_RATIO for s in sorted(ratio)]
    plain = [r for r in runs if r.variant == REFERENCE]
    locked = [r.metrics["event-locked change"] for r in plain if "event-locked change" in r.metrics]
    null_key = "event-locked change, one-token-reveal null"
    above = [r.metrics["event-locked change"] - r.metrics[null_key] for r in plain
             if "event-locked change" in r.metrics and null_key in r.metrics]
    above_bounds = t_interval(above)
    moving = _mean(locked) is not None and _mean(locked) > 0 and above_bounds is not None and above_bounds[0] > 0
    stable = [_mean([r.metrics[k] for r in plain if k in r.metrics])
              for k in ("dominant-key stability", "stability, one-token-reveal null")]
    refuted = all(v is not None and v >= P2_REFUTE_STABILITY for v in stable)
    mean_ratio = _mean(list(ratio.values()))
    detail = (f"[MASK] ratio {_fmt(mean_ratio)} (needs ≥ {P2_RATIO}); event-locked change {_interval_text(locked)}, "
              f"minus its one-token-reveal null {_interval_text(above)} (needs > 0); stability {_fmt(stable[0])}, "
              f"one-token-reveal null {_fmt(stable[1])} (refuted if both ≥ {P2_REFUTE_STABILITY})")
    return PlannedTest("P2", REFERENCE, f"dormant [MASK] mass / uniform − {P2_RATIO:g} > 0 (one-sided t)", values,
                       t_test_one_sided_p(values, 0.0, greater=True), detail,
                       mean_ratio is not None and mean_ratio >= P2_RATIO and moving, refuted)


def p3_low_value_norm(runs: list[Run]) -> PlannedTest:
    """Sink model, copy head: the sink's value-norm ratio - 1 < 0 (one-sided t)."""
    ratio = _per_seed(runs, "sink", VALUE_RATIO)
    values = [ratio[s] - P3_REFUTE for s in sorted(ratio)]
    mean_ratio = _mean(list(ratio.values()))
    detail = f"value-norm ratio {_fmt(mean_ratio)} (supported below {P3_LOW}, refuted at ≥ {P3_REFUTE})"
    return PlannedTest("P3", "sink", f"copy head: sink value-norm ratio − {P3_REFUTE:g} < 0 (one-sided t)", values,
                       t_test_one_sided_p(values, 0.0, greater=False), detail,
                       mean_ratio is not None and mean_ratio < P3_LOW,
                       mean_ratio is not None and mean_ratio >= P3_REFUTE)


def p4_zero_value_is_enough(runs: list[Run]) -> PlannedTest:
    """sink_zero_value − sink within ±0.02 copy accuracy and ±0.02 nats validation ELBO: TOST per
    quantity, p = the larger."""
    acc = _paired_values(runs, "sink_zero_value", "sink", COPY_ACC)
    elbo = _paired_values(runs, "sink_zero_value", "sink", VAL_ELBO)
    p_acc, p_elbo = tost_p(acc, P4_MARGIN), tost_p(elbo, P4_MARGIN)
    p = None if p_acc is None or p_elbo is None else max(p_acc, p_elbo)
    within = [v is not None and abs(v) < P4_MARGIN for v in (_mean(acc), _mean(elbo))]
    detail = (f"copy acc difference {_interval_text(acc)} (TOST p {_fmt(p_acc)}); val ELBO difference "
              f"{_interval_text(elbo)} nats (TOST p {_fmt(p_elbo)}); margin ±{P4_MARGIN}")
    return PlannedTest("P4", "sink_zero_value − sink", f"copy acc and val ELBO within ±{P4_MARGIN} (TOST, p = the "
                       "larger; interval: copy acc)", acc, p, detail, all(within))


def p5_where_the_gain_is(runs: list[Run]) -> PlannedTest:
    """sink − plain: the probe ELBO pooled over the mask-ratio bins (two-sided paired t); per bin
    and steps to 90% copy accuracy beside it (exploratory)."""
    pooled = _paired_values(runs, "sink", REFERENCE, ELBO_BIN)
    bins = sorted({k for r in runs for k in r.metrics if k.startswith(ELBO_BIN)})
    per_bin = "; ".join(f"{k.removeprefix(ELBO_BIN)} {_fmt(_mean(_paired_values(runs, 'sink', REFERENCE, k)))}"
                        for k in bins)
    steps = _paired_values(runs, "sink", REFERENCE, STEPS_TO_COPY)
    detail = (f"exploratory: per t-bin mean difference {per_bin or 'n/a'} nats; steps to 90% copy acc "
              f"difference {_interval_text(steps)}")
    return PlannedTest("P5", f"sink − {REFERENCE}", "probe ELBO pooled over t-bins, difference ≠ 0 (two-sided t)",
                       pooled, t_test_p(pooled), detail)
