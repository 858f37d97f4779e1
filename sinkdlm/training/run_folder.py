"""A run folder's lifecycle: one trainer at a time (a lock), the checks before resuming, and
`--overwrite`, which sets the old run aside until the new one has a checkpoint (nothing is lost)."""

from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
from pathlib import Path
from typing import Any

from sinkdlm import checkpoint as ckpt
from sinkdlm.config import Config, ModelConfig, TrainConfig
from sinkdlm.errors import UserError
from sinkdlm.files import METRICS_LOG as METRICS
from sinkdlm.training.batches import Source
from sinkdlm.training.loggers import LOGGER_DIRS

PREVIOUS_RUN = ".previous-run"  # an overwritten run waits here until the new run writes a checkpoint
LOCK_FILE = ".trainer.lock"  # flock'ed by the trainer that owns the run folder; holds its pid
LOCK_HOLDER_BYTES = 200  # enough for the "pid N on HOST" line the holder writes
# what a resumed run must share with the saved one to continue the same trajectory (max_steps may grow)
SAME_ON_RESUME = ("global_batch", "seed", "t_sampling", "eps", "random_length_prob", "objective")


def check_run_flags(train_cfg: TrainConfig) -> None:
    """Contradictory flags and a run folder that cannot be one, refused before anything starts."""
    run = Path(train_cfg.out_dir)
    if train_cfg.resume and train_cfg.overwrite:
        raise UserError(f"--resume continues the run in {run} and --overwrite replaces it: pass only one "
                        f"(train.resume / train.overwrite)")
    existing = next((p for p in (run, *run.parents) if p.exists()), None)
    if existing is not None and not existing.is_dir():
        raise UserError(f"train.out_dir={run}: {existing} is a file, not a folder; choose a folder "
                        f"for the run with --out DIR")


class RunLock:
    """One trainer per run folder: an exclusive flock on LOCK_FILE, which the kernel releases when the
    process ends however it ends (a killed run leaves no stale lock). The file names its holder and
    is removed when training ends."""

    def __init__(self, run: Path) -> None:
        self.run, self.path, self.fd = run, run / LOCK_FILE, None

    def acquire(self) -> None:
        fd = self.open()
        while fd is not None and not self.holds(fd):  # a finishing holder removed the file we opened
            os.close(fd)
            fd = self.open()
        if fd is not None:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode())
            self.fd = fd

    def open(self) -> int | None:
        """The lock file, opened and flock'ed; None where the filesystem has no flock."""
        try:
            self.run.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise UserError(f"cannot create the run folder {self.run} ({e.strerror}); choose another "
                            f"train.out_dir") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return fd
        except BlockingIOError:
            holder = os.read(fd, LOCK_HOLDER_BYTES).decode(errors="replace").strip() or "pid not written yet"
            os.close(fd)
            raise UserError(f"{self.run} is in use by another trainer ({holder}); let it finish or stop it, "
                            f"or train into another --out") from None
        except OSError as e:  # a filesystem without flock (some network mounts): say so, train anyway
            print(f"warning: cannot lock {self.run} ({e}); make sure no other trainer writes there",
                  file=sys.stderr)
            os.close(fd)
            return None

    def holds(self, fd: int) -> bool:
        """Whether the locked file is still the one at LOCK_FILE."""
        try:
            return os.stat(self.path).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            return False

    def release(self) -> None:
        if self.fd is not None:
            self.path.unlink(missing_ok=True)  # while still locked: see acquire
            os.close(self.fd)  # releases the flock
            self.fd = None


def claim_run_dir(cfg: Config, source: Source) -> Path | None:
    """Refuse to mix two runs in one folder. Returns the checkpoint to resume from, if any."""
    run = Path(cfg.train.out_dir)
    found = ckpt.list_checkpoints(run)
    holds_run = bool(found) or (run / METRICS).exists()
    if cfg.train.resume:
        if found:
            check_resume(cfg, source, found[-1])
            return found[-1]
        return None
    if holds_run and not cfg.train.overwrite:
        raise UserError(f"{run} already holds a run; pass train.resume=true to continue it or "
                        f"train.overwrite=true to replace it")
    return None


