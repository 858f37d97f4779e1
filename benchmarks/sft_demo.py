"""README's SFT path, measured: demo -> `sinkdlm sft --config configs/sft_demo.yaml` (per seed, optionally
stopped with SIGINT after a checkpoint and resumed with the same command + --resume) -> `sinkdlm eval-gsm8k
--data synthetic`; prints a table (correct of the 198 held-out problems, Wilson 95% interval, wall times)
and exits 1 when a seed scores below the floor README promises (PROMISED_CORRECT).

Too long for CI: 25-35 min per seed on one thread (the demo 5-30 min once, by how busy the machine is).
Run from the repository root; rerunning continues (finished seeds are read back, not redone):

    OMP_NUM_THREADS=1 python -m benchmarks.sft_demo --out /tmp/sft-bench --seeds 42,1 --stop-at 2000
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from sinkdlm import checkpoint as ckpt
from sinkdlm.eval.gsm8k import SUMMARY
from sinkdlm.intervals import wilson_interval

RECIPE = "configs/sft_demo.yaml"
HELD_OUT = 198
PROMISED_CORRECT = 150  # README's floor for every seed (75.8%); measured 172 (seed 42) and 198 (seed 1): BENCHMARKS.md
POLL_S = 1


def sinkdlm(*args: str) -> list[str]:
    return [sys.executable, "-m", "sinkdlm", *args]


def timed(cmd: list[str], log: Path, stop_when: Path | None = None) -> tuple[float, bool]:
    """Run `cmd` (output to `log`); with `stop_when`, send it SIGINT (Ctrl-C) once that path exists.
    Returns (wall seconds, whether it was stopped)."""
    started, stopped = time.perf_counter(), False
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("a") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)
        while stop_when is not None and proc.poll() is None and not stop_when.exists():
            time.sleep(POLL_S)
        if stop_when is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            stopped = True
        code = proc.wait()
    if code != 0 and not stopped:
        raise SystemExit(f"{' '.join(cmd)} exited {code}; see {log}")
    return time.perf_counter() - started, stopped


def sft_seed(demo: Path, out: Path, seed: int, stop_at: int | None, overrides: list[str]) -> dict:
    """Train one seed's SFT run and evaluate its last checkpoint on the held-out problems (read back when
    an earlier call finished both)."""
    run, done = out / f"sft-seed{seed}", out / f"result-seed{seed}.json"
    if done.is_file():
        return json.loads(done.read_text())
    log = out / f"sft-seed{seed}.log"
    command = sinkdlm("sft", "--config", RECIPE, "--init-from", str(demo), "--out", str(run), f"train.seed={seed}",
                      "train.progress=false", *overrides)
    seconds, stopped = 0.0, False
    if stop_at and not ckpt.list_checkpoints(run):
        seconds, stopped = timed(command, log, stop_when=run / f"step-{stop_at:08d}")
    seconds += timed([*command, "--resume"], log)[0]  # a fresh start when nothing is there; else continues
    eval_seconds, _ = timed(sinkdlm("eval-gsm8k", "--checkpoint", str(run), "--data", "synthetic", "--no-progress",
                                    "--overwrite"), out / f"eval-seed{seed}.log")
    last = ckpt.list_checkpoints(run)[-1]
    summary = json.loads((last / "gsm8k-synthetic" / SUMMARY).read_text())
    result = {"seed": seed, "correct": round(summary["accuracy"] * summary["n"]), "n": summary["n"],
              "metric": summary["metric"], "stopped_at": stop_at if stopped else None, "sft_s": seconds,
              "eval_s": eval_seconds, "checkpoint": str(last)}
    done.write_text(json.dumps(result) + "\n")
    return result


def row(r: dict) -> str:
    lo, hi = wilson_interval(r["correct"], r["n"])
    resumed = f"stopped after step {r['stopped_at']}, resumed" if r["stopped_at"] else "uninterrupted"
    return (f"| {r['seed']} | {resumed} | {r['correct']}/{r['n']} | {100 * r['correct'] / r['n']:.1f} "
            f"[{100 * lo:.1f}, {100 * hi:.1f}] | {r['sft_s'] / 60:.1f} min | {r['eval_s']:.0f} s |")


def seeds(text: str) -> list[int]:
    return [int(x) for x in text.split(",")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="scratch folder (the demo, one SFT run per seed, logs)")
    parser.add_argument("--demo", help="an existing demo run to fine-tune (default: run `sinkdlm demo` into --out)")
    parser.add_argument("--seeds", type=seeds, default=[42], help="SFT seeds (train.seed)")
    parser.add_argument("--stop-at", type=int, help="stop the first seed with SIGINT once this step's checkpoint "
                                                    "exists, then resume it (a multiple of train.save_every)")
    parser.add_argument("--floor", type=int, default=PROMISED_CORRECT, help="fewest correct answers a seed may give")
    parser.add_argument("overrides", nargs="*", help="SFT config overrides (smoke runs: train.max_steps=2 ...)")
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    demo = Path(args.demo) if args.demo else out / "demo"
    if not args.demo:
        timed(sinkdlm("demo", "--out", str(demo), "--data", str(out / "demo-data")), out / "demo.log")
    results = [sft_seed(demo, out, seed, args.stop_at if i == 0 else None, args.overrides)
               for i, seed in enumerate(args.seeds)]
    print(f"{RECIPE} from {demo}, then eval-gsm8k --data synthetic ({HELD_OUT} held-out problems)\n")
    print("| seed | run | correct | % [95% Wilson] | sft wall | eval wall |\n|---|---|---:|---:|---:|---:|")
    print("\n".join(row(r) for r in results))
    (out / "sft_demo.json").write_text(json.dumps(results, indent=1) + "\n")
    low = [r["seed"] for r in results if r["correct"] < args.floor]
    if low:
        print(f"FAIL: seed(s) {low} below the floor of {args.floor}/{HELD_OUT}")
        return 1
    print(f"every seed at or above the floor of {args.floor}/{HELD_OUT}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
