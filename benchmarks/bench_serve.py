"""`sinkdlm serve` throughput and latency: batched (--max-batch 16) vs unbatched (--max-batch 1).

Starts both servers on the checkpoint (loopback, free ports, `--threads` torch threads each), then
for each number of concurrent clients (default 1, 4, 16) sends `--requests-per-client` x clients
completion requests to one server, then the same to the other (interleaved, so machine load hits
both alike; an idle server uses no CPU). Each request asks `--max-tokens` tokens in as many steps at
`--temperature` (0.7) with its own seed, from a fixed list of prompts. The table gives requests/s, latency
percentiles (p50/p90/p99, seconds), the mean rows per generate call (from /health), and requests per
CPU second of the server process (its user + system time, from /proc): on a shared machine the
wall-clock numbers depend on the other processes' load, that one much less.

    python -m benchmarks.bench_serve --checkpoint runs/demo [--clients 1,4,16] [--requests-per-client 8] [--temperature 0.7]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).parents[1]
PROMPTS = ["ROMEO:", "JULIET:\nO", "First Citizen:\nBefore we proceed", "KING RICHARD III:\nNow is",
           "HAMLET:\nTo be", "MERCUTIO:\nNay,", "LADY MACBETH:\nOut,", "PROSPERO:\nOur revels"]
MODES = {"batched": ["--max-batch", "16", "--batch-window-ms", "10"], "unbatched": ["--max-batch", "1",
                                                                                   "--batch-window-ms", "0"]}
START_TIMEOUT_S = 120


def start(checkpoint: str, threads: int, extra: list[str]) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    proc = subprocess.Popen([sys.executable, "-m", "sinkdlm", "serve", "--checkpoint", checkpoint, "--port", "0",
                             "--threads", str(threads), *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"at (http://\S+/v1)", line)
    if not match:
        proc.kill()
        sys.exit(f"the server did not start: {line!r}")
    return proc, match.group(1)


def get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=60) as r:
        return json.loads(r.read())


def complete(url: str, model: str, i: int, max_tokens: int, temperature: float) -> float:
    body = json.dumps({"model": model, "prompt": PROMPTS[i % len(PROMPTS)], "max_tokens": max_tokens,
                       "steps": max_tokens, "temperature": temperature, "seed": i}).encode()
    request = urllib.request.Request(url + "/completions", data=body, headers={"Content-Type": "application/json"})
    start = time.perf_counter()
    with urllib.request.urlopen(request, timeout=600) as r:
        json.loads(r.read())
    return time.perf_counter() - start


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process (Linux /proc; fields 14 and 15 of stat, in clock ticks)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def load(url: str, pid: int, model: str, clients: int, requests: int, max_tokens: int, temperature: float) -> dict:
    health = url.removesuffix("/v1") + "/health"
    before, cpu = get(health), cpu_seconds(pid)
    with ThreadPoolExecutor(clients) as pool:
        start = time.perf_counter()
        latencies = sorted(pool.map(lambda i: complete(url, model, i, max_tokens, temperature), range(requests)))
        wall = time.perf_counter() - start
    after, cpu = get(health), cpu_seconds(pid) - cpu
    q = statistics.quantiles(latencies, n=100, method="inclusive")
    return {"rps": requests / wall, "p50": statistics.median(latencies), "p90": q[89], "p99": q[98],
            "rows_per_batch": (after["rows"] - before["rows"]) / max(1, after["batches"] - before["batches"]),
            "requests": requests, "wall": wall, "per_cpu_s": requests / cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--clients", default="1,4,16")
    parser.add_argument("--requests-per-client", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--temperature", type=float, default=0.7)
    args = parser.parse_args()
    servers = {mode: start(args.checkpoint, args.threads, extra) for mode, extra in MODES.items()}
    try:
        model = get(next(iter(servers.values()))[1] + "/models")["data"][0]["id"]
        for proc, url in servers.values():  # warm-up: first-call allocations, lazy imports
            load(url, proc.pid, model, 2, 4, args.max_tokens, args.temperature)
        rows = []
        for clients in (int(c) for c in args.clients.split(",")):
            for mode, (proc, url) in servers.items():
                result = load(url, proc.pid, model, clients, clients * args.requests_per_client, args.max_tokens,
                              args.temperature)
                rows.append((mode, clients, result))
                print(f"{mode} x{clients}: {result['rps']:.2f} req/s, p50 {result['p50']:.2f} s "
                      f"({result['requests']} requests in {result['wall']:.1f} s)", file=sys.stderr, flush=True)
    finally:
        for proc, _ in servers.values():
            proc.terminate()
            proc.wait(timeout=30)
    print(f"\n{args.max_tokens} tokens in {args.max_tokens} steps per request, temperature {args.temperature}, threads "
          f"{args.threads} per server, load average {os.getloadavg()[0]:.1f}\n")
    print("| server | clients | requests | requests/s | p50 s | p90 s | p99 s | rows per batch | requests per CPU s |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for mode, clients, r in rows:
        print(f"| {mode} | {clients} | {r['requests']} | {r['rps']:.2f} | {r['p50']:.2f} | {r['p90']:.2f} | "
              f"{r['p99']:.2f} | {r['rows_per_batch']:.1f} | {r['per_cpu_s']:.2f} |")


if __name__ == "__main__":
    main()
