"""Figures of `sinkdlm eval-generation` (matplotlib through sinkdlm.analysis.plots): Gen-PPL against
unigram entropy (the MDLM/BD3-LM pairing), and the judge's per-token NLL histogram; one or many runs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np

from sinkdlm.analysis.plots import plt, save

SAMPLE_ALPHA = 0.25  # per-sample points, behind each run's pooled point
SAMPLE_SIZE = 9
COLOURS = 10  # matplotlib's default cycle, C0..C9


def _errors(summary: dict[str, Any]) -> list[list[float]]:
    """matplotlib's asymmetric error bar of a {mean, lo, hi} summary (0 where no interval)."""
    mean, lo, hi = summary["mean"], summary["lo"], summary["hi"]
    return [[mean - lo if lo is not None else 0.0], [hi - mean if hi is not None else 0.0]]


def gen_ppl_vs_entropy(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """Each run: its samples (entropy, exp(judge NLL)) faint, and its pooled Gen-PPL against its mean
    entropy with 95% intervals on both axes."""
    fig, ax = plt.subplots(figsize=(6.4, 4.6), layout="constrained")
    for k, (label, result) in enumerate(runs):
        points = [(p["entropy"], math.exp(p["judge_nll"])) for p in result["per_sample"]
                  if p["entropy"] is not None and p["judge_nll"] is not None]
        colour = f"C{k % COLOURS}"
        if points:
            xs, ys = np.array(points).T
            ax.scatter(xs, ys, s=SAMPLE_SIZE, alpha=SAMPLE_ALPHA, color=colour, linewidths=0)
        ppl, ent = result["metrics"]["gen_ppl"], result["metrics"]["entropy"]
        if ppl["mean"] is not None and ent["mean"] is not None:
            ax.errorbar([ent["mean"]], [ppl["mean"]], xerr=_errors(ent), yerr=_errors(ppl), fmt="o", color=colour,
                        capsize=3, label=f"{label} (n={result['samples']})")
    reference = runs[0][1].get("reference") if runs else None
    if reference and reference["metrics"]["gen_ppl"]["mean"] is not None:
        ppl, ent = reference["metrics"]["gen_ppl"], reference["metrics"]["entropy"]
        ax.errorbar([ent["mean"]], [ppl["mean"]], xerr=_errors(ent), yerr=_errors(ppl), fmt="*", color="black",
                    markersize=11, capsize=3, label="held-out text (the windows of the first run)")
    ax.set_yscale("log")
    ax.set_xlabel("unigram entropy of a sample (nats, model tokens)")
    ax.set_ylabel("generative perplexity under the judge")
    ax.set_title("Gen-PPL vs entropy (faint: single samples)")
    ax.legend(fontsize="small")
    return save(fig, path)


def nll_histogram(runs: list[tuple[str, dict[str, Any]]], path: Path) -> Path:
    """The judge's per-token NLL distribution of each run (share of tokens per bin)."""
    fig, ax = plt.subplots(figsize=(6.4, 4.0), layout="constrained")
    for label, result in runs:
        hist = result["nll_histogram"]
        counts = np.array(hist["counts"], dtype=np.float64)
        if counts.sum():
            ax.stairs(counts / counts.sum(), hist["edges"], label=label)
    ax.set_xlabel("judge NLL of a token (nats; the last bin holds the rest)")
    ax.set_ylabel("share of tokens")
    ax.legend(fontsize="small")
    return save(fig, path)
