"""Figures of a recording (matplotlib, Agg backend). Each function writes one PNG and returns its path.

Key axes put the dedicated sinks left of content position 0, at -S..-1, labelled "sink".
"""

from __future__ import annotations

from pathlib import Path

from torch import Tensor

from sinkdlm.optional import require

require("matplotlib", "drawing the analysis figures").use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import PowerNorm  # noqa: E402

DPI = 120
MAP_GAMMA = 0.4  # power-law colour scale: a sink's column and the faint rest both stay visible
MAX_LAYER_PANELS = 4
CMAP = "viridis"
TEXT_FLIP = 0.6  # cell value above which numbers are drawn in black (viridis turns light)
SINK_TICK_GAP = 0.06  # share of the axis kept free of content ticks next to the sink label


def save(fig, path: Path) -> Path:
    fig.savefig(path, dpi=DPI, bbox_inches="tight")
    plt.close(fig)
    return path


def _mark_sinks(ax, n_sink: int) -> None:
    """Dashed line between the dedicated sinks and content on the key (x) axis; sinks labelled S."""
    if not n_sink:
        return
    ax.axvline(-0.5, color="white", lw=1.2, ls="--")
    lo, hi = ax.get_xlim()
    gap = SINK_TICK_GAP * (hi - lo)  # keep content ticks from overprinting the S label
    ticks = [int(t) for t in ax.get_xticks() if gap <= t <= hi]
    ax.set_xticks(list(range(-n_sink, 0)) + ticks, ["S"] * n_sink + [str(t) for t in ticks])
    ax.set_xlim(lo, hi)


def attention_maps(maps: list[Tensor], steps: list[int], n_sink: int, title: str, path: Path) -> Path:
    """Side by side attention maps (query x key) at two steps, like the paper's Figure 1."""
    fig, axes = plt.subplots(1, len(maps), figsize=(5.2 * len(maps), 4.8), squeeze=False,
                             layout="constrained")
    vmax = max(float(m.max()) for m in maps)
    for ax, m, step in zip(axes[0], maps, steps):
        t = m.shape[0]
        im = ax.imshow(m.numpy(), cmap=CMAP, norm=PowerNorm(MAP_GAMMA, vmin=0, vmax=vmax), aspect="auto",
                       extent=(-n_sink - 0.5, m.shape[1] - n_sink - 0.5, t - 0.5, -0.5), interpolation="nearest")
        ax.set_title(f"step {step}")
        ax.set_xlabel("key position")
        ax.set_ylabel("query position")
        _mark_sinks(ax, n_sink)
    fig.colorbar(im, ax=axes[0].tolist(), label=f"attention probability (power {MAP_GAMMA} scale)")
    fig.suptitle(title)
    return save(fig, path)


def step_position_heatmaps(shares: list[Tensor], layers: list[int], n_sink: int, title: str, path: Path) -> Path:
    """Per layer: step x key position heatmap of the incoming attention share (heads averaged)."""
    fig, axes = plt.subplots(1, len(shares), figsize=(4.6 * len(shares), 4.4), squeeze=False,
                             layout="constrained")
    vmax = max(float(s.max()) for s in shares)
    for ax, share, layer in zip(axes[0], shares, layers):
        steps, keys = share.shape
        im = ax.imshow(share.numpy(), cmap=CMAP, norm=PowerNorm(MAP_GAMMA, vmin=0, vmax=vmax), aspect="auto",
                       extent=(-n_sink - 0.5, keys - n_sink - 0.5, steps - 0.5, -0.5), interpolation="nearest")
        ax.set_title(f"layer {layer}")
        ax.set_xlabel("key position")
        ax.set_ylabel("step")
        _mark_sinks(ax, n_sink)
    fig.colorbar(im, ax=axes[0].tolist(), label="share of incoming attention")
    fig.suptitle(title)
    return save(fig, path)


