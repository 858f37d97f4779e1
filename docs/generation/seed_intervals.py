"""Sink vs plain with intervals over training seeds (docs/generation.md, "Over training seeds").

    python docs/generation/seed_intervals.py elbo runs/window-seeds/seed*.json
    python docs/generation/seed_intervals.py compliance runs/gen-mech

elbo: what a window costs in ELBO. Each file is `python -m benchmarks.bench_window elbo --checkpoint sink=... plain=... --json FILE` for
one training seed (a sink model and a plain model trained with that seed). Per seed and pattern: each
model's degradation (its NLL bound under the window minus without eviction, mean over the held-out
sequences) and sink's minus plain's; then the mean over seeds with its 95% Student t interval
(seeds - 1 degrees of freedom).

compliance: the copy-rule compliance of `sinkdlm eval-generation` samples (generation.json in
ROOT/<variant>-seed<N>-<decoding>/, variant sink or plain, decoding `full` or a window such as `W8`):
per seed each model's mean compliance under each decoding, sink minus plain, and each window minus
full; the mean over the seeds both variants have, with its 95% t interval over seeds.

The intervals are per comparison, not corrected for their number.
"""

from __future__ import annotations

import json
import re
import statistics
import sys
from collections import defaultdict
from pathlib import Path

from sinkdlm.intervals import t_interval

REFERENCE = "no eviction"


def degradation(nll: dict[str, list[float]], pattern: str) -> float:
    return statistics.fmean(a - b for a, b in zip(nll[pattern], nll[REFERENCE]))


def cell(values: list[float], sign: str = "+") -> str:
    """Mean [95% t interval]; sign "+" for a difference, "" for a level."""
    ci = t_interval(values, 0.95)
    mean = statistics.fmean(values)
    return f"{mean:{sign}.3f} [{ci[0]:{sign}.3f}, {ci[1]:{sign}.3f}]" if ci else f"{mean:{sign}.3f}"


def elbo(paths: list[str]) -> None:
    runs = [json.loads(Path(p).read_text()) for p in paths]
    patterns = [p for p in runs[0]["nll"]["sink"] if p != REFERENCE]
    per_seed = {p: {"sink": [], "plain": [], "sink - plain": []} for p in patterns}
    for run in runs:
        for p in patterns:
            sink, plain = degradation(run["nll"]["sink"], p), degradation(run["nll"]["plain"], p)
            per_seed[p]["sink"].append(sink)
            per_seed[p]["plain"].append(plain)
            per_seed[p]["sink - plain"].append(sink - plain)
    first = runs[0]
    print(f"{len(runs)} training seeds; per seed {len(first['nll']['sink'][REFERENCE])} held-out sequences of "
          f"{first['length']} tokens ({first['prompt']} context), blocks of {first['block']}, {first['mc']} MC "
          f"samples per block; degradation = NLL bound (nats/token) under the window minus without eviction; "
          f"mean over seeds [95% t interval over seeds]\n")
    print("| pattern | sink | plain | sink - plain | per seed (sink - plain) |")
    print("|---|---|---|---|---|")
    for p in patterns:
        d = per_seed[p]
        seeds = ", ".join(f"{v:+.3f}" for v in d["sink - plain"])
        print(f"| {p} | {cell(d['sink'])} | {cell(d['plain'])} | {cell(d['sink - plain'])} | {seeds} |")


RUN = re.compile(r"(sink|plain)-seed(\d+)-(\w+)$")


def compliance(root: str) -> None:
    values: dict[tuple[str, str], dict[int, float]] = defaultdict(dict)  # (variant, decoding) -> seed -> mean
    for path in sorted(Path(root).glob("*/generation.json")):
        match = RUN.match(path.parent.name)
        if match:
            variant, seed, decoding = match.group(1), int(match.group(2)), match.group(3)
            values[variant, decoding][seed] = json.loads(path.read_text())["metrics"]["rule_compliance"]["mean"]
    decodings = sorted({d for _, d in values}, key=lambda d: (d != "full", d))

    def paired(a: dict[int, float], b: dict[int, float]) -> list[float]:
        return [a[s] - b[s] for s in sorted(a.keys() & b.keys())]

    print("copy-rule compliance of the samples (share of copy positions that follow the rule); mean over "
          "seeds [95% t interval over seeds], seeds in ()\n")
    print("| decoding | sink | plain | sink - plain |")
    print("|---|---|---|---|")
    for d in decodings:
        sink, plain = values["sink", d], values["plain", d]
        cells = [f"{cell(list(x.values()), '')} ({len(x)})" if x else "-" for x in (sink, plain)]
        diff = paired(sink, plain)
        print(f"| {d} | {cells[0]} | {cells[1]} | {cell(diff) + f' ({len(diff)})' if diff else '-'} |")
    for d in decodings[1:]:
        for v in ("sink", "plain"):
            diff = paired(values[v, d], values[v, "full"])
            if diff:
                print(f"| {d} - full, {v} | | | {cell(diff)} ({len(diff)}) |")
        both = [a - b for a, b in zip(paired(values["sink", d], values["sink", "full"]),
                                      paired(values["plain", d], values["plain", "full"]))]
        if both:
            print(f"| {d} - full, sink - plain | | | {cell(both)} ({len(both)}) |")


if __name__ == "__main__":
    {"elbo": elbo, "compliance": lambda args: compliance(args[0])}[sys.argv[1]](sys.argv[2:])
