"""Likelihood evaluation throughput: batched vs one MC sample per forward, on ARC-Easy requests.

A demo-preset-shaped model (random weights; speed does not depend on them) with a 4096-piece BPE
trained on the questions scores ARC-Easy multiple-choice requests through the lm-eval model class.
Modes run interleaved, repeated; we print medians. Needs the offline ARC-Easy task
(`sinkdlm data benchmarks --tasks arc_easy`, fetched on first run).

    python benchmarks/bench_eval.py [--questions 8] [--mc-num 32] [--repeats 3] [--threads 1]

`--crn CHECKPOINT` instead measures common random numbers: ARC-Easy accuracy over 5 seeds with and
without them (spread of accuracy, and how often a question's chosen answer changes with the seed).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.config import Config, model_preset
from sinkdlm.eval import task_data
from sinkdlm.eval.harness import DiffusionLM
from sinkdlm.eval.likelihood import ForwardStats
from sinkdlm.model import DLM

VOCAB = 4096
TASK = "arc_easy"
# mode -> estimator overrides
MODES = {
    "one sample per forward": dict(batch_size=1, dedupe=False),
    "batched (64 rows)": dict(batch_size=64, dedupe=False),
    "batched + dedupe": dict(batch_size=64, dedupe=True),
}


def arc_docs(n: int) -> list[dict]:
    task_data.materialise([TASK])
    path = task_data.tasks_dir() / TASK / f"{TASK}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()[:n]]


def make_checkpoint(folder: Path, texts: list[str], sink_tokens: int) -> Path:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                                       show_progress=False))
    tok.save(str(folder / "tokenizer.json"))
    cfg = Config(model=model_preset("demo", vocab_size=VOCAB, sink_tokens=sink_tokens))
    return save_checkpoint(folder / "run", 0, DLM(cfg.model).state_dict(), cfg, {"eos_id": 0},
                           tokenizer=folder / "tokenizer.json")


def requests_of(docs: list[dict]) -> list[SimpleNamespace]:
    return [SimpleNamespace(args=(d["query"], " " + c), doc_id=i, task_name=TASK)
            for i, d in enumerate(docs) for c in d["choices"]]


def time_mode(lm: DiffusionLM, requests: list, overrides: dict) -> tuple[float, ForwardStats, list]:
    lm.overrides.update(overrides)
    lm.stats = ForwardStats()
    start = time.perf_counter()
    out = lm.loglikelihood(requests, disable_tqdm=True)
    return time.perf_counter() - start, lm.stats, out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--questions", type=int, default=8)
    parser.add_argument("--mc-num", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--sink-tokens", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--crn", metavar="CHECKPOINT", default=None, help="run the CRN study on this checkpoint")
    parser.add_argument("--seeds", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(0)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.crn:
        crn_study(args)
        return
    docs = arc_docs(args.questions)
    requests = requests_of(docs)
    with tempfile.TemporaryDirectory() as tmp:
        texts = [d["query"] + " " + " ".join(d["choices"]) for d in arc_docs(10_000)]
        lm = DiffusionLM(pretrained=str(make_checkpoint(Path(tmp), texts, args.sink_tokens)), mc_num=args.mc_num)
    times: dict[str, list[float]] = {m: [] for m in MODES}
    stats, outputs = {}, {}
    for _ in range(args.repeats):  # interleaved, so load changes hit every mode alike
        for mode, overrides in MODES.items():
            seconds, stats[mode], outputs[mode] = time_mode(lm, requests, overrides)
            times[mode].append(seconds)
    report(times, stats, outputs, len(requests), args, torch.get_num_threads())


def report(times: dict, stats: dict, outputs: dict, n: int, args: argparse.Namespace, threads: int) -> None:
    base = statistics.median(times[next(iter(MODES))])
    print(f"ARC-Easy, {args.questions} questions = {n} requests, mc_num {args.mc_num}, demo preset "
          f"(vocab {VOCAB}, sink x{args.sink_tokens}), {threads} threads, median of {args.repeats}\n")
    print("| mode | requests/s | forward tokens / request | forwards / request | speed-up |")
    print("|---|---:|---:|---:|---:|")
    for mode in MODES:
        med = statistics.median(times[mode])
        s = stats[mode]
        print(f"| {mode} | {n / med:.2f} | {s.tokens / n:.0f} | {s.forwards / n:.1f} | {base / med:.1f}x |")
    ref = outputs[next(iter(MODES))]
    worst = max(abs(a[0] - b[0]) for mode in MODES for a, b in zip(ref, outputs[mode]))
    print(f"\nlargest log-likelihood difference between modes: {worst:.2e} (same random numbers; float32)")


def crn_study(args: argparse.Namespace) -> None:
    docs = arc_docs(args.questions)
    requests = requests_of(docs)
    lm = DiffusionLM(pretrained=args.crn, mc_num=args.mc_num)
    print(f"CRN study: {args.crn}, ARC-Easy first {len(docs)} questions, mc_num {args.mc_num}, "
          f"seeds 0..{args.seeds - 1}\n")
    print("| random numbers | accuracy per seed (%) | std over seeds (pts) | answers that change with the seed |")
    print("|---|---|---:|---:|")
    for crn in (True, False):
        picks = []
        for seed in range(args.seeds):
            lm.overrides.update(seed=seed, crn=crn)
            scores = iter(ll for ll, _ in lm.loglikelihood(requests, disable_tqdm=True))
            per_doc = [[next(scores) for _ in d["choices"]] for d in docs]
            picks.append([max(range(len(s)), key=s.__getitem__) for s in per_doc])
        accs = [100 * statistics.mean(p == d["gold"] for p, d in zip(pick, docs)) for pick in picks]
        unstable = statistics.mean(len({pick[q] for pick in picks}) > 1 for q in range(len(docs)))
        print(f"| {'shared (CRN)' if crn else 'independent'} | {' / '.join(f'{a:.1f}' for a in accs)} | "
              f"{statistics.pstdev(accs):.2f} | {100 * unstable:.1f}% |")


if __name__ == "__main__":
    main()
