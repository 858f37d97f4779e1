"""What a window costs in ELBO, sink vs plain, with intervals over training seeds (docs/generation.md,
"Windowed decoding over training seeds").

    python docs/generation/window_seeds.py runs/window-seeds/seed*.json

Each file is `python -m benchmarks.bench_window elbo --checkpoint sink=... plain=... --json FILE` for
one training seed (a sink model and a plain model trained with that seed). Per seed and pattern: each
model's degradation (its NLL bound under the window minus without eviction, mean over the held-out
sequences) and sink's minus plain's; then the mean over seeds with its 95% Student t interval
(seeds - 1 degrees of freedom). The intervals are per comparison, not corrected for their number.
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path

from sinkdlm.intervals import t_interval

REFERENCE = "no eviction"


def degradation(nll: dict[str, list[float]], pattern: str) -> float:
    return statistics.fmean(a - b for a, b in zip(nll[pattern], nll[REFERENCE]))


def cell(values: list[float]) -> str:
    ci = t_interval(values, 0.95)
    mean = statistics.fmean(values)
    return f"{mean:+.3f} [{ci[0]:+.3f}, {ci[1]:+.3f}]" if ci else f"{mean:+.3f}"


def main(paths: list[str]) -> None:
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


if __name__ == "__main__":
    main(sys.argv[1:])
