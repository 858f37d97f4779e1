"""Interventions on the sinks, applied from outside the model, and how much they change its output.

- mask the top-K sinks: at step t every query is denied the K content positions that drew the most
  attention (all recorded layers and heads summed) at step t-1 (2510.15731); done through the
  attention mask, so those positions still predict but nobody reads them.
- drop the dedicated sink: the same weights in a model built with sink_tokens=0.
- zero its value: the same weights with sink_zero_value=True.
Each is compared with the unmodified run: token agreement of the generated text and, on held-out
text, the ELBO (same masks for every variant, so the differences are paired).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import Tensor

from sinkdlm import checkpoint as ckpt
from sinkdlm import diffusion
from sinkdlm.analysis.record import Recorder, RecordSettings
from sinkdlm.model import DLM


def model_without_sink(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> DLM:
    """The checkpoint's weights in the same architecture with no sink tokens."""
    cfg = ckpt.load_config_of(path)
    cfg.model.sink_tokens = 0
    with torch.device("meta"):  # takes the loaded tensors: never allocated twice
        model = DLM(cfg.model)
    weights = {k: v.to(dtype or torch.float32) for k, v in ckpt.load_weights(path).items() if k != "sink"}
    model.load_state_dict(weights, strict=True, assign=True)
    return model.to(device).eval()


def model_with_zero_sink_value(path: str | Path, device: str | torch.device = "cpu",
                               dtype: torch.dtype | None = None) -> DLM:
    """The checkpoint's weights with the sink's value vectors forced to zero (not a runtime field)."""
    cfg = ckpt.load_config_of(path)
    cfg.model.sink_zero_value = True
    with torch.device("meta"):
        model = DLM(cfg.model)
    ckpt.load_into(model, path, dtype or torch.float32)
    return model.to(device).eval()


def top_content_keys(colsum: Tensor, key_valid: Tensor, n_sink: int, k: int) -> Tensor:
    """colsum (L, B, H, S+T) -> (B, k) content positions with the largest incoming attention."""
    total = colsum.sum(dim=(0, 2))[:, n_sink:]  # (B, T)
    total = total.masked_fill(~key_valid[:, n_sink:], float("-inf"))
    return total.topk(k, dim=-1).indices


def hide_keys(mask: Tensor | None, idx: Tensor, positions: Tensor) -> Tensor:
    """attention_mask with `positions` (B, k) set to 0 (never attended to)."""
    base = torch.ones_like(idx, dtype=torch.bool) if mask is None else mask.bool().clone()
    return base.scatter(1, positions.to(idx.device), False)


class TopKSinkMasker:
    """Recorder `before` hook: hide at step t the top-K sinks found at step t-1."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.recorder: Recorder | None = None

    def __call__(self, step: int, idx: Tensor, mask: Tensor | None) -> Tensor | None:
        if step == 0 or self.recorder is None:
            return mask
        prev, n_sink = self.recorder.steps[step - 1], self.recorder.model.cfg.sink_tokens
        colsum = torch.stack([prev.colsum[i] for i in self.recorder.layers])
        k = min(self.k, int(prev.key_valid[:, n_sink:].sum(-1).min()) - 1)  # leave a key to attend to
        if k <= 0:
            return mask
        return hide_keys(mask, idx, top_content_keys(colsum, prev.key_valid, n_sink, k))


def generate_masking_sinks(model: DLM, prompts: list[list[int]], sample_cfg, eos_id: int, k: int) -> list[list[int]]:
    from sinkdlm.sample import generate

    masker = TopKSinkMasker(k)
    recorder = Recorder(model, RecordSettings(), before=masker)
    masker.recorder = recorder
    with recorder.attached():
        return generate(model, prompts, sample_cfg, model.mask_id, eos_id)


def token_agreement(a: Sequence[Sequence[int]], b: Sequence[Sequence[int]]) -> float:
    """Share of generated positions where two runs chose the same token (a shorter output's missing
    positions count as disagreements)."""
    same = total = 0
    for x, y in zip(a, b):
        same += sum(int(u == v) for u, v in zip(x, y))
        total += max(len(x), len(y))
    return same / total if total else 1.0


@torch.no_grad()
def elbo(model: DLM, windows: Tensor, samples: int, seed: int, hide_top_k: int = 0) -> float:
    """Monte Carlo ELBO (nats/token) of `windows` (N, L) on a fixed grid of masking levels.

    With hide_top_k, each noisy input is run twice: once to find its top-K content sinks, once with
    them hidden from every query.
    """
    device = next(model.parameters()).device
    n, length = windows.shape
    ids = windows.to(device)
    total = 0.0
    for j in range(samples):
        t = torch.full((n,), (j + 0.5) / samples, dtype=torch.float64)
        p = diffusion.noise_level(t, diffusion.NOISE_FLOOR)  # as in training
        noisy, masked = diffusion.mask_tokens(ids, p, diffusion.draw_uniforms(seed, j, range(n), length), model.mask_id)
        mask = _hidden_sinks_mask(model, noisy, hide_top_k) if hide_top_k else None
        logits = model(noisy, attention_mask=mask)
        total += diffusion.elbo_loss(logits, ids, masked, p, diffusion.pretrain_weights(ids)).item()
    return total / samples


def _hidden_sinks_mask(model: DLM, noisy: Tensor, k: int) -> Tensor:
    recorder = Recorder(model, RecordSettings())
    with recorder.attached():
        model(noisy)
    step = recorder.steps[0]
    colsum = torch.stack([step.colsum[i] for i in recorder.layers])
    k = min(k, noisy.shape[1] - 1)
    return hide_keys(None, noisy, top_content_keys(colsum, step.key_valid, model.cfg.sink_tokens, k))


def run_interventions(path: str | Path, model: DLM, prompts: list[list[int]], windows: Tensor | None,
                      sample_cfg, eos_id: int, top_k: Sequence[int], elbo_samples: int, seed: int) -> dict:
    """Every intervention against the unmodified run. Returns {name: {agreement, elbo, outputs}}."""
    from sinkdlm.sample import generate

    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    baseline = generate(model, prompts, sample_cfg, model.mask_id, eos_id)
    if windows is None:  # score the prompts with the unmodified run's completions
        windows = _as_windows(prompts, baseline, eos_id)

    def score(m: DLM, hide: int = 0) -> float:
        return elbo(m, windows, elbo_samples, seed, hide) if elbo_samples else float("nan")

    results = {"baseline": {"agreement": 1.0, "elbo": score(model), "outputs": baseline}}
    for k in top_k:
        out = generate_masking_sinks(model, prompts, sample_cfg, eos_id, k)
        results[f"mask_top{k}_sinks"] = {"agreement": token_agreement(baseline, out), "elbo": score(model, k),
                                         "outputs": out}
    if model.cfg.sink_tokens:
        for name, variant in (("drop_sink", model_without_sink(path, device, dtype)),
                              ("zero_sink_value", model_with_zero_sink_value(path, device, dtype))):
            out = generate(variant, prompts, sample_cfg, variant.mask_id, eos_id)
            results[name] = {"agreement": token_agreement(baseline, out), "elbo": score(variant), "outputs": out}
    return results


def _as_windows(prompts: list[list[int]], completions: list[list[int]], pad_id: int) -> Tensor:
    rows = [p + c for p, c in zip(prompts, completions)]
    width = max(len(r) for r in rows)
    return torch.tensor([r + [pad_id] * (width - len(r)) for r in rows])