def dominant_vs_step(dominant: Tensor, layers: list[int], n_sink: int, title: str, path: Path) -> Path:
    """Position of the most-attended key (heads summed) at each step: one panel per layer on shared
    axes, so that layers whose dominant key coincides never hide each other's line."""
    fig, axes = plt.subplots(len(layers), 1, figsize=(7.5, 0.6 + 1.7 * len(layers)), sharex=True, sharey=True,
                             squeeze=False, layout="constrained")
    steps = dominant.shape[1]
    for ax, row, layer in zip(axes[:, 0], dominant, layers):
        ax.plot(range(steps), row.numpy(), marker="o", ms=3, lw=1, color="tab:blue")
        ax.set_title(f"layer {layer}", fontsize=9, loc="left")
        ax.grid(alpha=0.3)
        if n_sink:
            ax.axhspan(-n_sink - 0.5, -0.5, color="0.9", zorder=0)
    ax = axes[-1, 0]
    ax.set_xlabel("step" + (" (one step recorded: nothing can move)" if steps == 1 else ""))
    if n_sink:  # shared y axis: relabel the sink rows once
        lo, hi = ax.get_ylim()
        ticks = [int(t) for t in ax.get_yticks() if SINK_TICK_GAP * (hi - lo) <= t <= hi]
        ax.set_yticks(list(range(-n_sink, 0)) + ticks, ["S"] * n_sink + [str(t) for t in ticks])
        ax.set_ylim(lo, hi)
    fig.supylabel("position of the most-attended key" + (" (S = dedicated sink)" if n_sink else ""), fontsize=9)
    fig.suptitle(title)
    return save(fig, path)


def layer_head_map(values: Tensor, layers: list[int], label: str, title: str, path: Path) -> Path:
    """Layer x head table as a heatmap with the numbers written in."""
    n_layer, n_head = values.shape
    fig, ax = plt.subplots(figsize=(max(5.5, 1.5 + 0.8 * n_head), max(3.0, 1.2 + 0.5 * n_layer)))
    im = ax.imshow(values.numpy(), cmap=CMAP, vmin=0, vmax=1, aspect="auto")  # shares: one scale for all models
    if n_layer * n_head <= 400:
        for i in range(n_layer):
            for j in range(n_head):
                v = float(values[i, j])
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=7,
                        color="white" if v < TEXT_FLIP else "black")
    ax.set_xticks(range(n_head))
    ax.set_yticks(range(n_layer), [str(layer) for layer in layers])
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    fig.colorbar(im, ax=ax, label=label)
    ax.set_title(title)
    return save(fig, path)


def value_norm_scatter(share: Tensor, norm: Tensor, kind: Tensor, title: str, path: Path) -> Path:
    """Incoming attention vs value L2 norm of every key; kind 0 = normal, 1 = content sink, 2 = dedicated."""
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    styles = {0: ("normal token", "0.6", "o", 8), 1: ("detected content sink", "tab:red", "o", 22),
              2: ("dedicated sink", "tab:blue", "*", 90)}
    for k, (label, colour, marker, size) in styles.items():
        sel = kind == k
        if sel.any():
            ax.scatter(share[sel].numpy(), norm[sel].numpy(), s=size, c=colour, marker=marker, alpha=0.7,
                       label=f"{label} ({int(sel.sum())})", edgecolors="none")
    ax.set_xscale("log")
    ax.set_xlabel("share of incoming attention (log)")
    ax.set_ylabel("value L2 norm")
    ax.legend(fontsize=8)
    ax.set_title(title)
    return save(fig, path)


def panel_layers(layers: list[int]) -> list[int]:
    """Up to MAX_LAYER_PANELS layers spread over the recorded ones (first and last included)."""
    if len(layers) <= MAX_LAYER_PANELS:
        return list(layers)
    picks = {round(i * (len(layers) - 1) / (MAX_LAYER_PANELS - 1)) for i in range(MAX_LAYER_PANELS)}
    return [layers[i] for i in sorted(picks)]
