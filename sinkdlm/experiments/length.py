"""Length generalisation: a checkpoint read at 1x, 2x, 4x, 8x its training length (RoPE extrapolation).

At each length, held-out windows of the checkpoint's validation split give
- the ELBO in nats per token (`sinkdlm eval`'s Monte Carlo estimator, sinkdlm.eval.likelihood), with a
  95% t interval over the windows;
- the attention mass on the sink and the sink's value-vector norm against the median content token's,
  per layer, as the training run's sink monitor measures them (sinkdlm.training.objective.sink_monitor:
  for a plain model the most-attended key stands in for the sink), with the mass a key would get under
  uniform attention beside it.
Rows are saved in <out>/length.json as they are measured, keyed by the settings: a stopped study
continues without measuring a (model, length) again.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from sinkdlm.errors import UserError
from sinkdlm.fields import check_choices, setting
from sinkdlm.files import atomic_write
from sinkdlm.intervals import t_interval

ROWS_FILE = "length.json"
TABLE_FILE = "length.md"
FIGURE_FILE = "length.png"
CONFIDENCE = 0.95


@dataclass
class LengthConfig:
    """What `sinkdlm eval-length` measures at each length."""

    multiples: list[int] = setting([1, 2, 4, 8], "lengths to read, as multiples of the training length (data.seq_len)",
                                   at_least=1)
    windows: int = setting(16, "held-out windows per length; the ELBO interval is over these", at_least=2)
    mc_num: int = setting(32, "Monte Carlo masks per window for the ELBO", at_least=1)
    batch_size: int = setting(16, "sequences per forward; a result does not depend on it", at_least=1)
    seed: int = setting(1234, "seeds the ELBO masks and the sink monitor's masked input", at_least=0)

    def __post_init__(self) -> None:
        check_choices(self, "eval-length ")
        if not self.multiples:
            raise UserError("--multiples is empty; give lengths as multiples of the training length, e.g. 1,2,4,8")


def held_out(checkpoint: str | Path) -> tuple[Any, Any, int, str]:
    """(model, validation tokens, training length: data.seq_len, which defaults to block_size, data folder)
    of a checkpoint.
    Models trained on the same data read the same windows, with the same Monte Carlo masks (seeded by
    the window's tokens), so their ELBOs compare window by window."""
    from sinkdlm.checkpoint import load_config_of, load_model
    from sinkdlm.data.shards import PackedData

    cfg = load_config_of(checkpoint)
    try:
        tokens = PackedData(cfg.data.path).tokens("val")
    except (UserError, OSError, KeyError) as e:
        raise UserError(f"eval-length reads the validation split of {checkpoint}'s training data at "
                        f"{cfg.data.path!r}, which cannot be read ({e}); keep that folder in place") from None
    model, _ = load_model(checkpoint)
    return model.eval(), tokens, min(cfg.seq_len, cfg.model.block_size), str(Path(cfg.data.path).resolve())


def measure(model: Any, tokens: Any, length: int, s: LengthConfig) -> dict[str, Any]:
    """ELBO and sink monitor of `model` on evenly spaced held-out windows of `length` tokens."""
    from sinkdlm.data.shards import fixed_windows
    from sinkdlm.eval.likelihood import LikelihoodConfig, score_pairs
    from sinkdlm.training.objective import sink_monitor

    windows = fixed_windows(tokens, length, s.windows)
    estimates = score_pairs(model, [([], w.tolist()) for w in windows],
                            LikelihoodConfig(mc_num=s.mc_num, seed=s.seed, batch_size=s.batch_size))
    nll = [-e.loglik / length for e in estimates]
    ci = t_interval(nll, CONFIDENCE)
    layers = sink_monitor(model, (windows, None), model.mask_id, s.seed)
    n_sink = model.cfg.sink_tokens
    return {"length": length, "windows": len(windows), "window_elbo": nll,
            "elbo": statistics.fmean(nll), "elbo_lo": ci[0] if ci else None, "elbo_hi": ci[1] if ci else None,
            "sink_mass": statistics.fmean(r["sink_mass"] for r in layers),
            "uniform_mass": (n_sink or 1) / (length + n_sink),
            "value_norm_ratio": statistics.fmean(r["sink_value_norm"] / r["median_value_norm"] for r in layers),
            "layers": layers}


def study(checkpoints: Sequence[str | Path], labels: Sequence[str], s: LengthConfig, out: str | Path,
          overwrite: bool = False, progress: bool = True) -> list[dict[str, Any]]:
    """Every (checkpoint, multiple) row; writes length.json (after each row), length.md and length.png."""
    from sinkdlm.optional import require

    require("matplotlib", "sinkdlm eval-length (its figure)")
    if len(labels) != len(checkpoints):
        raise UserError(f"--labels names {len(labels)} models but --checkpoint gives {len(checkpoints)}; "
                        f"give one label per checkpoint")
    out = Path(out)
    rows = _earlier_rows(out, s, overwrite)
    out.mkdir(parents=True, exist_ok=True)
    for label, checkpoint in zip(labels, checkpoints):
        model, tokens, train_len, data = held_out(checkpoint)
        for m in s.multiples:
            done = [r for r in rows if r["label"] == label and r["multiple"] == m]
            if done and done[0]["checkpoint"] != str(checkpoint):
                raise UserError(f"{out / ROWS_FILE} holds {label!r} measured on {done[0]['checkpoint']}, not "
                                f"{checkpoint}; use another label, --out or --overwrite")
            if done:
                continue
            if len(tokens) < m * train_len * 2:
                raise UserError(f"{checkpoint}: the validation split has {len(tokens)} tokens, fewer than two windows "
                                f"of {m} x {train_len}; drop multiple {m} from --multiples")
            row = {"label": label, "checkpoint": str(checkpoint), "data": data,
                   "multiple": m, "train_length": train_len,
                   **measure(model, tokens, m * train_len, s)}
            rows.append(row)
            atomic_write(out / ROWS_FILE, json.dumps({"settings": asdict(s), "rows": rows}, indent=1))
            if progress:
                print(f"{label} {m}x ({row['length']} tokens): ELBO {row['elbo']:.4f} nats/token, sink mass "
                      f"{row['sink_mass']:.3f} (uniform {row['uniform_mass']:.4f}), value norm ratio "
                      f"{row['value_norm_ratio']:.3f}", flush=True)
    atomic_write(out / TABLE_FILE, table(rows))
    plot(rows, out / FIGURE_FILE)
    return rows


def _earlier_rows(out: Path, s: LengthConfig, overwrite: bool) -> list[dict[str, Any]]:
    path = out / ROWS_FILE
    if overwrite or not path.is_file():
        return []
    saved = json.loads(path.read_text())
    if _key(saved["settings"]) != _key(asdict(s)):
        raise UserError(f"{path} was measured with other settings ({saved['settings']}); pass --overwrite to start "
                        f"again or choose another --out")
    return saved["rows"]


def _key(settings: dict[str, Any]) -> dict[str, Any]:
    """The settings a row depends on (a later call may add multiples)."""
    return {k: v for k, v in settings.items() if k != "multiples"}


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| model | length (x train) | windows | ELBO nats/token [95% CI] | sink attention mass | uniform "
             "share | sink / median value norm |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        ci = "" if r["elbo_lo"] is None else f" [{r['elbo_lo']:.4f}, {r['elbo_hi']:.4f}]"
        lines.append(f"| {r['label']} | {r['length']} ({r['multiple']}x) | {r['windows']} | {r['elbo']:.4f}{ci} | "
                     f"{r['sink_mass']:.3f} | {r['uniform_mass']:.4f} | {r['value_norm_ratio']:.3f} |")
    return "\n".join(lines + ["", "sink attention mass: mean over layers, heads and queries of the attention on "
                               "the sink (a plain model: its most-attended key); masked input at t = 0.5.", ""]
                     + paired_table(rows))


def paired_differences(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """ELBO of each model minus the first model's, window by window, at every length both read on the
    same data: mean and 95% t interval over the windows."""
    first = rows[0]["label"] if rows else None
    base = {(r["length"], r.get("data")): r for r in rows if r["label"] == first}
    out = []
    for r in rows:
        b = base.get((r["length"], r.get("data")))
        if r["label"] == first or b is None or len(b["window_elbo"]) != len(r["window_elbo"]):
            continue
        diff = [x - y for x, y in zip(r["window_elbo"], b["window_elbo"])]
        ci = t_interval(diff, CONFIDENCE)
        out.append({"label": r["label"], "base": first, "length": r["length"], "multiple": r["multiple"],
                    "mean": statistics.fmean(diff), "lo": ci[0] if ci else None, "hi": ci[1] if ci else None})
    return out


def paired_table(rows: list[dict[str, Any]]) -> list[str]:
    pairs = paired_differences(rows)
    if not pairs:
        return []
    lines = ["| ELBO difference (nats/token), same windows and masks | length | mean | 95% CI over windows |",
             "|---|---|---|---|"]
    for p in pairs:
        ci = "" if p["lo"] is None else f"[{p['lo']:+.4f}, {p['hi']:+.4f}]"
        lines.append(f"| {p['label']} - {p['base']} | {p['length']} ({p['multiple']}x) | {p['mean']:+.4f} | {ci} |")
    return lines + [""]


def plot(rows: list[dict[str, Any]], path: Path) -> Path:
    """ELBO, sink attention mass and value-norm ratio against length, one line per model."""
    from sinkdlm.analysis.plots import plt, save

    fig, axes = plt.subplots(1, 3, figsize=(14, 4), layout="constrained")
    for k, label in enumerate(dict.fromkeys(r["label"] for r in rows)):
        mine = sorted((r for r in rows if r["label"] == label), key=lambda r: r["length"])
        x = [r["length"] for r in mine]
        errs = [[r["elbo"] - (r["elbo_lo"] or r["elbo"]) for r in mine], [(r["elbo_hi"] or r["elbo"]) - r["elbo"]
                                                                         for r in mine]]
        axes[0].errorbar(x, [r["elbo"] for r in mine], yerr=errs, marker="o", capsize=3, color=f"C{k}", label=label)
        axes[1].plot(x, [r["sink_mass"] for r in mine], marker="o", color=f"C{k}", label=label)
        axes[1].plot(x, [r["uniform_mass"] for r in mine], ls=":", color=f"C{k}")
        axes[2].plot(x, [r["value_norm_ratio"] for r in mine], marker="o", color=f"C{k}", label=label)
    titles = ("held-out ELBO (nats/token, 95% CI)", "attention mass on the sink (dotted: uniform)",
              "sink value norm / median token's")
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_title(title)
        ax.legend(fontsize="small")
    axes[1].set_yscale("log")
    return save(fig, path)
