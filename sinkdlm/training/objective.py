"""What a run optimises and watches: the diffusion loss of a micro-batch, the learning-rate
schedule, the held-out ELBO and the sink monitor."""

from __future__ import annotations

import math

import torch
from torch import Tensor

from sinkdlm import diffusion
from sinkdlm.config import Config, OptimConfig

MONITOR_WINDOWS = 2  # validation windows the sink monitor looks at
MONITOR_T = 0.5  # their masking level


def diffusion_loss(model: torch.nn.Module, cfg: Config, ids: Tensor, response: Tensor | None, step: int,
                   indices: list[int], attention: Tensor | None = None) -> Tensor:
    """The ELBO for one micro-batch: mask with p(t), predict the masked tokens, weight by 1/p.

    `indices` are the rows' places in the global batch of `step`: with cfg.train's seed they key every
    draw, so a row's masks do not depend on the micro-batch or the process it lands in."""
    t = cfg.train
    p = diffusion.noise_level(diffusion.draw_t(t.seed, step, indices, t.global_batch, t.t_sampling), t.eps)
    uniforms = diffusion.draw_uniforms(t.seed, step, indices, ids.shape[1])
    noisy, masked = diffusion.mask_tokens(ids, p, uniforms, cfg.model.mask_id, maskable=response)
    weights = diffusion.pretrain_weights(ids) if response is None else diffusion.sft_weights(response)
    return diffusion.elbo_loss(model(noisy, attention), ids, masked, p, weights)


def lr_at(step: int, total: int, o: OptimConfig) -> float:
    """Linear warmup for max(warmup_frac * total, warmup_min_steps) steps, then cosine to min_lr."""
    warmup = min(total, max(int(o.warmup_frac * total), o.warmup_min_steps))
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return o.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (o.lr - o.min_lr)


@torch.no_grad()
def validate(model: torch.nn.Module, val: tuple[Tensor, Tensor | None], mask_id: int, micro: int,
             seed: int, eps: float) -> float:
    """Held-out ELBO (nats per token) with fixed, stratified masks: comparable across runs."""
    ids, response = val
    n, length = ids.shape
    p = diffusion.noise_level(diffusion.draw_t(seed, 0, range(n), n, "stratified"), eps)
    noisy, masked = diffusion.mask_tokens(ids, p, diffusion.draw_uniforms(seed, 0, range(n), length), mask_id, response)
    weights = diffusion.pretrain_weights(ids) if response is None else diffusion.sft_weights(response)
    device = next(model.parameters()).device
    total = 0.0
    for s in range(0, n, micro):
        part = slice(s, s + micro)
        logits = model(noisy[part].to(device))
        total += diffusion.elbo_loss(logits, ids[part].to(device), masked[part].to(device), p[part],
                             weights[part].to(device)).item()
    return total


@torch.no_grad()
def sink_monitor(model: torch.nn.Module, val: tuple[Tensor, Tensor | None], mask_id: int, seed: int) -> list[dict]:
    """Per layer: attention mass on the sink tokens (or the most-attended key in a plain model) and
    the value-vector L2 norm of the sink against the median content token's."""
    ids = val[0][:MONITOR_WINDOWS]
    response = None if val[1] is None else val[1][:MONITOR_WINDOWS]
    uniforms = diffusion.draw_uniforms(seed, 1, range(len(ids)), ids.shape[1])
    noisy, _ = diffusion.mask_tokens(ids, torch.full((len(ids),), MONITOR_T), uniforms, mask_id, response)
    rows: list[dict] = []

    def observe(layer: int, probs: Tensor, keys: Tensor, values: Tensor, n_sink: int) -> None:
        mass = probs.float().mean(dim=(0, 1, 2))  # incoming share per key
        norms = values.float().norm(dim=-1).mean(dim=(0, 1))  # value L2 per key, mean over heads
        top = n_sink + int(mass[n_sink:].argmax())
        key = slice(0, n_sink) if n_sink else slice(top, top + 1)
        rows.append({"layer": layer, "sink_mass": float(mass[key].sum()),
                     "sink_value_norm": float(norms[key].mean()),
                     "median_value_norm": float(norms[n_sink:].median())})

    model(noisy.to(next(model.parameters()).device), observer=observe)
    return rows


TRAINING_T_PER_BIN = 2  # t values per ELBO bin at each validation (a checkpoint's probes take 8)


@torch.no_grad()
def copy_task_metrics(model: torch.nn.Module, val_ids: Tensor, task_meta: dict, mask_id: int,
                      seed: int) -> dict:
    """On a synthetic copy task (meta.json `task`): copy accuracy at each probe mask level and the
    ELBO per mask-ratio bin of the validation windows (sinkdlm.eval.probes)."""
    from sinkdlm.data.synthetic import CopyRule
    from sinkdlm.eval.probes import MASK_LEVELS, copy_accuracy, elbo_by_bin

    task = CopyRule.from_meta({"task": task_meta})
    accuracy = {}
    for level in MASK_LEVELS:
        correct, total = copy_accuracy(model, val_ids, task, level, seed, mask_id=mask_id)
        accuracy[str(level)] = correct / total if total else None
    return {"copy_accuracy": accuracy,
            "elbo_bins": elbo_by_bin(model, val_ids, seed, per_bin=TRAINING_T_PER_BIN, mask_id=mask_id)}
