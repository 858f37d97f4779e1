"""Attention-sink analysis of one checkpoint: record, measure against baselines and null models,
intervene.

`analyze_checkpoint(path, ...)` returns the metrics dict (what a study tabulates, through
`moving_sink_summary`); `run_analysis` also returns the recording, which `report.write_report`
turns into metrics.json, figures and report.md.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor

from sinkdlm import checkpoint as ckpt
from sinkdlm.analysis import nulls, query_classes
from sinkdlm.analysis.record import RecordSettings, record_inputs, record_masked, record_trajectory
from sinkdlm.analysis.stats import (
    DEFAULT_GU_THRESHOLD,
    DEFAULT_MARGIN,
    DEFAULT_STD_K,
    Rule,
    Trajectory,
    moving_sink_summary,
    to_py,
    trajectory_metrics,
)
from sinkdlm.errors import UserError
from sinkdlm.fields import check_choices, setting

Dtype = Literal["float32", "bfloat16"]  # analyze --dtype: names of torch dtypes
DEFAULT_PROMPTS = 16  # trajectories per checkpoint (issue 22): a metric of 2 prompts is mostly the prompts' noise

__all__ = ["AnalysisConfig", "analyze_checkpoint", "moving_sink_summary", "run_analysis"]


@dataclass
class AnalysisConfig:
    """What `analyze` records and measures; `sinkdlm analyze` builds its options from these fields."""

    mode: Literal["trajectory", "masked"] = setting(
        "trajectory", "trajectory: record a generation; masked: fixed text at masking levels")
    levels: Sequence[float] = setting((0.75, 0.5, 0.25), "masked mode: masking levels, in this order",
                                      above=0, at_most=1)
    steps: int = setting(32, "trajectory: denoising steps", at_least=1)
    gen_length: int = setting(32, "trajectory: tokens to generate", at_least=1)
    temperature: float = setting(0.0, "trajectory: sampling temperature; 0 = greedy", at_least=0)
    gu_threshold: float = setting(DEFAULT_GU_THRESHOLD, "gu rule (2410.10781): a head has a sink when its mean "
                                  "attention on one key exceeds this share", above=0, below=1)
    column_margin: float = setting(DEFAULT_MARGIN, "eps rule (2510.15731; the option was --eps): a key is a sink "
                                   "when its column sum exceeds the others' mean by this margin", at_least=0)
    std_k: float = setting(DEFAULT_STD_K, "std rule: column sum above mean + k * std", at_least=0)
    rule: Rule = setting("gu", "the detection rule behind the sink tables (gu, the standard; eps, std and top1 "
                               "are reported beside it)")
    layers: Sequence[int] | None = setting(None, "layers to record, e.g. 0,3", unset="all", at_least=0)
    map_steps: Sequence[int] | None = setting(None, "two steps for the attention-map figure",
                                              unset="1/4 and 3/4 of the way", at_least=0)
    prompt_tokens: int = setting(16, "length of the prompts cut from held-out text when none are given",
                                 at_least=1)
    max_prompts: int = setting(DEFAULT_PROMPTS, "prompts cut from held-out text when none are given", at_least=1)
    max_windows: int = setting(DEFAULT_PROMPTS, "held-out windows (masked mode, the fixed-text nulls, ELBO)",
                               at_least=1)
    top_k: Sequence[int] = setting((1, 4), "interventions: hide the top-K sinks of the previous step",
                                   at_least=1)
    interventions: bool = setting(True, "the intervention runs")
    nulls: bool = setting(True, "the moving-sink metrics under the null models (uniform attention, fixed text, "
                                "one-token reveal)")
    elbo_samples: int = setting(8, "masking levels per window for the intervention ELBOs; 0 = skip",
                                 at_least=0)
    seed: int = setting(0, "seeds sampling and the ELBO's masks", at_least=0)
    device: str = setting("cpu", "torch device, e.g. cuda")
    dtype: Dtype = setting("float32", "parameter dtype; bfloat16 halves the memory of a large model "
                                      "(statistics are accumulated in float32 either way)")
    progress: bool = setting(True, "progress bars")

    def __post_init__(self) -> None:
        check_choices(self, "analysis ")
        if not self.levels:
            raise UserError("analysis levels is empty; give at least one masking level, e.g. --levels 0.5")

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> AnalysisConfig:
        """Settings as stored (e.g. in metrics.json), reading the old name `eps` of column_margin."""
        values = dict(values)
        if "eps" in values:
            values.setdefault("column_margin", values.pop("eps"))
        return cls(**values)

    def n_steps(self) -> int:
        return self.steps if self.mode == "trajectory" else len(self.levels)

    def figure_steps(self) -> list[int]:
        n = self.n_steps()
        steps = list(self.map_steps) if self.map_steps is not None else [n // 4, (3 * n) // 4]
        if any(not 0 <= s < n for s in steps):
            raise UserError(f"map steps {steps} must lie in 0..{n - 1}")
        return steps


def _tokenize(tok, texts: Sequence[str], eos_id: int) -> list[int]:
    ids: list[int] = []
    for text in texts:
        ids += tok.encode(text).ids + [eos_id]
    return ids


def held_out_windows(path: str | Path, cfg, tok, texts: Sequence[str] | None, eos_id: int, n: int) -> Tensor:
    """(N, L) token windows: from `texts`, else from the checkpoint's own validation split."""
    length = min(cfg.model.block_size, cfg.seq_len)
    if texts:
        ids = _tokenize(tok, texts, eos_id)
        if len(ids) < 2:
            raise UserError("the analysis text is empty after tokenization; give a longer --text")
        length = min(length, len(ids))
        rows = [ids[i:i + length] for i in range(0, len(ids) - length + 1, length)][:n]
        return torch.tensor(rows)
    from sinkdlm.data.shards import PackedData, fixed_windows

    try:
        return fixed_windows(PackedData(cfg.data.path).tokens("val"), length, n)
    except (UserError, OSError, KeyError) as e:
        raise UserError(f"no text to analyse: pass --text FILE or --prompt, or keep the training data of "
                        f"{path} at {cfg.data.path!r} ({e})") from None


