"""How much Gen-PPL and entropy change when a window evicts keys, sink vs plain model, from finished
`sinkdlm eval-generation` folders (docs/generation.md, "Windowed decoding").

    python docs/generation/window_contrast.py runs/gen-window W8 W64
    python docs/generation/window_contrast.py runs/gen-window W8a4 W8   # plain only: no sink-W8a4

For each model: the change from the reference run (W64 here) to the windowed run (W8) of
log Gen-PPL (pooled judge NLL per judge token, nats) and of the mean unigram entropy; then sink's
change minus plain's. The four sample sets are drawn independently, so each is resampled on its own:
95% percentile bootstrap, 2,000 resamples, seed 0 (Gen-PPL's own intervals use the same scheme).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

RESAMPLES = 2000


def per_sample(folder: Path) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rows = json.loads((folder / "generation.json").read_text())["per_sample"]
    tokens = np.array([r["judge_tokens"] for r in rows], dtype=float)
    nll = np.array([r["judge_nll"] for r in rows], dtype=float) * tokens  # summed NLL per sample
    entropy = np.array([r["entropy"] for r in rows], dtype=float)
    return nll, tokens, entropy


def boot(folder: Path, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, float, float]:
    """Bootstrap draws of (log Gen-PPL, mean entropy) and their point values."""
    nll, tokens, entropy = per_sample(folder)
    idx = rng.integers(0, len(nll), size=(RESAMPLES, len(nll)))
    return (nll[idx].sum(1) / tokens[idx].sum(1), entropy[idx].mean(1),
            nll.sum() / tokens.sum(), entropy.mean())


def main(root: str, windowed: str, reference: str) -> None:
    rng = np.random.default_rng(0)
    change = {}
    for model in ("sink", "plain"):
        if not (Path(root) / f"{model}-{windowed}").is_dir():  # e.g. W8a4: a plain model's variant only
            continue
        w = boot(Path(root) / f"{model}-{windowed}", rng)
        r = boot(Path(root) / f"{model}-{reference}", rng)
        change[model] = (w[0] - r[0], w[1] - r[1], w[2] - r[2], w[3] - r[3])
    rows = list(change.items())
    if len(change) == 2:
        rows.append(("sink - plain", tuple(a - b for a, b in zip(change["sink"], change["plain"]))))
    print(f"| model | {windowed} - {reference}: log Gen-PPL (nats/judge token) | Gen-PPL ratio | entropy (nats) |")
    print("|---|---|---|---|")
    for name, (dppl, dent, ppl, ent) in rows:
        lo, hi = np.percentile(dppl, [2.5, 97.5])
        elo, ehi = np.percentile(dent, [2.5, 97.5])
        print(f"| {name} | {ppl:+.3f} [{lo:+.3f}, {hi:+.3f}] | {np.exp(ppl):.2f}x [{np.exp(lo):.2f}, {np.exp(hi):.2f}] "
              f"| {ent:+.3f} [{elo:+.3f}, {ehi:+.3f}] |")


if __name__ == "__main__":
    main(*sys.argv[1:4])
