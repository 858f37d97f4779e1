"""Stopping a run: Ctrl-C and SIGTERM, and the message that says where the run stands and the
command that continues it."""

from __future__ import annotations

import shlex
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from sinkdlm import checkpoint as ckpt
from sinkdlm.config import Config
from sinkdlm.training.run_folder import PREVIOUS_RUN, run_files

TRAINING_COMMANDS = ("train", "sft", "adapt")  # the commands a stopped run is continued with (plus --resume)
EXIT_INTERRUPTED = 130  # what the CLI returns for Ctrl-C (128 + SIGINT)


class StopSignals:
    """SIGTERM (what SLURM and Kubernetes send before preemption) is handled like Ctrl-C: it stops
    training with a KeyboardInterrupt. With train.checkpoint_on_signal the first one only asks the
    loop to write a checkpoint and stop at the next step boundary (a second Ctrl-C stops at once).
    The launching process passes SIGTERM on to the processes Fabric started (Kubernetes signals only
    the container's first process)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self, deferred: bool, fabric) -> None:
        self.deferred, self.fabric = deferred, fabric
        self.received: str | None = None
        self.previous: dict[int, Any] = {}

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():  # only it may set handlers
            self.previous = {s: signal.signal(s, self.handle) for s in self.SIGNALS}
        return self

    def __exit__(self, *exc: Any) -> None:
        for s, handler in self.previous.items():
            if handler is not None:  # None: a handler set outside Python, which cannot be put back
                signal.signal(s, handler)

    def handle(self, signum: int, frame: Any) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGTERM:
            for proc in getattr(self.fabric.strategy.launcher, "procs", []):
                proc.send_signal(signum)
        # SLURM may deliver SIGTERM twice (to the task and, forwarded, from the launcher): only a
        # second Ctrl-C cuts the checkpoint short
        if self.deferred and (self.received is None or signum == signal.SIGTERM):
            self.received = self.received or name
            return
        raise KeyboardInterrupt(name)


def resume_command() -> str:
    """The command line that continues this run: this one with --resume (and without --overwrite)."""
    args = sys.argv[1:]
    if not args or args[0] not in TRAINING_COMMANDS:
        return "the same command with --resume"
    kept = [a for a in args if a not in ("--resume", "--overwrite")
            and not a.startswith(("train.resume=", "train.overwrite="))]
    return shlex.join(["sinkdlm", *kept, "--resume"])


def stopped_message(cfg: Config, step: int, wrote_checkpoint: bool, cause: str) -> str:
    """Where an interrupted run stands and the command that continues it, after "interrupted"."""
    run = Path(cfg.train.out_dir)
    at = f"by {cause} at step {step}" if cause.startswith("SIG") else f"at step {step}"
    if cfg.train.overwrite and not wrote_checkpoint and ((run / PREVIOUS_RUN).is_dir() or run_files(run)):
        return (f"{at}, before the new run's first checkpoint, so the run in {run} it was to replace "
                f"is kept; rerun the same command to replace it")
    found = ckpt.list_checkpoints(run)
    if not found:
        return f"{at}, before the first checkpoint in {run}; start it again with: {resume_command()}"
    return f"{at}; the last complete checkpoint is {found[-1]}; continue with: {resume_command()}"


class Interrupted(KeyboardInterrupt):
    """Ctrl-C or SIGTERM during training; the message says where the run stands and how to continue."""