def run_analysis(path: str | Path, texts: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                 settings: AnalysisConfig | None = None,
                 windows: Tensor | None = None) -> tuple[dict[str, Any], Trajectory]:
    """Record the chosen mode, compute every metric and run the interventions."""
    from sinkdlm.sample import SampleConfig

    s = settings or AnalysisConfig()
    start = time.perf_counter()
    model, cfg = ckpt.load_model(path, s.device, getattr(torch, s.dtype))
    tok = ckpt.load_tokenizer(path)
    eos_id = ckpt.load_meta(path).get("eos_id")
    if eos_id is None:
        raise UserError(f"checkpoint {path} records no eos_id in meta.json; it was not written by sinkdlm train")
    if s.mode == "masked" and not texts:
        texts = prompts  # fixed text: the prompts are the text
    if windows is None and (texts or not prompts):
        windows = held_out_windows(path, cfg, tok, texts, eos_id, max(s.max_windows, s.max_prompts))
    prompt_ids = [tok.encode(p).ids for p in prompts] if prompts else \
        [w[: s.prompt_tokens].tolist() for w in windows[: s.max_prompts]]
    scored = None if windows is None else windows[: s.max_windows]  # masked mode and ELBO; prompts may use more
    sample_cfg = SampleConfig(gen_length=s.gen_length, steps=s.steps, temperature=s.temperature, seed=s.seed)
    task = query_classes.data_task(cfg.data.path)  # a synthetic copy task splits the queries by class
    split = None if task is None else query_classes.classifier(task, model.mask_id,
                                                                None if s.mode == "trajectory" else scored)
    record = RecordSettings(layers=s.layers, map_steps=s.figure_steps(), query_classes=split)
    if s.mode == "trajectory":
        tr = record_trajectory(model, prompt_ids, sample_cfg, eos_id, record, progress=s.progress)
    else:
        tr = record_masked(model, scored, s.levels, s.seed, record, progress=s.progress)
    metrics = _describe(path, cfg, s, tr, tok, prompt_ids)
    metrics["sinks"] = sink_metrics(tr, model.mask_id, s)
    metrics["sinks"]["sink_token_text"] = [[token_text(tok, t, model.mask_id), n]
                                           for t, n in metrics["sinks"]["sink_tokens"]]
    metrics["summary"] = moving_sink_summary(metrics)
    metrics["baselines"] = metrics["sinks"]["baselines"]
    if task is not None:
        source = "canvas" if s.mode == "trajectory" else "text"
        metrics["query_classes"] = query_classes.class_metrics(tr, model.mask_id, s.gu_threshold, source)
    if s.nulls:
        metrics["nulls"] = null_summaries(model, tr, windows, s)
    metrics["record_seconds"] = round(time.perf_counter() - start, 2)
    if s.interventions:
        metrics["elbo_setup"] = elbo_setup(path, cfg, s, scored, from_text=bool(texts))
        metrics["interventions"] = _interventions(path, model, prompt_ids, scored, sample_cfg, eos_id, s, tok)
    metrics["seconds"] = round(time.perf_counter() - start, 2)
    return metrics, tr


