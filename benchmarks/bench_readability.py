"""Which decoding settings give the most readable text from a small trained model (e.g. the demo's)?

There is no reader in the loop, so two stated proxies, per completion, then averaged over prompts:

- word coverage: share of the completion's non-space characters that lie in dictionary words, the
  dictionary being every lowercase word seen at least MIN_WORD_COUNT times in the checkpoint's own
  training split (punctuation soup such as "[[.\\n\\n" scores 0, Shakespeare's words score 1);
- known pairs: share of consecutive word pairs of the completion that occur at least MIN_WORD_COUNT
  times in the training split (local coherence: random BPE pieces are often words, rarely known pairs;
  a completion with fewer than two words scores 0);
- repeats: share of generated tokens equal to the token just before them (degenerate loops).

Two references frame them: held-out text itself (the ceiling) and uniformly random tokens (the floor).
Prompts are the first PROMPT_TOKENS tokens of evenly spaced held-out windows; every setting sees the same.

    python -m benchmarks.bench_readability --checkpoint runs/demo [--prompts 8] [--gen-length 64] [--threads N]
"""

from __future__ import annotations

import argparse
import re
import statistics
import time
from collections import Counter

import torch

from sinkdlm import checkpoint as ckpt
from sinkdlm.data.shards import PackedData, fixed_windows
from sinkdlm.sample import SampleConfig, generate

PROMPT_TOKENS = 16
MIN_WORD_COUNT = 3
DECODE_CHUNK = 100_000  # tokens decoded at a time when building the dictionary
WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
EXAMPLE_CHARS = 160


def settings(gen_length: int) -> dict[str, SampleConfig]:
    base = SampleConfig(gen_length=gen_length, steps=gen_length)
    return {
        "low_confidence, greedy (default)": base,
        "low_confidence, greedy, block 16": base.replace(block_length=16),
        "random, greedy": base.replace(remasking="random"),
        "low_confidence, T=0.7": base.replace(temperature=0.7),
        "low_confidence, T=1": base.replace(temperature=1.0),
        "low_confidence, T=1, top-p 0.9": base.replace(temperature=1.0, top_p=0.9),
        "low_confidence, T=1, block 16": base.replace(temperature=1.0, block_length=16),
        "random, T=0.5": base.replace(remasking="random", temperature=0.5),
        "random, T=0.7": base.replace(remasking="random", temperature=0.7),
        "random, T=0.7, block 16": base.replace(remasking="random", temperature=0.7, block_length=16),
        "random, T=1": base.replace(remasking="random", temperature=1.0),
        "random, T=1, top-p 0.9": base.replace(remasking="random", temperature=1.0, top_p=0.9),
        "random, T=1, block 16": base.replace(remasking="random", temperature=1.0, block_length=16),
    }


def dictionary(tok, tokens) -> tuple[set[str], set[tuple[str, str]]]:
    """(words, consecutive word pairs) seen at least MIN_WORD_COUNT times in `tokens`, lowercased."""
    words: Counter = Counter()
    pairs: Counter = Counter()
    for lo in range(0, len(tokens), DECODE_CHUNK):
        found = [w.lower() for w in WORD.findall(tok.decode(tokens[lo:lo + DECODE_CHUNK].tolist()))]
        words.update(found)
        pairs.update(zip(found, found[1:]))
    return ({w for w, n in words.items() if n >= MIN_WORD_COUNT},
            {p for p, n in pairs.items() if n >= MIN_WORD_COUNT})


def word_coverage(text: str, words: set[str]) -> float:
    chars = sum(not c.isspace() for c in text)
    covered = sum(len(m) for m in WORD.findall(text) if m.lower() in words)
    return covered / chars if chars else 0.0


def known_pairs(text: str, pairs: set[tuple[str, str]]) -> float:
    found = [w.lower() for w in WORD.findall(text)]
    return sum(p in pairs for p in zip(found, found[1:])) / (len(found) - 1) if len(found) > 1 else 0.0


def repeat_rate(tokens: list[int]) -> float:
    return sum(a == b for a, b in zip(tokens, tokens[1:])) / max(1, len(tokens) - 1)


def scores(tok, completions: list[list[int]], vocab: tuple[set[str], set[tuple[str, str]]]
           ) -> dict[str, tuple[float, float]]:
    """proxy -> (mean over prompts, standard error of that mean)."""
    words, pairs = vocab
    texts = [tok.decode(c) for c in completions]
    per = {"word coverage": [word_coverage(t, words) for t in texts],
           "known pairs": [known_pairs(t, pairs) for t in texts],
           "repeats": [repeat_rate(c) for c in completions],
           "tokens": [float(len(c)) for c in completions]}
    return {k: (statistics.fmean(v), statistics.stdev(v) / len(v) ** 0.5 if len(v) > 1 else 0.0)
            for k, v in per.items()}


def row(name: str, result: dict[str, tuple[float, float]], example: str, seconds: float | None) -> str:
    cells = [f"{m:.2f} ± {e:.2f}" if k != "tokens" else f"{m:.0f}" for k, (m, e) in result.items()]
    shown = example[:EXAMPLE_CHARS].replace("\n", "⏎").replace("|", "\\|")
    timing = f"{seconds:.1f}" if seconds is not None else "-"
    return f"| {name} | " + " | ".join(cells) + f" | {timing} | `{shown}` |"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--prompts", type=int, default=8)
    p.add_argument("--gen-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=None, help="CPU threads for torch (default: torch's)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    model, cfg = ckpt.load_model(args.checkpoint, "cpu")
    tok, eos = ckpt.load_tokenizer(args.checkpoint), ckpt.load_meta(args.checkpoint)["eos_id"]
    data = PackedData(cfg.data.path)
    vocab = dictionary(tok, data.tokens("train"))
    windows = fixed_windows(data.tokens("val"), PROMPT_TOKENS + args.gen_length, args.prompts)
    prompts = [w[:PROMPT_TOKENS].tolist() for w in windows]
    print(f"{len(vocab[0]):,} dictionary words and {len(vocab[1]):,} word pairs (seen >= {MIN_WORD_COUNT} times "
          f"in training); {len(prompts)} prompts of {PROMPT_TOKENS} tokens; {args.gen_length} new tokens\n")
    print("| setting | word coverage | known pairs | repeats | tokens | s | first completion (⏎ = newline) |")
    print("|---|---|---|---|---|---|---|")
    real = [w[PROMPT_TOKENS:].tolist() for w in windows]
    print(row("reference: held-out text", scores(tok, real, vocab), tok.decode(real[0]), None))
    rand = torch.randint(0, cfg.model.vocab_size, (len(prompts), args.gen_length),
                         generator=torch.Generator().manual_seed(args.seed)).tolist()
    print(row("reference: random tokens", scores(tok, rand, vocab), tok.decode(rand[0]), None))
    for name, sample_cfg in settings(args.gen_length).items():
        start = time.perf_counter()
        out = generate(model, prompts, sample_cfg.replace(seed=args.seed), model.mask_id, eos)
        seconds = time.perf_counter() - start
        print(row(name, scores(tok, out, vocab), tok.decode(out[0]), seconds), flush=True)


if __name__ == "__main__":
    main()
