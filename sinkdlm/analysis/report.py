"""Write an analysis to a folder: metrics.json, the figures (PNG) and report.md embedding them."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sinkdlm.analysis import plots
from sinkdlm.analysis.nulls import NULL_NAMES
from sinkdlm.analysis.query_classes import CLASS_KEYS, SOURCES
from sinkdlm.analysis.stats import DEFAULT_GU_THRESHOLD, MOVING_KEYS, Trajectory, column_margin_of, detect

METRICS_FILE = "metrics.json"
REPORT_FILE = "report.md"
# summary metrics `sinkdlm analyze` prints (the report has them all)
HEADLINE = ("gu_sink_rate", "gu_sink_rate_dedicated", "mask_absorption_ratio", "absorption_rate", "absorption_ratio",
            "dedicated_top1_rate", "dominant_stability", "event_locked_change", "value_rank_same_type_sinks")
# per-layer metrics the report tabulates (metrics.json has every one, per layer and per layer and head)
PER_LAYER = ("gu_sink_rate", "gu_sink_rate_dedicated", "gu_sink_rate_first", "gu_sink_rate_mask",
             "gu_sink_rate_content", "mask_absorption", "mask_absorption_uniform", "absorption_rate",
             "dominant_stability", "event_locked_change", "same_top_key_as_next_layer")


def model_label(metrics: dict[str, Any]) -> str:
    m = metrics["model"]
    name = Path(metrics["checkpoint"]).parent.name or m["name"]
    return f"{name} ({m['name']}, {m['variant']})"


def chosen_head(metrics: dict[str, Any], tr: Trajectory) -> tuple[int, int]:
    """(recorded-layer index, head) with the most attention on detected sinks."""
    mass = torch.tensor(metrics["sinks"]["per_layer_head"]["sink_mass"])
    flat = int(mass.argmax())
    return flat // mass.shape[1], flat % mass.shape[1]


def real_keys(tr: Trajectory, step: int = 0) -> Tensor:
    """Key columns of sequence 0 that are not padding: the sinks and the real content positions."""
    sinks = torch.ones(tr.n_sink, dtype=torch.bool)
    return torch.cat([sinks, tr.query_valid[step, 0]])


def _crop(m: Tensor, tr: Trajectory, step: int) -> Tensor:
    """A (T, S+T) map of sequence 0 without padding rows/columns."""
    return m[tr.query_valid[step, 0]][:, real_keys(tr, step)]


def make_figures(tr: Trajectory, metrics: dict[str, Any], out: Path) -> dict[str, Path]:
    label, s = model_label(metrics), metrics["sinks"]
    li, head = chosen_head(metrics, tr)
    layer, unit = tr.layers[li], "step" if metrics["mode"] == "trajectory" else "masking level #"
    figs: dict[str, Path] = {}
    steps = sorted(tr.maps)
    if steps:
        maps = [_crop(tr.maps[t][li, head], tr, t) for t in steps]
        figs["attention_maps"] = plots.attention_maps(
            maps, steps, tr.n_sink, f"{label}\nattention, layer {layer}, head {head}", out / "attention_maps.png")
    share = tr.share()[:, :, 0]  # (S, L, H, K), sequence 0
    panel = plots.panel_layers(tr.layers)
    figs["step_position"] = plots.step_position_heatmaps(
        [share[:, tr.layers.index(l)].mean(1)[:, real_keys(tr)] for l in panel], panel, tr.n_sink,
        f"{label}\nincoming attention per {unit} (heads averaged)", out / "step_position.png")
    dominant = torch.tensor(s["per_layer"]["dominant_position"])  # (layers, steps)
    figs["dominant_sink"] = plots.dominant_vs_step(
        dominant[[tr.layers.index(l) for l in panel]], panel, tr.n_sink,
        f"{label}\ndominant sink position per {unit} (heads summed)", out / "dominant_sink.png")
    figs["sink_mass"] = plots.layer_head_map(
        torch.tensor(s["per_layer_head"]["sink_mass"]), tr.layers, f"attention share on sinks ({s['rule']} rule)",
        f"{label}\nattention share on sinks per layer and head", out / "sink_mass.png")
    figs["value_norms"] = _value_scatter(tr, s, li, head, f"{label}\nvalue norms, layer {layer}, head {head}, "
                                         f"all {unit}s", out / "value_norms.png")
    return figs


def _value_scatter(tr: Trajectory, s: dict[str, Any], li: int, head: int, title: str, path: Path) -> Path:
    colsum = tr.colsum[:, li, 0, head]  # (S, K)
    valid = tr.key_valid[:, 0]
    sinks = detect(colsum, s["rule"], valid, column_margin_of(s), s["std_k"], s.get("gu_threshold", DEFAULT_GU_THRESHOLD))
    kind = sinks.long()
    kind[:, : tr.n_sink] = 2
    share = tr.share()[:, li, 0, head]
    return plots.value_norm_scatter(share[valid], tr.value_norm[:, li, 0, head][valid], kind[valid], title, path)


def write_report(out_dir: str | Path, metrics: dict[str, Any], tr: Trajectory) -> Path:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    figs = make_figures(tr, metrics, out)
    (out / METRICS_FILE).write_text(json.dumps(metrics, indent=1))
    (out / REPORT_FILE).write_text(render_markdown(metrics, figs))
    return out / REPORT_FILE


CAPTIONS = {
    "attention_maps": "Attention maps (query x key) of one head at two steps: a sink is a bright column.",
    "step_position": "Incoming attention per key position at every step: a moving sink is a bright trace "
                     "that jumps; a pinned one is a straight column.",
    "dominant_sink": "Position of the most-attended key (heads summed) at each step, one panel per layer "
                     "(at most four, spread over the depth; S = dedicated sink): a pinned sink is a flat line.",
    "sink_mass": "Share of attention that lands on detected sinks, per layer and head.",
    "value_norms": "Incoming attention vs value L2 norm of every key: sinks should have the lowest norms.",
}

# summary metric -> what it measures (every key of stats.SUMMARY_KEYS has one; a test holds it)
DEFINITIONS = {
    "gu_sink_rate": "Gu et al. 2024 (2410.10781): share of (step, sequence, layer, head) cells whose mean "
                    "attention over the queries on one key exceeds gu_threshold (0.3 by default): comparable "
                    "across lengths, unlike the eps rule",
    "gu_sink_rate_dedicated": "the same, counting only cells whose winning key is a dedicated sink",
    "gu_sink_rate_first": "the same, counting only cells whose winning key is content position 0 holding a "
                          "token (not [MASK])",
    "gu_sink_rate_mask": "the same, counting only cells whose winning key is a [MASK] input (position 0 included)",
    "gu_sink_rate_content": "the same, counting only cells whose winning key is another content token",
    "mask_absorption": "share of all attention on the [MASK] input keys taken together, pooled: spread over "
                       "many equal [MASK] values it is a sink no single key shows",
    "mask_absorption_ratio": "mask_absorption over the share uniform attention would give them (#masks / #keys, "
                             "pooled): 1 = no more than uniform",
    "absorption_rate": "share of all attention that lands on the dedicated sink token(s), pooled over steps, "
                       "layers, sequences and heads (sums before division)",
    "absorption_ratio": "absorption_rate over its uniform baseline: 1 = no more than uniform attention over "
                        "the valid keys would give the sink",
    "dedicated_top1_rate": "share of (step, layer, sequence, head) cells, attention averaged over the queries, "
                           "in which the dedicated sink is the most-attended key",
    "dedicated_capture_share": "of the attention on sinks (the dedicated sinks plus the detected content "
                               "sinks), the share the dedicated sink(s) take, pooled; a head with no sink mass "
                               "adds nothing",
    "sink_mass": "share of all attention that lands on detected sinks (dedicated sinks included where "
                 "detected), pooled",
    "dominant_stability": "share of consecutive steps at which a head's most-attended key (dedicated sinks "
                          "included) stays at the same position: 1 = pinned, 0 = it moves at every step",
    "content_dominant_stability": "the same, among content keys only (dedicated sinks left out)",
    "sink_set_iou": "intersection over union of a head's detected sink positions at consecutive steps, over "
                    "the pairs where either step has a sink (two empty sets are left out: n/a without sinks)",
    "event_change_rate": "P(a head's most-attended key changes from step s to s + 1 | that key's position was "
                         "[MASK] at s and revealed at s + 1), pooled counts",
    "no_event_change_rate": "P(the most-attended key changes | it was not just revealed), pooled counts",
    "event_locked_change": "event_change_rate - no_event_change_rate: > 0 when revealing the token under a "
                           "head's top key moves it (0 under uniform attention)",
    "cross_layer_stability": "share of (step, sequence, pair of consecutive recorded layers) in which the "
                             "most-attended key (heads summed) is the same in both layers",
    "distinct_dominant_positions": "how many different positions are a head's most-attended key over all "
                                   "steps (1 = never moves)",
    "distinct_sink_positions": "how many different positions are detected as a head's sinks over all steps",
    "value_rank_sinks": "mid-rank (ties share their mean rank) of a detected content sink's value-vector L2 "
                        "norm among the content keys of its head (0 = lowest, 1 = highest; dedicated sinks left "
                        "out), averaged with the sink's attention mass as weight (the paper: sinks have the "
                        "lowest norms)",
    "value_norm_ratio_sinks": "a detected content sink's value norm over the mean value norm of the content keys "
                              "of its head, weighted by the sink's attention mass (below 1 = smaller than "
                              "an average key)",
    "value_rank_same_type_sinks": "share of the non-sink content keys of the sink's own kind ([MASK] or not) "
                                  "with a lower value norm than the sink, ties half, weighted by sink mass: "
                                  "0.5 = a typical key of its kind, so the mask embedding's norm is not read "
                                  "as the sink's",
    "key_rank_same_type_sinks": "the same for the key-vector norm",
    "value_attention_spearman": "Spearman correlation, per head and step, of the attention each content key "
                                "receives with its value norm (mid-ranks), averaged over cells: < 0 = "
                                "attention goes to low-norm values",
    "key_rank_sinks": "the same rank for the key-vector norm",
    "key_norm_ratio_sinks": "the same ratio for the key-vector norm",
    "value_rank_dedicated": "value-norm mid-rank of the dedicated sink(s) among all valid keys, weighted by their "
                            "attention mass",
    "value_norm_ratio_dedicated": "the dedicated sink(s)' value norm over the content keys' mean value norm, "
                                  "weighted by their attention mass",
    "key_rank_dedicated": "key-norm rank of the dedicated sink(s), weighted by their attention mass",
    "key_norm_ratio_dedicated": "the same ratio for the key-vector norm",
    "mask_share_of_sinks": "share of detected content sinks whose input token is [MASK]",
}
RULE_DEFINITIONS = {
    "gu": "a key is a sink of its head when the head's mean attention on it exceeds gu_threshold (2410.10781)",
    "eps": "a key is a sink when its incoming attention (column sum over queries) exceeds the mean of the "
           "other keys' by column_margin (2510.15731; about 4/T of the attention at the default 3, so not "
           "comparable across lengths)",
    "std": "a key is a sink when its incoming attention exceeds the mean over keys by std k standard deviations",
    "top1": "the single most-attended key of each head is its sink",
}
RULE_COLUMNS = ("sinks: detected sinks per step, layer and head (dedicated included); content sinks: those "
                "at content positions; consecutive IoU: as sink_set_iou; distinct positions: as "
                "distinct_sink_positions. All averaged over steps, layers, heads and sequences.")
INTERVENTION_COLUMNS = ("token agreement: share of generated positions where the intervention chose the same "
                        "token as the unmodified run; held-out ELBO: the masked-diffusion bound on the "
                        "negative log-likelihood, nats per token (lower is better; a uniform guess over V "
                        "tokens scores ln V), on the same windows and masks for every row, so the rows "
                        "are paired.")


def render_markdown(metrics: dict[str, Any], figs: dict[str, Path]) -> str:
    s = metrics["sinks"]
    lines = [f"# Sink analysis: {model_label(metrics)}", "",
             f"Checkpoint `{metrics['checkpoint']}`, mode **{metrics['mode']}**, {s['steps']} steps, "
             f"sink rule `{s['rule']}` (gu threshold {s.get('gu_threshold', DEFAULT_GU_THRESHOLD)}, column margin "
             f"{column_margin_of(s)}, std k {s['std_k']}), layers {s['layers']}.", ""]
    lines += _text_md(metrics)
    lines += _summary_md(metrics)
    lines += _per_layer_md(s)
    lines += _query_classes_md(metrics.get("query_classes"), s["layers"])
    lines += ["Detection rules compared:", "",
              "| rule | sinks | content sinks | consecutive IoU | distinct positions |", "|---|---|---|---|---|"]
    lines += [f"| {r} | {_fmt(v['n_sinks'])} | {_fmt(v['content_sinks'])} | {_fmt(v['iou'])} | "
              f"{_fmt(v['distinct_sinks'])} |" for r, v in s["rules"].items()]
    lines += [""] + [f"- `{r}`: {d}." for r, d in RULE_DEFINITIONS.items()] + ["", RULE_COLUMNS, ""]
    tokens = ", ".join(f"`{json.dumps(t, ensure_ascii=False)}` x{n}" for t, n in s.get("sink_token_text", []))
    lines += [f"Tokens at detected content sinks (decoded text, most frequent first): {tokens or 'none detected'}.",
              ""]
    lines += _interventions_md(metrics.get("interventions"), metrics.get("elbo_setup"))
    lines += ["## Figures", ""]
    for name, path in figs.items():
        lines += [f"### {name}", "", CAPTIONS[name], "", f"![{name}]({path.name})", ""]
    lines += [f"Timing: recording + metrics {metrics.get('record_seconds')} s, total {metrics.get('seconds')} s.", ""]
    return "\n".join(lines)


def _text_md(metrics: dict[str, Any]) -> list[str]:
    """The prompts and what the model made of them, as plain text (newlines kept)."""
    prompts, outputs = metrics.get("prompts", []), metrics.get("outputs") or []
    if not prompts:
        return []
    lines = ["## Text", ""]
    for i, prompt in enumerate(prompts):
        lines += [f"Prompt {i + 1}:", "", "```text", prompt, "```", ""]
        if i < len(outputs):
            lines += [f"Completion {i + 1}:", "", "```text", outputs[i], "```", ""]
    return lines


def _summary_md(metrics: dict[str, Any]) -> list[str]:
    baselines = metrics.get("baselines", {})
    lines = ["## Summary (pooled over steps, layers, sequences and heads)", "",
             "| metric | value | uniform baseline | what it measures |", "|---|---|---|---|"]
    lines += [f"| {k} | {_fmt(v)} | {_fmt(baselines.get(k))} | {DEFINITIONS[k]} |"
              for k, v in metrics["summary"].items()]
    lines += ["", UNIFORM_NOTE, ""]
    return lines + _nulls_md(metrics)


UNIFORM_NOTE = ("Uniform baseline: the value if every query attended uniformly over its valid keys (a head's "
                "most-attended key then drawn at random at every step), with this recording's keys and "
                "detected sinks; n/a where there is no uniform reference (see the null models) or the metric "
                "is undefined (no dedicated sink, no content sink detected). Shares are pooled: sums over "
                "the cells before one division.")
NULLS_NOTE = ("Null models: (a) uniform attention over the same valid keys, in closed form (a head's top key "
              "a uniform draw at each step; n/a where uniform attention makes no sinks); measured with the same "
              "code and sink rule: (b) the same model on held-out text at the recording's masking levels, a "
              "fresh random mask at each level (about half the tokens change between steps); (c) the same "
              "model on held-out text masked as the trajectory's first step, revealing at each step as many "
              "random masked tokens as the sampler did. A moving-sink metric reads as sink movement only where "
              "it differs from all three.")


def _nulls_md(metrics: dict[str, Any]) -> list[str]:
    nulls = metrics.get("nulls")
    if not nulls:
        return []
    lines = ["## Moving-sink metrics against their null models", "",
             "| metric | this recording | " + " | ".join(NULL_NAMES.values()) + " |", "|---" * (len(NULL_NAMES) + 2) + "|"]
    for key in MOVING_KEYS:
        cells = [_fmt((nulls.get(name) or {}).get(key)) for name in NULL_NAMES]
        lines.append(f"| {key} | {_fmt(metrics['summary'].get(key))} | " + " | ".join(cells) + " |")
    return lines + ["", NULLS_NOTE + ("" if nulls.get("fixed_text") else
                                      " (b) and (c) are n/a: they need a trajectory and held-out text."), ""]


def _per_layer_md(s: dict[str, Any]) -> list[str]:
    """The main per-layer metrics, one row per recorded layer, and the pooled value."""
    table = s.get("per_layer", {})
    keys = [k for k in PER_LAYER if k in table]
    if not keys:
        return []
    lines = ["## Per layer", "", "| layer | " + " | ".join(keys) + " |", "|---" * (len(keys) + 1) + "|"]
    for i, layer in enumerate(s["layers"]):
        lines.append(f"| {layer} | " + " | ".join(_fmt(table[k][i]) for k in keys) + " |")
    pooled = {**s.get("summary", {}), "mask_absorption_uniform": s.get("baselines", {}).get("mask_absorption"),
              "same_top_key_as_next_layer": s.get("summary", {}).get("cross_layer_stability")}
    lines.append("| pooled | " + " | ".join(_fmt(pooled.get(k)) for k in keys) + " |")
    return lines + ["", "Definitions as in the summary; mask_absorption_uniform: the [MASK] keys' share under "
                        "uniform attention (#masks / #keys); same_top_key_as_next_layer: whether the layer's "
                        "most-attended key (heads summed) is the next recorded layer's (pooled: "
                        "cross_layer_stability).", ""]


QUERY_CLASS_NOTE = (
    "Active queries: masked copy targets whose rule inputs (trigger and copy source) are visible; dormant: the "
    "other masked positions; visible: the unmasked ones (the copy-task probes' classification). queries: "
    "(query, step) pairs over all sequences; per sequence and step: their mean where the class has any. Each "
    "column is the summary metric of that name, from this class's queries only: a cell's Gu mean is over the "
    "class's queries in it (cells without one are left out), so a class with one or two queries per sequence "
    "and step crosses the threshold more easily than a mean over many; absorption_rate: the dedicated sink's "
    "share, against absorption_uniform (#sinks / #keys); mask_absorption against mask_absorption_uniform "
    "(#masks / #keys); n/a: undefined (no dedicated sink, no [MASK] key).")


def _query_classes_md(split: dict[str, Any] | None, layers: list[int]) -> list[str]:
    """The query-level metrics per class of a synthetic copy task, per layer and pooled."""
    if not split:
        return []
    lines = ["## Query classes of the copy task", "",
             f"Classes from {SOURCES[split['source']]}.", "",
             "| class | queries (per sequence and step) | layer | " + " | ".join(CLASS_KEYS) + " |",
             "|---" * (len(CLASS_KEYS) + 3) + "|"]
    for name, c in split["classes"].items():
        if not c["queries"]:
            lines.append(f"| {name} | no queries | all | " + " | ".join(["no queries"] * len(CLASS_KEYS)) + " |")
            continue
        count = f"{c['queries']} ({c['queries_per_sequence_step']:.2f})"
        rows = [(str(layer), {k: v[i] for k, v in c["per_layer"].items()}) for i, layer in enumerate(layers)]
        for layer, values in rows + [("pooled", c["summary"])]:
            lines.append(f"| {name} | {count} | {layer} | " + " | ".join(_fmt(values.get(k)) for k in CLASS_KEYS)
                         + " |")
    return lines + ["", QUERY_CLASS_NOTE, ""]


def _interventions_md(results: dict[str, Any] | None, setup: dict[str, Any] | None) -> list[str]:
    if not results:
        return []
    lines = ["## Interventions during sampling", "",
             "| intervention | token agreement with unmodified run | held-out ELBO (nats/token) |", "|---|---|---|"]
    lines += [f"| {name} | {_fmt(r['agreement'])} | {_fmt(r['elbo'])} |" for name, r in results.items()]
    lines += ["", INTERVENTION_COLUMNS, ""]
    return lines + (elbo_note(setup) if setup else [])


def elbo_note(setup: dict[str, Any]) -> list[str]:
    """Why this ELBO is not the number training printed: other windows, masks and estimator."""
    t = setup["training"]
    logged = f" It logged {t['val_elbo']:.4f} at this checkpoint's step." if t.get("val_elbo") is not None else ""
    windows = (f"{setup['windows']} windows of {setup['length']} tokens from {setup['source']}"
               if setup["windows"] is not None else setup["source"])
    return ["Why this held-out ELBO differs from the validation ELBO printed during training: both are Monte "
            "Carlo estimates of the same bound (the mean over t and masks of the sum over masked tokens of "
            "CE / p, per token), but on different windows and with different masks:", "",
            f"- Here: {windows}; each window is scored at {setup['levels']} masking levels on the fixed grid "
            f"t = (j + 0.5) / {setup['levels']} (the same levels for every window), p = (1 - eps) t + eps with "
            f"eps = {setup['eps']}, masks drawn from seed {setup['seed']}.",
            f"- Training: {t['windows']} windows of {t['length']} tokens evenly spaced over the validation "
            f"split (data.val_windows), one masking level per window, stratified over the windows "
            f"(t_i = (u + i / {t['windows']}) mod 1), eps = {t['eps']}, masks from data.val_seed = {t['seed']}."
            f"{logged}",
            "- Windows from the validation split are picked by the same evenly spaced rule, so they are a few "
            "of training's (the first and the last always coincide); a few windows average less text, and "
            "one unusual window (a title page, a list of names) moves the mean. Training's number masks each "
            "window once, so another data.val_seed moves it too. On the demo checkpoint these two effects "
            "are each about 0.2 nats/token, and the two estimators agree on the same windows (measured in "
            "the repository's docs/demo-outputs.md). Compare the rows of the table above with each other "
            "(same windows and masks), not with the training curve.", ""]


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def summary_lines(metrics: dict[str, Any], report: Path) -> list[str]:
    """What `sinkdlm analyze` prints: the headline metrics with their baselines and null models, then
    the report path."""
    s, baselines, nulls = metrics["sinks"], metrics.get("baselines", {}), metrics.get("nulls") or {}
    lines = [f"sink analysis of {model_label(metrics)}: {metrics['mode']}, {s['steps']} steps, "
             f"layers {s['layers']}, rule {s['rule']}"]
    for key in HEADLINE:
        value = metrics["summary"].get(key)
        if value is None:
            continue
        refs = [f"uniform {_fmt(baselines[key])}"] if baselines.get(key) is not None else []
        refs += [f"null {name.split()[0]} {_fmt(nulls[n][key])}" for n, name in NULL_NAMES.items()
                 if (nulls.get(n) or {}).get(key) is not None and key in MOVING_KEYS
                 and n != "uniform_attention"]  # null (a) is the uniform baseline, already shown
        lines.append(f"  {key} {_fmt(value)}" + (f" ({', '.join(refs)})" if refs else "") + f": {DEFINITIONS[key]}")
    results = metrics.get("interventions") or {}
    if "baseline" in results and results["baseline"]["elbo"] is not None:
        lines.append(f"  held-out ELBO {_fmt(results['baseline']['elbo'])} nats/token (see the report for how "
                     f"it differs from training's validation ELBO)")
    lines.append(f"report: {report} (every metric defined there; figures and metrics.json beside it; "
                 f"{metrics['seconds']:.1f} s)")
    return lines