def sink_metrics(tr: Trajectory, mask_id: int, s: AnalysisConfig) -> dict[str, Any]:
    return trajectory_metrics(tr, mask_id, s.column_margin, s.std_k, s.rule, s.gu_threshold)


def null_summaries(model, tr: Trajectory, windows: Tensor | None, s: AnalysisConfig) -> dict[str, dict | None]:
    """The summary metrics of the recording's null models: uniform attention (exact) always; the two
    on fixed text only for a trajectory with held-out windows as wide as it (a masked-mode recording
    is itself on fixed text)."""
    def summary(null: Trajectory) -> dict:
        return moving_sink_summary(sink_metrics(null, model.mask_id, s))

    out: dict[str, dict | None] = {"uniform_attention": nulls.uniform_attention(tr, model.mask_id),
                                   "fixed_text": None, "one_token_reveal": None}
    if s.mode == "trajectory" and windows is not None:
        record = RecordSettings(layers=s.layers)
        text = nulls.fixed_text_windows(windows, tr)
        fixed = record_masked(model, text, nulls.masking_levels(tr, model.mask_id), s.seed, record, progress=False)
        out["fixed_text"] = summary(fixed)
        if text.shape == tr.tokens.shape[1:]:  # as many windows as sequences, each as wide
            inputs = nulls.one_token_reveal_inputs(text, tr, model.mask_id, s.seed)
            out["one_token_reveal"] = summary(record_inputs(model, list(inputs), record, progress=False))
    return out


def token_text(tok, token_id: int, mask_id: int) -> str:
    """A token as the text it stands for (byte-level BPE pieces like `Ċ` decoded to a newline)."""
    return "[MASK]" if token_id == mask_id else tok.decode([token_id], skip_special_tokens=False)


def training_val_elbo(path: str | Path) -> float | None:
    """The validation ELBO that training logged at this checkpoint's step (None when not logged)."""
    from sinkdlm.files import METRICS_LOG

    folder = ckpt.resolve(path)
    step, log = ckpt.load_meta(folder).get("step"), folder.parent / METRICS_LOG
    if step is None or not log.is_file():
        return None
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    values = [r["val_loss"] for r in rows if r.get("step") == step and "val_loss" in r]
    return values[-1] if values else None


