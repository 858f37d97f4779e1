"""Train-step time, MFU and memory of the plain, sink (fast and dense-mask) and gated models.

One step = mask_tokens + forward + elbo_loss (pretrain weights) + backward, the diffusion
pretraining step without the optimizer. All variants are timed in one process, interleaved
(plain, sink-fast, sink-dense, gated, plain, ...), and ratios are taken per round.

    python -m benchmarks.bench_train                  # CPU, fp32, ~5 minutes on 2 cores
    python -m benchmarks.bench_train --quick          # smoke run, seconds
    python -m benchmarks.bench_train --device cuda --dtype bf16 --tokens 65536
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn as nn
from tqdm import tqdm

from benchmarks import common
from sinkdlm.config import ModelConfig, model_preset
from sinkdlm.diffusion import elbo_loss, mask_tokens, noise_level, pretrain_weights
from sinkdlm.model import DLM

VARIANTS: dict[str, dict] = {
    "plain": {},
    "sink-fast": dict(sink_tokens=1, attn_impl="fast"),
    "sink-dense": dict(sink_tokens=1, attn_impl="reference"),  # the paper code's (S+T)^2 mask
    "gated": dict(attn_gate="elementwise"),
}
PRESET, VOCAB = "demo", 4096
SEQS = [128, 512, 1024, 2048]  # 128 is the demo preset's own block size
TOKENS_PER_STEP = 4096  # batch = tokens // seq: equal work per shape keeps the CPU run short
QUICK = dict(seqs=[128, 256], tokens=512, repeats=3, warmup=1)
EPS = 1e-3  # the default train.eps
SINK_FAST_TARGET = 1.03  # issue 2: sink-fast / plain <= 1.03


@dataclass
class Result:
    seq: int
    batch: int
    variant: str
    step: common.Stats  # seconds
    tokens_per_s: float
    mfu: float
    memory_bytes: int


def variant_config(variant: str, seq: int) -> ModelConfig:
    return model_preset(PRESET, vocab_size=VOCAB, block_size=seq, **VARIANTS[variant])


def matmul_params(model: DLM) -> int:
    """N for 6*N*tokens: every weight that multiplies a token (all Linears, LM head included)."""
    n = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    if model.lm_head is None:  # tied head: the embedding matrix is multiplied too
        n += model.cfg.require_vocab() * model.cfg.n_embd
    return n


def train_flops(model: DLM, batch: int, seq: int) -> float:
    """Model FLOPs of one forward + backward: 6*N*B*T + 12*L*H*D*T*(T+S)*B.

    The attention term is QK^T and PV (2 matmuls x 2 FLOPs x T x (T+S) x D per head, forward) times
    3 for forward + backward; S = sink tokens. The sink's own stream (S tokens) is not counted, nor
    is the dense path's extra (S+T)^2 - T(T+S) work: MFU counts useful work, the same for both.
    """
    cfg = model.cfg
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_size * seq * (seq + cfg.sink_tokens) * batch
    return 6 * matmul_params(model) * batch * seq + attention


def make_step(cfg: ModelConfig, batch: int, device: torch.device, dtype: torch.dtype,
              seed: int = 0) -> tuple[DLM, Callable[[], torch.Tensor]]:
    """A model and a closure running one training step on a fixed batch (same data for every variant)."""
    torch.manual_seed(seed)
    model = DLM(cfg).to(device).train()
    gen = torch.Generator().manual_seed(seed)
    x = torch.randint(cfg.require_vocab(), (batch, cfg.block_size), generator=gen).to(device)
    p = noise_level(torch.rand(batch, generator=gen, dtype=torch.float64), EPS).to(device)
    uniforms = torch.rand(batch, cfg.block_size, generator=gen, dtype=torch.float64).to(device)
    mixed = dtype != torch.float32  # like Fabric's bf16-mixed: fp32 weights, autocast compute

    def step() -> torch.Tensor:
        model.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=dtype, enabled=mixed):
            noisy, masked = mask_tokens(x, p, uniforms, model.mask_id)
            loss = elbo_loss(model(noisy), x, masked, p, pretrain_weights(x))
        loss.backward()
        return loss

    return model, step


def memory_of(model: DLM, step: Callable[[], torch.Tensor], device: torch.device) -> int:
    if device.type == "cuda":
        return common.cuda_peak_bytes(step, device)
    return common.saved_activation_bytes(step, list(model.parameters()))


def bench_seq(seq: int, args: argparse.Namespace, peak: float, bar: tqdm) -> tuple[list[Result], dict]:
    """Time all variants at one sequence length; returns per-variant results and the raw samples."""
    device, dtype = torch.device(args.device), common.DTYPES[args.dtype]
    batch = max(1, args.tokens // seq)
    models, steps = {}, {}
    for name in VARIANTS:
        models[name], steps[name] = make_step(variant_config(name, seq), batch, device, dtype)
    memory = {name: memory_of(models[name], steps[name], device) for name in VARIANTS}
    samples = common.time_interleaved(steps, args.repeats, args.warmup, device, progress=lambda: bar.update(),
                                      clock=args.clock)
    results = []
    for name, times in samples.items():
        stats = common.Stats.of(times)
        flops = train_flops(models[name], batch, seq)
        results.append(Result(seq, batch, name, stats, batch * seq / stats.median,
                              flops / stats.median / peak, memory[name]))
    return results, samples


def ratios(samples: dict[str, list[float]]) -> dict[str, common.Stats]:
    return {
        "sink-fast/plain": common.paired_ratio(samples["sink-fast"], samples["plain"]),
        "sink-fast/sink-dense": common.paired_ratio(samples["sink-fast"], samples["sink-dense"]),
        "gated/plain": common.paired_ratio(samples["gated"], samples["plain"]),
    }


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _ratio(s: common.Stats) -> str:
    return f"{s.median:.3f} [{s.min:.3f}-{s.max:.3f}]"


def report(results: list[Result], ratio_rows: dict[int, dict[str, common.Stats]],
           args: argparse.Namespace, peak: float) -> str:
    device = torch.device(args.device)
    memory = "peak CUDA alloc MiB" if device.type == "cuda" else "saved activations MiB"
    lines = [
        f"## Train step: {PRESET} width, vocab {VOCAB}, {args.dtype}, {common.machine(device)}",
        "",
        f"torch {torch.__version__}; matmul peak {peak / 1e9:.1f} GFLOP/s ({common.MATMUL_SIZE}^2 "
        f"{args.dtype} matmul, best of {common.MATMUL_REPEATS}, same clock); {args.repeats} interleaved rounds "
        f"after {args.warmup} warm-up, {args.clock} clock; step = mask + forward + ELBO + backward "
        f"(no optimizer); load average {args.load_start:.1f} at start, {common.load_average():.1f} at end "
        f"({os.cpu_count()} CPUs).",
        "",
        common.markdown_table(
            ["seq", "batch", "variant", f"step ms ({args.clock}, median)", "IQR ms", "min-max ms",
             "tokens/s", "MFU", memory],
            [[str(r.seq), str(r.batch), r.variant, _ms(r.step.median), f"{_ms(r.step.q1)}-{_ms(r.step.q3)}",
              f"{_ms(r.step.min)}-{_ms(r.step.max)}", f"{r.tokens_per_s:,.0f}", f"{r.mfu:.1%}",
              f"{r.memory_bytes / common.MIB:.1f}"] for r in results]),
        "",
        "Ratios of step time, paired per round: median [min-max]. Targets: sink-fast/plain <= "
        f"{SINK_FAST_TARGET}; sink-fast/sink-dense < 1.",
        "",
        common.markdown_table(
            ["seq", "sink-fast/plain", "sink-fast/sink-dense", "gated/plain", "targets met"],
            [[str(seq), *(_ratio(s) for s in r.values()), _targets_met(r)] for seq, r in ratio_rows.items()]),
        "",
        "MFU = model FLOPs / step time / matmul peak; model FLOPs = 6*N*B*T + 12*L*H*D*T*(T+S)*B with "
        "N = weights of all Linear layers (LM head included, embedding lookup excluded), S = sink tokens.",
    ]
    if device.type != "cuda":
        lines.append("Saved activations = distinct storages autograd keeps for backward, parameters "
                     "excluded (CPU has no allocator peak to read).")
    return "\n".join(lines)


def _targets_met(r: dict[str, common.Stats]) -> str:
    fast_ok = r["sink-fast/plain"].median <= SINK_FAST_TARGET
    dense_ok = r["sink-fast/sink-dense"].median < 1
    return "yes" if fast_ok and dense_ok else "no"


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N")
    ap.add_argument("--dtype", default="fp32", choices=sorted(common.DTYPES),
                    help="fp32, or bf16/fp16 autocast over fp32 weights (Fabric's *-mixed)")
    ap.add_argument("--seqs", type=int, nargs="+", default=SEQS, help="sequence lengths (block_size)")
    ap.add_argument("--tokens", type=int, default=TOKENS_PER_STEP, help="tokens per step; batch = tokens // seq")
    ap.add_argument("--repeats", type=int, default=7, help="timed interleaved rounds per sequence length")
    ap.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    ap.add_argument("--threads", type=int, default=0, help="CPU threads (0 = torch's default)")
    ap.add_argument("--clock", default="wall", choices=sorted(common.CLOCKS),
                    help="wall, or cpu (process CPU time; for a shared CPU, with --threads 1)")
    ap.add_argument("--quick", action="store_true", help="smoke run: short sequences, few repeats")
    ap.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    args = ap.parse_args(argv)
    if args.quick:  # flags given explicitly still win
        for key, value in QUICK.items():
            if getattr(args, key) == ap.get_default(key):
                setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.load_start = common.load_average()
    peak = common.matmul_peak_flops(device, common.DTYPES[args.dtype], clock=args.clock)
    results, ratio_rows = [], {}
    with tqdm(total=len(args.seqs) * args.repeats * len(VARIANTS), desc="train steps", file=sys.stderr) as bar:
        for seq in args.seqs:
            rows, samples = bench_seq(seq, args, peak, bar)
            results += rows
            ratio_rows[seq] = ratios(samples)
    print(report(results, ratio_rows, args, peak))
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"machine": common.machine(device), "torch": torch.__version__, "args": vars(args),
                       "matmul_peak_flops": peak,
                       "results": [{**vars(r), "step": r.step.to_dict()} for r in results],
                       "ratios": {seq: {k: s.to_dict() for k, s in r.items()} for seq, r in ratio_rows.items()}},
                      f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
