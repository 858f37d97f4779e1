"""Sink-pinned windowed decoding: speed and memory against length, and what a window costs in ELBO.

`speed`: demo-preset-shaped random models (vocab 4096), plain and with one sink, generate L new
tokens (block 16, one token a step) after a 16-token prompt with full attention and with each
window W; rounds interleave the settings of one length. Printed per (model, L, setting): tokens/s
(median), the speed-up over full attention paired per round, the widest input one forward took
and the dual cache's peak bytes (its K/V of every position a forward sees: the memory that grows
with the length), and on CUDA the allocator's peak.

    python -m benchmarks.bench_window speed --lengths 64 128 256 512 --windows 16 32 --repeats 3

`elbo`: the held-out ELBO (nats/token, MC, common random numbers across windows) of checkpoints under
the windowed pattern (sinkdlm.window.windowed_pairs: each block of a held-out sequence conditioned on
what its window keeps), for each W and without eviction, with the degradation against no eviction
paired per sequence and, between two checkpoints (e.g. sink vs plain), the difference of their
degradations, each with a 95% interval over sequences:

    python -m benchmarks.bench_window elbo --checkpoint sink=/work/demo-runs/sink plain=/work/demo-runs/plain \\
        --data /work/demo-runs/data --windows 0 8 16 32 --anchors 4 --sequences 64
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path

import torch

from benchmarks import common
from sinkdlm.config import model_preset
from sinkdlm.model import DLM
from sinkdlm.sample import SampleConfig, generate

VOCAB = 4096
PROMPT_LEN = 16
BLOCK = 16
NO_EVICTION = 1 << 30  # a window longer than anything: full attention without lookahead
Z95 = 1.96


def build(sink: int, block_size: int, device: str) -> DLM:
    torch.manual_seed(0)
    cfg = model_preset("demo", vocab_size=VOCAB, sink_tokens=sink, block_size=block_size)
    return DLM(cfg).to(device).eval()


def decode(model: DLM, prompts: list[list[int]], cfg: SampleConfig) -> dict:
    stats: dict = {}
    generate(model, prompts, cfg, model.mask_id, 0, stats=stats)
    return stats


def speed(args: argparse.Namespace) -> None:
    device = torch.device(args.device)
    prompts = torch.randint(1, VOCAB, (args.batch, PROMPT_LEN), generator=torch.Generator().manual_seed(0)).tolist()
    longest = PROMPT_LEN + max(args.lengths)
    models = {"plain": build(0, longest, args.device), "sink": build(1, longest, args.device)}
    print(f"block {BLOCK}, prompt {PROMPT_LEN}, batch {args.batch}, {args.repeats} repeats, {common.machine(device)}, "
          f"threads {torch.get_num_threads()}, load average {common.load_average():.1f}\n")
    header = ["model", "new tokens", "setting", "tokens/s (median)", "speed-up (paired, min-max)", "widest input",
              "dual cache peak (KiB)"] + (["CUDA peak (MiB)"] if device.type == "cuda" else [])
    rows = []
    for name, model in models.items():
        for length in args.lengths:
            base = SampleConfig(gen_length=length, steps=length, block_length=BLOCK)
            settings = {"full attention": base} | {f"window {w}": base.replace(window=w) for w in args.windows}
            fns = {s: (lambda c=c, m=model: decode(m, prompts, c)) for s, c in settings.items()}
            times = common.time_interleaved(fns, args.repeats, warmup=0, device=device)
            for s, cfg in settings.items():
                memory = decode(model, prompts, cfg.replace(cache="dual"))
                ratio = common.paired_ratio(times["full attention"], times[s])
                row = [name, str(length), s, f"{args.batch * length / statistics.median(times[s]):.0f}",
                       f"{ratio.median:.2f}x ({ratio.min:.2f}-{ratio.max:.2f})", str(memory["widest_input"]),
                       f"{memory['peak_cache_bytes'] / 1024:.0f}"]
                if device.type == "cuda":
                    row.append(f"{common.cuda_peak_bytes(lambda c=cfg, m=model: decode(m, prompts, c), device) / 2**20:.1f}")
                rows.append(row)
            print(f"{name} L={length} done", flush=True)
    print(common.markdown_table(header, rows))


def mean_interval(values: list[float]) -> str:
    m = statistics.fmean(values)
    half = Z95 * statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else float("nan")
    return f"{m:+.3f} [{m - half:+.3f}, {m + half:+.3f}]"


def elbo(args: argparse.Namespace) -> None:
    from sinkdlm.checkpoint import load_model
    from sinkdlm.data.shards import PackedData, fixed_windows
    from sinkdlm.eval.likelihood import LikelihoodConfig, score_groups
    from sinkdlm.window import windowed_pairs

    checkpoints = dict(spec.split("=", 1) for spec in args.checkpoint)
    data = PackedData(args.data)
    sequences = fixed_windows(data.tokens("val"), args.length, args.sequences).tolist()
    settings = LikelihoodConfig(mc_num=args.mc, batch_size=args.batch_size)
    patterns = {f"window {w}": (w, 0) for w in args.windows} | \
        {f"window {w} + {args.anchors} anchors": (w, args.anchors) for w in args.windows if args.anchors} | \
        {"no eviction": (NO_EVICTION, 0)}
    scored = args.length - args.prompt
    nll: dict[tuple[str, str], list[float]] = {}  # (checkpoint, pattern) -> nats/token per sequence
    for name, path in checkpoints.items():
        model, _ = load_model(path, args.device)
        for seq in sequences:
            per_pattern = {p: windowed_pairs(seq, args.prompt, BLOCK, w, a) for p, (w, a) in patterns.items()}
            groups = [[pairs[i] for pairs in per_pattern.values()] for i in range(len(next(iter(per_pattern.values()))))]
            with torch.no_grad():
                estimates = score_groups(model, groups, settings)  # a block shares its masks across patterns
            for j, p in enumerate(patterns):
                nll.setdefault((name, p), []).append(-sum(group[j].loglik for group in estimates) / scored)
        print(f"{name} done", flush=True)
    print(f"{len(sequences)} held-out sequences of {args.length} tokens from {args.data}, the first {args.prompt} as "
          f"context, blocks of {BLOCK}, {args.mc} MC samples per block (CRN across patterns); nats/token, 95% "
          f"intervals over sequences\n")
    header = ["checkpoint", "pattern", "NLL bound", "minus no eviction (paired)"]
    rows = [[n, p, f"{statistics.fmean(nll[n, p]):.3f}",
             mean_interval([a - b for a, b in zip(nll[n, p], nll[n, 'no eviction'])])]
            for n in checkpoints for p in patterns]
    print(common.markdown_table(header, rows))
    names = list(checkpoints)
    if len(names) == 2:
        a, b = names
        print(f"\ndegradation of {a} minus degradation of {b} (negative: {a} loses less), paired per sequence:\n")
        rows = [[p, mean_interval([(x - x0) - (y - y0) for x, x0, y, y0 in zip(
            nll[a, p], nll[a, "no eviction"], nll[b, p], nll[b, "no eviction"])])]
            for p in patterns if p != "no eviction"]
        print(common.markdown_table(["pattern", f"{a} - {b}"], rows))
    if args.json:  # per-sequence NLLs, for intervals over training seeds (docs/generation/seed_intervals.py)
        Path(args.json).write_text(json.dumps({
            "data": args.data, "length": args.length, "prompt": args.prompt, "block": BLOCK, "mc": args.mc,
            "checkpoints": checkpoints, "nll": {n: {p: nll[n, p] for p in patterns} for n in checkpoints}}, indent=1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="part", required=True)
    s = sub.add_parser("speed")
    s.add_argument("--lengths", type=int, nargs="+", default=[64, 128, 256, 512])
    s.add_argument("--windows", type=int, nargs="+", default=[16, 32])
    s.add_argument("--batch", type=int, default=1)
    s.add_argument("--repeats", type=int, default=3)
    e = sub.add_parser("elbo")
    e.add_argument("--checkpoint", nargs="+", required=True, help="NAME=DIR, one or two")
    e.add_argument("--data", required=True, help="a prepared data folder; its val split is scored")
    e.add_argument("--windows", type=int, nargs="+", default=[0, 8, 16, 32])
    e.add_argument("--anchors", type=int, default=4, help="also each window + this many first tokens; 0 = no")
    e.add_argument("--length", type=int, default=128)
    e.add_argument("--prompt", type=int, default=16, help="context tokens before the first scored block")
    e.add_argument("--sequences", type=int, default=64)
    e.add_argument("--mc", type=int, default=32, help="MC samples per block")
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--json", help="also write the per-sequence NLLs of every checkpoint and pattern here")
    for p in (s, e):
        p.add_argument("--device", default="cpu")
        p.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    speed(args) if args.part == "speed" else elbo(args)


if __name__ == "__main__":
    main()