def elbo_setup(path: str | Path, cfg, s: AnalysisConfig, windows: Tensor | None, from_text: bool) -> dict:
    """How the interventions' held-out ELBO is estimated, beside how training's validation ELBO was."""
    from sinkdlm.diffusion import NOISE_FLOOR

    if windows is None:
        source, n, length = "the prompts followed by the unmodified run's completions", None, None
    else:
        source = "the given text" if from_text else "the validation split of the training data"
        n, length = windows.shape
    training = {"windows": cfg.data.val_windows, "length": cfg.seq_len, "seed": cfg.data.val_seed,
                "eps": cfg.train.eps, "val_elbo": training_val_elbo(path)}
    return to_py({"source": source, "windows": n, "length": length, "levels": s.elbo_samples, "seed": s.seed,
                  "eps": NOISE_FLOOR, "training": training})


def prompt_sets(path: str | Path, settings: AnalysisConfig, sets: int = 2) -> list[Tensor]:
    """`sets` disjoint sets of held-out windows (non-overlapping) of the validation split, max_prompts each,
    interleaved (set i holds windows i, i + sets, ... of sets x max_prompts evenly spaced ones)."""
    _, cfg = ckpt.load_model(path)
    eos_id = ckpt.load_meta(path).get("eos_id")
    windows = held_out_windows(path, cfg, ckpt.load_tokenizer(path), None, eos_id, sets * settings.max_prompts)
    if len(windows) < sets * settings.max_prompts:
        raise UserError(f"{path}'s validation split holds {len(windows)} windows, fewer than {sets} disjoint sets of "
                        f"{settings.max_prompts} prompts; lower --max-prompts")
    return [windows[i::sets] for i in range(sets)]


def analysis_noise(path: str | Path, settings: AnalysisConfig | None = None, sets: int = 2) -> list[dict[str, Any]]:
    """The summary metrics of one checkpoint on `sets` disjoint sets of held-out prompts: how much a
    metric moves with the prompts alone (at temperature 0 the analysis seed does not move the
    trajectory, so two seeds on the same prompts measure no noise). No interventions."""
    s = replace(settings or AnalysisConfig(), interventions=False, progress=False)
    return [moving_sink_summary(run_analysis(path, settings=s, windows=w)[0]) for w in prompt_sets(path, s, sets)]


def analyze_checkpoint(path: str | Path, texts: Sequence[str] | None = None, prompts: Sequence[str] | None = None,
                       settings: AnalysisConfig | None = None, windows: Tensor | None = None) -> dict[str, Any]:
    """The metrics dict of one checkpoint (`moving_sink_summary(metrics)` gives the table row)."""
    return run_analysis(path, texts, prompts, settings, windows)[0]


def _describe(path: str | Path, cfg, s: AnalysisConfig, tr: Trajectory, tok,
              prompt_ids: list[list[int]]) -> dict[str, Any]:
    m = cfg.model
    model = {k: getattr(m, k) for k in ("name", "n_layer", "n_head", "n_embd", "vocab_size", "sink_tokens",
                                        "sink_position", "sink_zero_value", "sink_self_only", "attn_gate")}
    model["variant"] = m.variant()
    out: dict[str, Any] = {"checkpoint": str(ckpt.resolve(path)), "model": model, "mode": s.mode,
                           "settings": to_py(asdict(s)),
                           "prompts": [tok.decode(r) for r in prompt_ids]}
    if tr.outputs is not None:
        out["outputs"] = [tok.decode(o) for o in tr.outputs]
    return out


def _interventions(path, model, prompt_ids, windows, sample_cfg, eos_id, s: AnalysisConfig, tok) -> dict:
    from sinkdlm.analysis.interventions import run_interventions

    results = run_interventions(path, model, prompt_ids, windows, sample_cfg, eos_id, s.top_k,
                                s.elbo_samples, s.seed)
    for r in results.values():
        r["outputs"] = [tok.decode(o) for o in r["outputs"]]
    return to_py(results)
