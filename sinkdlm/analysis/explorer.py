"""The sink explorer: one self-contained HTML page (scripts and data inlined, no network at view time)
to step through a recorded denoising trajectory and look at each layer's and head's attention.

A recording keeps column sums for every step but full attention maps only for the figure steps, so
the maps are recomputed here: the recorded input of each step (and its attention mask) goes through
the model once more with an observer. With one forward per step (no cache, no guidance: what the
recorder requires) that is the attention the sampler saw; tests hold the replayed column sums to the
recorded ones. Maps of the first sequence only (the others are batch mates), cropped to its real
positions; stored as 8-bit codes of sqrt(p) (so |error| <= sqrt(p) / 255 + 1 / (4 255^2) < 0.004),
base64 in the page.

Beyond a size limit the maps are reduced, in this order, and the page says what was dropped: steps
sampled evenly (first and last kept) down to MIN_STEPS, heads averaged per layer, layers sampled
evenly, then steps again. Per-step metrics (from the recorded column sums) cover every step.
"""

from __future__ import annotations

import base64
import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sinkdlm import checkpoint as ckpt
from sinkdlm.analysis.pipeline import token_text
from sinkdlm.analysis.stats import (
    Cells,
    Trajectory,
    capture_share,
    dedicated_top1,
    detect,
    dominant,
    mask_share,
    pooled,
    to_py,
)
from sinkdlm.fields import check_choices, setting

EXPLORER_FILE = "explorer.html"
DEFAULT_MAX_MB = 8.0  # the whole page's attention maps (all panels); browsers open this quickly
MIN_STEPS = 8  # steps kept before heads are averaged
CODE_MAX = 255  # 8-bit codes of sqrt(p)
BASE64_GROWTH = 4 / 3
ITEM = 0  # the sequence whose maps are shown
DIGITS = 4  # rounding of the per-step metrics in the page
# token status on the canvas, per step (the model input at that step)
GIVEN, COMMITTED, NEW, MASKED = 0, 1, 2, 3
# per-cell metrics shown for a step and layer: name -> what it is (the page shows these lines)
STEP_METRICS = {
    "absorption_rate": "share of the attention of this step's queries that lands on the dedicated sink(s)",
    "uniform_absorption": "what absorption_rate would be under uniform attention over the valid keys",
    "dedicated_top1_rate": "share of heads in which the dedicated sink draws more attention than every "
                           "content key (for one head: 1 = yes, 0 = no)",
    "dedicated_capture_share": "of the attention on sinks (dedicated + detected content sinks), the dedicated "
                               "sink's share",
    "sink_mass": "share of the attention that lands on detected sinks (dedicated included where detected)",
    "n_sinks": "detected sinks (keys), mean over the heads shown",
    "mask_share_of_sinks": "share of the detected content sinks whose input token is [MASK]",
}


@dataclass
class ExplorerConfig:
    """The explorer page `sinkdlm analyze` writes beside its report."""

    explorer_max_mb: float = setting(DEFAULT_MAX_MB, "size limit of the explorer page's attention maps (MB, "
                                                     "all panels); beyond it steps, heads and layers are "
                                                     "sampled or averaged and the page says so", above=0)

    def __post_init__(self) -> None:
        check_choices(self, "")


# ---- which maps fit -------------------------------------------------------------------------------


def evenly(n: int, keep: int) -> list[int]:
    """`keep` indices of range(n) spread evenly, first and last included."""
    if keep >= n:
        return list(range(n))
    if keep <= 1:
        return [0]
    return sorted({round(i * (n - 1) / (keep - 1)) for i in range(keep)})


@dataclass
class MapPlan:
    steps: list[int]  # indices into the recording's steps
    layers: list[int]  # indices into the recording's layers
    head_mean: bool  # heads averaged per layer
    full_bytes: int  # what every map would take
    notes: list[str] = field(default_factory=list)