def check_resume(cfg: Config, source: Source, last: Path) -> None:
    """A resumed run continues one trajectory: same model function, recipe and data, in one line each."""
    run, saved = Path(cfg.train.out_dir), ckpt.load_config_of(last)
    differing = [f"model.{k}" for k in cfg.model.differences(saved.model, ModelConfig.IMPLEMENTATION_FIELDS)]
    differing += [f"train.{k}" for k in SAME_ON_RESUME if getattr(saved.train, k) != getattr(cfg.train, k)]
    if differing:
        raise UserError(f"cannot resume {run}: its config differs in {differing}; "
                        f"use the same config or a new train.out_dir")
    check_same_format(cfg, saved, last)
    if saved.seq_len != cfg.seq_len:
        raise UserError(f"cannot resume {run}: data.seq_len is {cfg.seq_len} but the run trained with "
                        f"{saved.seq_len}; set data.seq_len={saved.seq_len} or use a new train.out_dir")
    run_tok = last / ckpt.TOKENIZER
    if source.tokenizer_path and run_tok.is_file() and not same_json(run_tok, source.tokenizer_path):
        raise UserError(f"cannot resume {run}: the data's tokenizer {source.tokenizer_path} is not the one "
                        f"the run trained with ({run_tok}); use the run's data or a new train.out_dir")
    trained_on = ckpt.load_meta(last).get("data")
    if trained_on is not None and trained_on != source.identity:
        changed = sorted(k for k in {*trained_on, *source.identity} if trained_on.get(k) != source.identity.get(k))
        raise UserError(f"cannot resume {run}: its training data changed (meta differs in {changed}); "
                        f"point data at the run's data or use a new train.out_dir")


def check_same_format(cfg: Config, saved: Config, last: Path) -> None:
    """FSDP resumes from sharded state (at any world size), the other strategies from a whole
    optimizer state: a checkpoint holds only one of them."""
    sharded = ckpt.is_sharded(last)
    if sharded == (cfg.train.strategy == "fsdp"):
        return
    written = "with train.strategy=fsdp (sharded state)" if sharded else \
        f"with train.strategy={saved.train.strategy} (no sharded state)"
    use = "fsdp" if sharded else "auto or ddp"
    raise UserError(f"cannot resume {cfg.train.out_dir}: {last.name} was written {written}; resume it with "
                    f"train.strategy={use} (any number of devices) or use a new train.out_dir")


def same_json(a: Path, b: Path) -> bool:
    """Whether two JSON files hold the same content (formatting aside)."""
    return a.read_bytes() == b.read_bytes() or json.loads(a.read_text()) == json.loads(b.read_text())


def finished_result(cfg: Config, last: Path, step: int, tokens: int) -> dict[str, Any] | None:
    """For a resumed run that already reached its last step, the result without training; else None."""
    steps = cfg.steps()
    if step < steps:
        return None
    if step > steps:
        raise UserError(f"cannot resume {cfg.train.out_dir}: it is at step {step}, past the {steps} steps "
                        f"this config trains; raise train.max_steps (or --flops) or use a new train.out_dir")
    return {"checkpoint": last, "val_loss": ckpt.load_meta(last).get("val_loss", float("nan")),
            "steps": steps, "tokens": tokens}


def run_files(run: Path) -> list[Path]:
    """What a run wrote (checkpoints, metrics.jsonl, the loggers' folders); other files stay."""
    named = [run / name for name in (METRICS, *LOGGER_DIRS.values())]
    return ckpt.list_checkpoints(run) + [p for p in named if p.exists()]


def set_aside_run(run: Path) -> None:
    """`--overwrite`: move the old run into a hidden folder; settle_previous_run decides its fate."""
    aside = run / PREVIOUS_RUN
    aside.mkdir()
    for path in run_files(run):
        os.replace(path, aside / path.name)


def settle_previous_run(run: Path) -> None:
    """Delete a set-aside run once the new run has a checkpoint; restore it if the new run has none
    (it failed or was killed before its first checkpoint, so nothing is lost)."""
    aside = run / PREVIOUS_RUN
    if not aside.is_dir():
        return
    if ckpt.list_checkpoints(run):
        ckpt.discard(aside)
        return
    for path in run_files(run):
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink()
    for path in aside.iterdir():
        os.replace(path, run / path.name)
    aside.rmdir()
    print(f"warning: the run in {run} that --overwrite had set aside is restored: its replacement "
          f"stopped before writing a checkpoint", file=sys.stderr)
