"""Generation speed: full recompute vs sink-constant K/V vs prefix/dual KV cache vs parallel decoding.

A demo-preset-shaped random model (vocab 4096), plain and with one sink, generates `--gen-length`
tokens (block 32), scheduled one token per step (steps = length; parallel decoding, by a confidence
threshold or Fast-dLLM's factor rule, may unmask more per step, and rows that hit EOS stop early:
eos=fill). Settings are interleaved within each repeat so machine
load hits them alike; the table gives median tokens/s, its spread (min-max over repeats), forward
calls and how many of them computed every position (all without a cache; with one the blocks' first
and the refreshes), the speed-up over full recompute of the same model (the median over repeats of each repeat's
ratio, with its min-max), and the share of generated tokens equal to
the full-recompute output (exact settings must show 100%).

    python benchmarks/bench_generate.py [--repeats 3] [--batch 4] [--threads N] [--device cpu]
        [--thresholds 0.9] [--factors 1 2] [--refresh 4] [--refresh-tokens 4 8]

A random model's predictions are near uniform, so argmax ties flip under the tiny numerical changes
of an approximate cache (low agreement) and no confidence passes a threshold (no saved steps).
`--checkpoint DIR` measures a trained model instead (its block_size bounds prompt + gen length), on
random-token prompts, or with `--synthetic-gsm8k N` on N held-out problems of the synthetic SFT set
(for a checkpoint fine-tuned on it, i.e. a model that is confident where it should be); the table
then also gives each setting's answer accuracy:

    python benchmarks/bench_generate.py --checkpoint runs/sft-synth --synthetic-gsm8k 64 --gen-length 64

`--kv-cache` measures instead the KV cache bytes per token of a Dream-7B-shaped attention (28 query
heads over 4 key/value heads of 128, bf16) with the grouped heads stored as they are (today) and
repeated per query head (before issue 23), from a one-layer model's filled cache.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import time

import torch

from sinkdlm.config import model_preset
from sinkdlm.model import DLM
from sinkdlm.sample import SampleConfig, generate

VOCAB = 4096
EOS = 0
BLOCK = 32
PROMPT_LEN = 16


def settings(gen_length: int, thresholds: list[float], refreshes: list[int] = (), factors: list[float] = (),
             refresh_tokens: list[int] = (), block: int = BLOCK) -> dict[str, tuple[SampleConfig, bool]]:
    """name -> (sampling config, use the sink K/V constant cache). Each parallel rule (a threshold, a factor)
    runs alone, + prefix and + dual cache, + dual refreshed every N steps, and + prefix and + dual refreshed
    after N committed tokens."""
    base = SampleConfig(gen_length=gen_length, steps=gen_length, block_length=block, eos="fill")
    rules = {f"threshold {t}": dict(threshold=t) for t in thresholds} | \
        {f"factor {f:g}": dict(threshold_factor=f) for f in factors}
    table = {
        "full recompute": (base, False),
        "sink K/V constant": (base, True),
        "prefix cache": (base.replace(cache="prefix"), True),
        "dual cache": (base.replace(cache="dual"), True),
    }
    for name, rule in rules.items():
        for cache in ("none", "prefix", "dual"):
            table[name + (f" + {cache}" if cache != "none" else "")] = (base.replace(**rule, cache=cache), True)
        for r in refreshes:
            table[f"{name} + dual, refresh every {r}"] = (base.replace(**rule, cache="dual", cache_refresh=r), True)
        for n in refresh_tokens:
            for cache in ("prefix", "dual"):
                table[f"{name} + {cache}, refresh after {n} tokens"] = (
                    base.replace(**rule, cache=cache, cache_refresh_tokens=n), True)
    return table


def build(sink: int, gen_length: int, device: str) -> DLM:
    torch.manual_seed(0)
    cfg = model_preset("demo", vocab_size=VOCAB, sink_tokens=sink, block_size=PROMPT_LEN + gen_length)
    return DLM(cfg).to(device).eval()


def run_once(model: DLM, batches: list[list[list[int]]], cfg: SampleConfig, sink_cache: bool,
             eos: int, full_calls: list[int] | None = None) -> tuple[float, int, list]:
    """Seconds, forward calls and outputs of generating for every batch of prompts; full_calls, when
    given, receives the number of those calls that computed every position."""
    original = type(model).sink_cache
    if not sink_cache:  # the model recomputes the sink stream in every forward
        type(model).sink_cache = lambda self: contextlib.nullcontext()
    try:
        calls, full, out = 0, 0, []
        started = time.perf_counter()
        for prompts in batches:
            stats: dict = {}
            out += generate(model, prompts, cfg, model.mask_id, eos, stats=stats)
            calls, full = calls + stats["forward_calls"], full + stats["full_forward_calls"]
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        if full_calls is not None:
            full_calls.append(full)
        return time.perf_counter() - started, calls, out
    finally:
        type(model).sink_cache = original


DREAM_ATTENTION = dict(n_embd=3584, n_head=28, n_query_groups=4, n_layer=1, intermediate_size=64, vocab_size=64)
DREAM_LAYERS = 28
CACHE_TOKENS = 256


def kv_cache_table() -> None:
    """Cache bytes per token, grouped vs repeated key/value heads, for a Dream-7B-shaped layer."""
    from sinkdlm.model import KVCache

    print(f"Dream-7B attention shape: {DREAM_ATTENTION['n_head']} query heads, {DREAM_ATTENTION['n_query_groups']} "
          f"key/value heads of {DREAM_ATTENTION['n_embd'] // DREAM_ATTENTION['n_head']}, bf16; one layer's cache "
          f"filled by a forward over {CACHE_TOKENS} tokens, x {DREAM_LAYERS} layers\n")
    print("| key/value heads stored | bytes per token per layer | MiB per 1,000 tokens (28 layers) |")
    print("|---|---:|---:|")
    for label, groups in [("grouped (4, as now)", 4), ("repeated per query head (28, before)", None)]:
        cfg = model_preset("tiny", **{**DREAM_ATTENTION, "n_query_groups": groups, "block_size": CACHE_TOKENS})
        model = DLM(cfg).to(torch.bfloat16).eval()
        cache = KVCache()
        with torch.no_grad():
            model(torch.randint(0, 64, (1, CACHE_TOKENS)), cache=cache)
        per_token = cache.nbytes() / CACHE_TOKENS
        print(f"| {label} | {per_token:.0f} | {per_token * DREAM_LAYERS * 1000 / 2**20:.1f} |")


def paired(reference: list[float], seconds: list[float]) -> str:
    """Speed-up per repeat (the settings of a repeat ran back to back): median (min-max)."""
    ratios = sorted(r / s for r, s in zip(reference, seconds))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


def agreement(out: list[list[int]], ref: list[list[int]]) -> float:
    same = sum(a == b for row, ref_row in zip(out, ref) for a, b in zip(row, ref_row))
    return same / sum(len(r) for r in ref)


def synthetic_problems(checkpoint: str, n: int, device: str):
    """(model, eos id, prompts, gold answers, tokenizer) for n held-out synthetic GSM8K-format problems."""
    from sinkdlm.data.sft import gsm8k_prompt, synthetic_gsm8k_test
    from sinkdlm.eval.gsm8k import gold_answer
    from sinkdlm.sample import load_for_sampling

    model, tok, eos = load_for_sampling(checkpoint, device)
    rows = synthetic_gsm8k_test(n)
    prompts = [tok.encode(gsm8k_prompt(r["question"])).ids for r in rows]
    return model, eos, prompts, [gold_answer(r["answer"]) for r in rows], tok


def accuracy(out: list[list[int]], gold: list[str], tok) -> float:
    from sinkdlm.eval.gsm8k import equivalent, extract_flexible

    texts = [tok.decode(tokens, skip_special_tokens=True) for tokens in out]
    return sum(equivalent(extract_flexible(t), g) for t, g in zip(texts, gold)) / len(gold)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gen-length", type=int, default=256)
    parser.add_argument("--block", type=int, default=BLOCK, help="block length; divides --gen-length")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch's default)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--thresholds", type=float, nargs="+", default=[0.9],
                        help="confidence thresholds to measure (each alone, + prefix, + dual cache)")
    parser.add_argument("--checkpoint", help="a trained checkpoint instead of the random plain/sink pair")
    parser.add_argument("--synthetic-gsm8k", type=int, metavar="N",
                        help="with --checkpoint: prompts = N held-out synthetic SFT problems; adds accuracy")
    parser.add_argument("--factors", type=float, nargs="*", default=[],
                        help="Fast-dLLM factors (threshold_factor) to measure, as the thresholds are")
    parser.add_argument("--refresh", type=int, nargs="*", default=[],
                        help="also each threshold/factor + dual cache recomputed every N steps of a block, for each N")
    parser.add_argument("--refresh-tokens", type=int, nargs="*", default=[],
                        help="also each threshold/factor + prefix and + dual cache, a row's recomputed once N of its "
                             "tokens were committed since its last refresh (cache_refresh_tokens), for each N")
    parser.add_argument("--kv-cache", action="store_true",
                        help="only measure the KV cache bytes of a Dream-7B-shaped attention, grouped vs repeated")
    args = parser.parse_args()
    if args.kv_cache:
        return kv_cache_table()
    if args.synthetic_gsm8k and not args.checkpoint:
        parser.error("--synthetic-gsm8k needs --checkpoint (a model fine-tuned with sinkdlm sft)")
    if args.threads:
        torch.set_num_threads(args.threads)
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(1, VOCAB, (args.batch, PROMPT_LEN), generator=gen).tolist()
    eos, gold, tok = EOS, None, None
    if args.synthetic_gsm8k:
        model, eos, prompts, gold, tok = synthetic_problems(args.checkpoint, args.synthetic_gsm8k, args.device)
        models = {f"SFT checkpoint (sink_tokens={model.cfg.sink_tokens})": model}
    elif args.checkpoint:
        from sinkdlm.checkpoint import load_model

        model, cfg = load_model(args.checkpoint, args.device)
        models = {f"checkpoint (sink_tokens={cfg.model.sink_tokens})": model}
        prompts = [[t % cfg.model.vocab_size for t in p] for p in prompts]
    else:
        models = {"plain": build(0, args.gen_length, args.device), "sink": build(1, args.gen_length, args.device)}
    batches = [prompts[i: i + args.batch] for i in range(0, len(prompts), args.batch)]
    table = settings(args.gen_length, sorted(set(args.thresholds)), sorted(set(args.refresh)),
                     sorted(set(args.factors)), sorted(set(args.refresh_tokens)), args.block)
    times = {(m, s): [] for m in models for s in table}
    calls, full, outputs = {}, {}, {}
    for _ in range(args.repeats):
        for m, model in models.items():
            for s, (cfg, sink_cache) in table.items():
                full[m, s] = []
                seconds, calls[m, s], outputs[m, s] = run_once(model, batches, cfg, sink_cache, eos, full[m, s])
                times[m, s].append(seconds)
    tokens = len(prompts) * args.gen_length
    print(f"gen length {args.gen_length}, block {args.block}, {len(prompts)} prompts in batches of {args.batch}, "
          f"{args.repeats} repeats, device {args.device}, threads {torch.get_num_threads()}\n")
    extra = (" accuracy |", "---:|") if gold else ("", "")
    print("| model | setting | tokens/s (median) | spread (min-max) | forward calls | of them full | "
          "speed-up (paired, min-max) | agreement |"
          + extra[0])
    print("|---|---|---:|---:|---:|---:|---:|---:|" + extra[1])
    for m in models:
        for s in table:
            t = times[m, s]
            rates = sorted(tokens / x for x in t)
            print(f"| {m} | {s} | {tokens / statistics.median(t):.0f} | {rates[0]:.0f}-{rates[-1]:.0f} | "
                  f"{calls[m, s]} | {full[m, s][0]} | {paired(times[m, 'full recompute'], t)} | "
                  f"{100 * agreement(outputs[m, s], outputs[m, 'full recompute']):.2f}% |"
                  + (f" {100 * accuracy(outputs[m, s], gold, tok):.1f}% |" if gold else ""))


if __name__ == "__main__":
    main()