def plan_maps(n_steps: int, layer_ids: list[int], n_head: int, map_cells: int, budget: float) -> MapPlan:
    """What to keep of (steps x layers x heads) maps of `map_cells` values each within `budget` bytes
    of base64 (one byte per value before it)."""
    raw_budget = math.floor(budget / BASE64_GROWTH)

    def size(steps: int, layers: int, heads: int) -> int:  # bytes before base64
        return steps * layers * heads * map_cells

    def fit(per_unit: int, most: int, least: int) -> int:
        return max(least, min(most, raw_budget // per_unit))

    n_layer, full = len(layer_ids), size(n_steps, len(layer_ids), n_head) * BASE64_GROWTH
    steps, layers, heads = n_steps, n_layer, n_head
    if size(steps, layers, heads) > raw_budget:
        steps = fit(size(1, layers, heads), n_steps, min(n_steps, MIN_STEPS))
    if size(steps, layers, heads) > raw_budget:
        heads = 1
        steps = fit(size(1, layers, 1), n_steps, min(n_steps, MIN_STEPS))
    if size(steps, layers, heads) > raw_budget:
        layers = fit(size(steps, 1, 1), n_layer, 1)
    if size(steps, layers, heads) > raw_budget:
        steps = fit(size(1, layers, 1), n_steps, 1)
    plan = MapPlan(evenly(n_steps, steps), evenly(n_layer, layers), heads < n_head, int(full))
    plan.notes = reduction_notes(plan, n_steps, layer_ids, budget)
    return plan


def reduction_notes(plan: MapPlan, n_steps: int, layer_ids: list[int], budget: float) -> list[str]:
    if len(plan.steps) == n_steps and len(plan.layers) == len(layer_ids) and not plan.head_mean:
        return []
    notes = [f"The full attention maps would take {plan.full_bytes / 1e6:.1f} MB, above this panel's "
             f"{budget / 1e6:.1f} MB (--explorer-max-mb):"]
    if len(plan.steps) < n_steps:
        notes.append(f"maps of {len(plan.steps)} of {n_steps} steps are kept (evenly spaced: "
                     f"{', '.join(map(str, plan.steps))}); other steps show the nearest kept map")
    if plan.head_mean:
        notes.append("heads are averaged per layer (no single-head maps)")
    if len(plan.layers) < len(layer_ids):
        notes.append(f"layers {', '.join(str(layer_ids[i]) for i in plan.layers)} of the "
                     f"{len(layer_ids)} recorded are kept")
    return notes


# ---- the maps: replay the recorded inputs -----------------------------------------------------------


@torch.no_grad()
def replay_maps(model, tr: Trajectory, steps: list[int], layers: list[int], item: int = ITEM,
                real: Tensor | None = None, head_mean: bool = False) -> Tensor:
    """(len(steps), len(layers), H, T, K) attention of sequence `item` at the recorded steps; `layers`
    index tr.layers. Each step's recorded input and content-key mask go through the model again.
    real: (T,) bool positions to keep (queries, and keys after the sinks); head_mean: H becomes 1.
    Both are applied per layer as it is observed, so a long sequence never holds every full map."""
    model_layers = [tr.layers[i] for i in layers]
    device = next(model.parameters()).device
    if real is not None:
        rows, keys = real.to(device), torch.cat([torch.ones(tr.n_sink, dtype=torch.bool), real]).to(device)
    out, kept = [], {}

    def observe(layer: int, probs: Tensor, k: Tensor, v: Tensor, n_sink: int) -> None:
        if layer in model_layers:
            p = probs[0].float()
            p = p.mean(0, keepdim=True) if head_mean else p
            kept[layer] = (p if real is None else p[:, rows][..., keys]).cpu()

    with model.sink_cache():
        for s in steps:
            idx = tr.tokens[s, item:item + 1].to(device)
            mask = tr.key_valid[s, item:item + 1, tr.n_sink:].to(device)
            model(idx, attention_mask=mask, logits_at=torch.zeros(1, 2, dtype=torch.long, device=device),
                  observer=observe)
            out.append(torch.stack([kept[layer] for layer in model_layers]))
    return torch.stack(out)


def encode_maps(maps: Tensor) -> str:
    """Probabilities -> base64 of uint8 codes round(255 sqrt(p)), row-major."""
    codes = (maps.clamp(0, 1).sqrt() * CODE_MAX).round().to(torch.uint8)
    return base64.b64encode(codes.contiguous().numpy().tobytes()).decode("ascii")


def decode_maps(text: str, shape: tuple[int, ...]) -> Tensor:
    """The inverse of encode_maps (to within its rounding): what the page draws."""
    codes = torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)
    return (codes.float() / CODE_MAX).square().reshape(shape)


# ---- what the page shows of one checkpoint ----------------------------------------------------------


def canvas_status(tokens: Tensor, mask_id: int) -> Tensor:
    """(S, T) model inputs -> (S, T) status: given (never masked), committed (revealed at an earlier
    step), new (revealed by the previous step: masked in its input, not in this one) or masked."""
    masked = tokens == mask_id
    before = torch.cat([masked[:1], masked[:-1]])
    status = torch.full_like(tokens, GIVEN)
    status[masked[0] & ~masked] = COMMITTED
    status[before & ~masked] = NEW
    status[masked] = MASKED
    return status


def head_metrics(tr: Trajectory, sets: Tensor, mask_id: int) -> dict[str, Tensor]:
    """STEP_METRICS per (step, layer, sequence, head) cell."""
    colsum, n = tr.colsum, tr.n_sink
    valid = tr.key_valid[:, None, :, None, :].expand_as(colsum)
    total = colsum.sum(-1)
    out = {"sink_mass": pooled((colsum * sets).sum(-1), total, ()), "n_sinks": sets.sum(-1).float(),
           "mask_share_of_sinks": mask_share(sets, tr.tokens, n, mask_id, ())}
    if n:
        out["absorption_rate"] = pooled(colsum[..., :n].sum(-1), total, ())
        out["uniform_absorption"] = n / valid.sum(-1).float()
        out["dedicated_top1_rate"] = dedicated_top1(colsum, n, valid).float()
        out["dedicated_capture_share"] = capture_share(colsum, sets, n, ())
    return out


def layer_metrics(tr: Trajectory, sets: Tensor, mask_id: int) -> dict[str, Tensor]:
    """STEP_METRICS per (step, layer, sequence), pooled over the heads."""
    heads = (3,)
    cells = Cells(tr, sets, mask_id)
    out = {k: v for k, v in cells.shares(heads).items() if k in STEP_METRICS}
    out["mask_share_of_sinks"] = mask_share(sets, tr.tokens, tr.n_sink, mask_id, heads)
    if tr.n_sink:
        out["uniform_absorption"] = cells.uniform_absorption(heads)
    return out


def rounded(x: Tensor) -> Any:
    return to_py(x.float().round(decimals=DIGITS))


def panel_data(model, tok, tr: Trajectory, metrics: dict[str, Any], budget: float) -> dict[str, Any]:
    """Everything the page shows of one checkpoint's recording (maps reduced to fit `budget` bytes)."""
    mask_id, n = model.mask_id, tr.n_sink
    real = tr.query_valid[0, ITEM]
    keys = torch.cat([torch.ones(n, dtype=torch.bool), real])
    t, k = int(real.sum()), int(keys.sum())
    plan = plan_maps(tr.n_steps, tr.layers, tr.colsum.shape[3], t * k, budget)
    maps = replay_maps(model, tr, plan.steps, plan.layers, real=real, head_mean=plan.head_mean)
    s = metrics["sinks"]
    margin = s.get("column_margin", s.get("eps"))  # "eps" in metrics written before the rename
    sets = detect(tr.colsum, s["rule"], tr.key_valid[:, None, :, None, :], margin, s["std_k"],
                  **{name: s[name] for name in ("gu_threshold",) if name in s})  # where recorded (2410.10781)
    cropped = torch.cumsum(keys.long(), 0) - 1  # full key index -> index among the kept keys
    colsum, valid = tr.colsum[:, plan.layers, ITEM], tr.key_valid[:, ITEM][:, None, None, :]
    tokens = tr.tokens[:, ITEM][:, real]

    def per_layer(x: Tensor) -> Tensor:  # (S, L, B, ...) -> the kept layers of the shown sequence
        return x[:, plan.layers, ITEM]

    return {
        "label": panel_label(metrics), "checkpoint": metrics["checkpoint"], "mode": metrics["mode"],
        "n_sink": n, "steps": tr.n_steps, "layers": [tr.layers[i] for i in plan.layers],
        "heads": tr.colsum.shape[3], "head_mean": plan.head_mean, "map_steps": plan.steps,
        "positions": to_py(real.nonzero().flatten()), "maps": encode_maps(maps), "map_shape": list(maps.shape),
        "canvas": to_py(tokens), "status": to_py(canvas_status(tokens, mask_id)), "mask_id": mask_id,
        "vocab": {str(i): token_text(tok, i, mask_id) for i in sorted(set(tokens.flatten().tolist()))},
        "dominant": to_py(cropped[dominant(colsum, valid)]),
        "dominant_mean": to_py(cropped[dominant(colsum.sum(2), valid[:, :, 0])]),
        "sinks": [[[to_py(cropped[h.nonzero().flatten()]) for h in layer] for layer in step]
                  for step in sets[:, plan.layers, ITEM]],
        "head_metrics": {k: rounded(per_layer(v)) for k, v in head_metrics(tr, sets, mask_id).items()},
        "layer_metrics": {k: rounded(per_layer(v)) for k, v in layer_metrics(tr, sets, mask_id).items()},
        "rule": s["rule"], "notes": plan.notes, "sequences": tr.tokens.shape[1],
        "output": (metrics.get("outputs") or [""])[ITEM],
    }


def panel_label(metrics: dict[str, Any]) -> str:
    m = metrics["model"]
    path = Path(metrics["checkpoint"])
    return f"{path.parent.name}/{path.name} ({m['name']}, {m['variant']})"


def checkpoint_panel(tr: Trajectory, metrics: dict[str, Any], budget: float) -> dict[str, Any]:
    """panel_data of an analysis: the model and tokenizer are loaded again from its checkpoint."""
    settings = metrics["settings"]
    model, _ = ckpt.load_model(metrics["checkpoint"], settings["device"], getattr(torch, settings["dtype"]))
    model.eval()
    return panel_data(model, ckpt.load_tokenizer(metrics["checkpoint"]), tr, metrics, budget)


def write_explorer(out_dir: str | Path, analyses: list[tuple[Trajectory, dict[str, Any]]],
                   max_mb: float = DEFAULT_MAX_MB) -> Path:
    """Write explorer.html for one analysis, or several side by side (same steps and prompts)."""
    budget = max_mb * 1e6 / len(analyses)
    panels = [checkpoint_panel(tr, metrics, budget) for tr, metrics in analyses]
    return write_page(Path(out_dir) / EXPLORER_FILE, panels)


def write_page(path: Path, panels: list[dict[str, Any]]) -> Path:
    data = {"panels": panels, "metrics": STEP_METRICS, "status": ["given", "committed", "new", "masked"],
            "code_max": CODE_MAX}
    # inside <script>, "</" would end the element early; JSON allows the escaped form
    payload = json.dumps(data, separators=(",", ":")).replace("</", "<\\/")
    title = html.escape(" vs ".join(p["label"] for p in panels))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(PAGE.replace("%TITLE%", title).replace("%DATA%", payload), encoding="utf-8")
    return path


# ---- the page: hand-written JS on <canvas>, no library ----------------------------------------------

PAGE = r"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<title>Sink explorer: %TITLE%</title>
<style>
body{font:14px system-ui,sans-serif;margin:12px;color:#222}
h1{font-size:18px;margin:0 0 6px} h2{font-size:15px;margin:4px 0}
#controls{position:sticky;top:0;background:#fff;padding:6px 0;border-bottom:1px solid #ddd;z-index:2}
#controls label{margin-right:14px} #step{width:320px;vertical-align:middle}
#panels{display:flex;gap:18px;flex-wrap:wrap;margin-top:8px}
.panel{flex:1 1 520px;min-width:420px;max-width:760px}
.notes{color:#8a4b00;font-size:12px;margin:2px 0}
.text{font:13px/1.9 ui-monospace,monospace;border:1px solid #ddd;padding:6px;white-space:pre-wrap;
      max-height:180px;overflow:auto}
.tok{border-radius:2px;padding:0 1px}
.tok.given{color:#555;background:#f0f0f0} .tok.committed{color:#000}
.tok.new{background:#ffe066;font-weight:600} .tok.masked{color:#999;background:#e4e4e4}
.tok.hover{outline:2px solid #e6007e}
.legend span{margin-right:10px;font-size:12px;white-space:nowrap}
.cbar{display:inline-block;width:90px;height:10px;vertical-align:middle} .sw{display:inline-block;width:10px;height:10px;margin-right:3px}
table.metrics{border-collapse:collapse;font-size:12px;margin-top:6px}
table.metrics td,table.metrics th{border-bottom:1px solid #eee;padding:2px 6px;text-align:right}
table.metrics td:first-child,table.metrics th:first-child{text-align:left}
#tip{position:fixed;pointer-events:none;background:#222;color:#fff;font-size:12px;padding:3px 6px;
     border-radius:3px;display:none;z-index:3;white-space:pre}
.output{font-size:12px;color:#333;margin-top:4px} canvas.trend{border:1px solid #ddd}
</style></head><body>
<h1>Sink explorer</h1>
<div id="about" class="notes"></div>
<div id="controls">
 <label>step <input id="step" type="range" min="0" value="0"> <span id="stepLabel"></span></label>
 <button id="prev" title="previous step (left arrow)">&#9664;</button>
 <button id="next" title="next step (right arrow)">&#9654;</button>
 <button id="play">play</button>
 <label>layer <select id="layer"></select></label>
 <label>head <select id="head"></select></label>
</div>
<div id="panels"></div>
<div id="tip"></div>
<script id="data" type="application/json">%DATA%</script>
<script>
"use strict";
const DATA = JSON.parse(document.getElementById("data").textContent);
const MARK = {sink: "#ff8c00", mask: "#8c8c8c", dominant: "#e6007e"};
const MAP_PX = 520, STRIP = 6, GAP = 2, LEFT = 10;
const VIRIDIS = ["#440154", "#482878", "#3e4989", "#31688e", "#26828e", "#1f9e89", "#35b779", "#6ece58",
                 "#b5de2b", "#fde725"];
const state = {step: 0, layer: 0, head: "mean"};

function rgb(hex) { return [1, 3, 5].map(i => parseInt(hex.slice(i, i + 2), 16)); }
const LUT = Array.from({length: DATA.code_max + 1}, (_, c) => {  // code -> colour (sqrt scale already)
  const x = c / DATA.code_max * (VIRIDIS.length - 1), i = Math.min(Math.floor(x), VIRIDIS.length - 2);
  const a = rgb(VIRIDIS[i]), b = rgb(VIRIDIS[i + 1]), f = x - i;
  return a.map((v, j) => Math.round(v + (b[j] - v) * f));
});

function decode(b64) {
  const s = atob(b64), out = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) out[i] = s.charCodeAt(i);
  return out;
}

function nearest(list, v) {
  return list.reduce((best, x) => Math.abs(x - v) < Math.abs(best - v) ? x : best, list[0]);
}

class Panel {
  constructor(p, root) {
    this.p = p; this.codes = decode(p.maps);
    [this.S, this.L, this.H, this.T, this.K] = p.map_shape;
    root.insertAdjacentHTML("beforeend", `<div class="panel"><h2></h2><div class="notes"></div>
      <div class="legend"></div><div class="text"></div><div class="where notes"></div><canvas class="map"></canvas>
      <div class="legend marks"></div><table class="metrics"></table><div class="trend-title notes"></div>
      <canvas class="trend" width="360" height="70"></canvas><div class="output"></div></div>`);
    this.el = root.lastElementChild;
    this.el.querySelector("h2").textContent = p.label;
    this.el.querySelector(".notes").textContent = p.notes.join(" ");
    this.el.querySelector(".legend").innerHTML = DATA.status.map(s =>
      `<span class="tok ${s}">${s}</span>`).join(" ") + " <span>(new: revealed by the previous step)</span>";
    this.el.querySelector(".marks").innerHTML = [["sink", "dedicated sink"], ["mask", "[MASK] key / query"],
      ["dominant", "most-attended key of this step (column sums)"]].map(([k, t]) =>
      `<span><i class="sw" style="background:${MARK[k]}"></i>${t}</span>`).join("") +
      `<span>p: 0 <i class="cbar" style="background:linear-gradient(to right,${VIRIDIS.join(",")})"></i>` +
      " 1 (the middle is 0.25: sqrt scale)</span>";
    this.el.querySelector(".output").textContent = p.output ? "final output: " + p.output : "";
    this.canvas = this.el.querySelector("canvas.map");
    this.canvas.addEventListener("mousemove", e => this.hover(e));
    this.canvas.addEventListener("mouseleave", () => this.hover(null));
  }

  keyText(k, step) {
    const n = this.p.n_sink;
    if (k < n) return n > 1 ? `sink ${k}` : "sink";
    return `pos ${this.p.positions[k - n]} ${JSON.stringify(this.p.vocab[this.p.canvas[step][k - n]])}`;
  }

  // the shown map: (T x K) Float32 probabilities, or null when this panel lacks the layer/head
  view() {
    const li = this.p.layers.indexOf(state.layer);
    if (li < 0) return {missing: `layer ${state.layer} is not kept in this panel`};
    const mapStep = nearest(this.p.map_steps, state.step), si = this.p.map_steps.indexOf(mapStep);
    let heads;
    if (this.p.head_mean || state.head === "mean") heads = [...Array(this.H).keys()];
    else if (state.head < this.p.heads) heads = [state.head];
    else return {missing: `head ${state.head} does not exist in this model`};
    const n = this.T * this.K, probs = new Float32Array(n);
    for (const h of heads) {
      const off = ((si * this.L + li) * this.H + h) * n;
      for (let i = 0; i < n; i++) probs[i] += (this.codes[off + i] / DATA.code_max) ** 2 / heads.length;
    }
    const mean = state.head === "mean" || this.p.head_mean, s = state.step;
    const dominant = mean ? this.p.dominant_mean[s][li] : this.p.dominant[s][li][state.head];
    const sinks = mean ? [] : this.p.sinks[s][li][state.head];
    return {probs, li, mapStep, mean, dominant, sinks};
  }

  draw() {
    const s = state.step, v = this.view(), c = this.canvas, ctx = c.getContext("2d");
    this.drawText(s, v.dominant);
    this.el.querySelector(".where").textContent = v.missing ? v.missing :
      `attention at ${this.unit()} ${v.mapStep}` + (v.mapStep !== s ? ` (nearest kept map to ${s})` : "") +
      `, layer ${state.layer}, ` + (v.mean ? "mean of the heads" : `head ${state.head}`) +
      `; rows: queries, columns: keys [sink; content]; colour: sqrt(p); detected sinks (${this.p.rule} rule): ` +
      (v.mean ? "pick a head" : (v.sinks.map(k => this.keyText(k, s)).join(", ") || "none"));
    if (v.missing) { c.width = c.height = 0; this.layout = null; this.drawMetrics(null); return; }
    const cell = Math.max(1, Math.min(14, Math.floor(MAP_PX / this.K)));
    const top = 3 * (STRIP + GAP), x0 = LEFT;
    c.width = x0 + this.K * cell + 2; c.height = top + this.T * cell + 2;
    const img = ctx.createImageData(this.K * cell, this.T * cell);
    for (let q = 0; q < this.T; q++) for (let k = 0; k < this.K; k++) {
      const col = LUT[Math.round(Math.sqrt(v.probs[q * this.K + k]) * DATA.code_max)];
      for (let dy = 0; dy < cell; dy++) for (let dx = 0; dx < cell; dx++) {
        const o = (((q * cell + dy) * this.K * cell) + k * cell + dx) * 4;
        img.data[o] = col[0]; img.data[o + 1] = col[1]; img.data[o + 2] = col[2]; img.data[o + 3] = 255;
      }
    }
    ctx.putImageData(img, x0, top);
    this.layout = {x0, top, cell, strip: STRIP, rows: {sink: 0, mask: STRIP + GAP, dominant: 2 * (STRIP + GAP)},
                   K: this.K, T: this.T, dominant: v.dominant, n_sink: this.p.n_sink};
    this.drawMarks(ctx, s, v);
    this.drawMetrics(v);
    this.drawTrend(v);
  }

  // the step's headline metric over all steps: the layer (dark), the head (light), uniform (dashed)
  drawTrend(v) {
    const c = this.el.querySelector("canvas.trend"), ctx = c.getContext("2d"), key = this.p.n_sink ?
      "absorption_rate" : "sink_mass", n = this.p.steps, pad = 4, w = c.width - 2 * pad, h = c.height - 2 * pad;
    ctx.clearRect(0, 0, c.width, c.height);
    const x = s => pad + (n > 1 ? s / (n - 1) : 0.5) * w, y = val => pad + (1 - val) * h;
    const line = (values, colour, dash) => {
      ctx.strokeStyle = colour; ctx.setLineDash(dash); ctx.lineWidth = 1.5; ctx.beginPath();
      values.forEach((val, s) => val === null ? null : (s ? ctx.lineTo(x(s), y(val)) : ctx.moveTo(x(s), y(val))));
      ctx.stroke(); ctx.setLineDash([]);
    };
    const steps = [...Array(n).keys()], layer = this.p.layer_metrics;
    if (this.p.n_sink) line(steps.map(s => layer.uniform_absorption[s][v.li]), "#999", [3, 3]);
    if (!v.mean) line(steps.map(s => this.p.head_metrics[key][s][v.li][state.head]), "#7fb3d5", []);
    line(steps.map(s => layer[key][s][v.li]), "#1a5276", []);
    ctx.strokeStyle = MARK.dominant; ctx.beginPath(); ctx.moveTo(x(state.step), 0); ctx.lineTo(x(state.step), c.height);
    ctx.stroke();
    this.el.querySelector(".trend-title").textContent = `${key} over the ${this.unit()}s (0 to 1): layer ` +
      `${state.layer} (dark)` + (v.mean ? "" : `, head ${state.head} (light)`) +
      (this.p.n_sink ? ", uniform attention (dashed)" : "") + "; the line marks this one";
  }

  drawMarks(ctx, s, v) {
    const {x0, top, cell, rows} = this.layout, n = this.p.n_sink, masked = this.p.status[s].map(x => x === 3);
    const mark = (k, row, colour) => { ctx.fillStyle = colour; ctx.fillRect(x0 + k * cell, row, cell, STRIP); };
    for (let k = 0; k < n; k++) mark(k, rows.sink, MARK.sink);
    masked.forEach((m, q) => { if (!m) return;
      mark(q + n, rows.mask, MARK.mask);
      ctx.fillStyle = MARK.mask; ctx.fillRect(0, top + q * cell, LEFT - 3, cell); });
    mark(v.dominant, rows.dominant, MARK.dominant);
    ctx.lineWidth = 2;
    const outline = (k, colour, inset) => { ctx.strokeStyle = colour;
      ctx.strokeRect(x0 + k * cell + inset, top + inset, cell - 2 * inset, this.T * cell - 2 * inset); };
    for (let k = 0; k < n; k++) outline(k, MARK.sink, 1);
    if (cell >= 4) outline(v.dominant, MARK.dominant, v.dominant < n && cell >= 8 ? 3 : 1);
  }

  unit() { return this.p.mode === "trajectory" ? "step" : "masking level #"; }

  drawText(s, dominant) {
    const n = this.p.n_sink, box = this.el.querySelector(".text");
    box.replaceChildren(...this.p.canvas[s].map((id, q) => {
      const span = document.createElement("span"), status = DATA.status[this.p.status[s][q]];
      span.className = "tok " + status;
      span.textContent = status === "masked" ? "\u2591" : this.p.vocab[id];
      span.title = `pos ${this.p.positions[q]}: ${JSON.stringify(this.p.vocab[id])} (${status})` +
        (dominant === q + n ? ", the most-attended key" : "");
      return span;
    }));
  }

  drawMetrics(v) {
    const table = this.el.querySelector("table");
    if (!v) { table.replaceChildren(); return; }
    const s = state.step, names = Object.keys(DATA.metrics).filter(k => k in this.p.layer_metrics);
    const fmt = x => x === null || x === undefined ? "n/a" : (+x).toFixed(3);
    const head = v.mean ? null : state.head;
    const rows = names.map(k => `<tr title="${DATA.metrics[k]}"><td>${k}</td>` +
      (head === null ? "" : `<td>${fmt(this.p.head_metrics[k][s][v.li][head])}</td>`) +
      `<td>${fmt(this.p.layer_metrics[k][s][v.li])}</td></tr>`);
    table.innerHTML = `<tr><th>${this.unit()} ${s}, layer ${state.layer}</th>` +
      (head === null ? "" : `<th>head ${head}</th>`) + "<th>all heads</th></tr>" + rows.join("") +
      `<tr><td>most-attended key</td><td colspan="2">${this.keyText(v.dominant, s)}</td></tr>`;
  }

  hover(e) {
    const tip = document.getElementById("tip"), L = this.layout;
    this.el.querySelectorAll(".tok.hover").forEach(t => t.classList.remove("hover"));
    if (!e || !L) { tip.style.display = "none"; return; }
    const r = this.canvas.getBoundingClientRect();
    const k = Math.floor((e.clientX - r.left - L.x0) / L.cell), q = Math.floor((e.clientY - r.top - L.top) / L.cell);
    if (k < 0 || q < 0 || k >= this.K || q >= this.T) { tip.style.display = "none"; return; }
    const v = this.view(), s = state.step;
    tip.textContent = `query ${this.keyText(q + this.p.n_sink, s)}\nkey   ${this.keyText(k, s)}\n` +
      `p = ${v.probs[q * this.K + k].toFixed(4)}`;
    tip.style.left = e.clientX + 12 + "px"; tip.style.top = e.clientY + 12 + "px"; tip.style.display = "block";
    if (k >= this.p.n_sink) this.el.querySelectorAll(".tok")[k - this.p.n_sink].classList.add("hover");
  }
}

const panels = DATA.panels.map(p => new Panel(p, document.getElementById("panels")));
const steps = Math.max(...DATA.panels.map(p => p.steps));
const slider = document.getElementById("step"), layerPick = document.getElementById("layer"),
      headPick = document.getElementById("head");
slider.max = steps - 1;
const layers = [...new Set(DATA.panels.flatMap(p => p.layers))].sort((a, b) => a - b);
layerPick.innerHTML = layers.map(l => `<option value="${l}">${l}</option>`).join("");
const heads = Math.max(...DATA.panels.map(p => p.head_mean ? 0 : p.heads));
headPick.innerHTML = `<option value="mean">mean</option>` +
  [...Array(heads).keys()].map(h => `<option value="${h}">${h}</option>`).join("");
state.layer = layers[0]; state.head = heads ? 0 : "mean"; headPick.value = String(state.head);
document.getElementById("about").textContent = `${DATA.panels.length > 1 ? "Side by side: " : ""}` +
  `the model input at each ${panels[0].unit()} (sequence 1 of ${DATA.panels[0].sequences}) and the attention ` +
  "each query gives each key. Maps are stored as 8-bit codes of sqrt(p) (|error| < 0.004); metrics come " +
  "from the recorded column sums; hover a row of the table for its definition, a cell of a map for its value.";

function render() {  // also after a script set `explorer.state`: the controls show it
  slider.value = state.step; layerPick.value = String(state.layer); headPick.value = String(state.head);
  document.getElementById("stepLabel").textContent = `${state.step} / ${steps - 1}`;
  panels.forEach(p => p.draw());
}
function go(step) { state.step = Math.max(0, Math.min(steps - 1, step)); render(); }
slider.addEventListener("input", () => go(+slider.value));
document.getElementById("prev").onclick = () => go(state.step - 1);
document.getElementById("next").onclick = () => go(state.step + 1);
layerPick.onchange = () => { state.layer = +layerPick.value; render(); };
headPick.onchange = () => { state.head = headPick.value === "mean" ? "mean" : +headPick.value; render(); };
let timer = null;
document.getElementById("play").onclick = e => {
  if (timer) { clearInterval(timer); timer = null; e.target.textContent = "play"; return; }
  e.target.textContent = "pause";
  timer = setInterval(() => go(state.step + 1 < steps ? state.step + 1 : 0), 400);
};
document.addEventListener("keydown", e => {
  if (e.key === "ArrowRight") go(state.step + 1);
  if (e.key === "ArrowLeft") go(state.step - 1);
});
window.explorer = {state, panels, layout: i => panels[i].layout, go, render};
render();
</script></body></html>
"""
