"""One Lightning Fabric trainer for pretraining, SFT and adaptation; they differ only by config.

Every random choice (which windows, which t, which tokens are masked) is a pure function of
(seed, step, global sample index), so resuming is exact and the global batch is the same samples
whatever the world size: micro-batch and accumulation follow from the real number of devices.
"""

from __future__ import annotations

import fcntl
import functools
import hashlib
import json
import math
import os
import shlex
import shutil
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from sinkdlm import checkpoint as ckpt
from sinkdlm import diffusion
from sinkdlm.config import Config, ModelConfig, OptimConfig, TrainConfig
from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from sinkdlm.files import METRICS_LOG as METRICS  # the canonical log; train.loggers' are extra views
from sinkdlm.model import DLM, count_params
from sinkdlm.optional import install_hint
from sinkdlm.training.parallelize import apply_block_options, parallelize

LOGGER_DIRS = {"csv": "csv", "tensorboard": "tb", "wandb": "wandb"}  # each logger's folder in the run
# wandb is no extra of ours: it is installed on its own
LOGGER_INSTALL = {"tensorboard": install_hint("tensorboard"), "wandb": "pip install wandb"}
WANDB_PROJECT = "sinkdlm"
PREVIOUS_RUN = ".previous-run"  # an overwritten run waits here until the new run writes a checkpoint
LOCK_FILE = ".trainer.lock"  # flock'ed by the trainer that owns the run folder; holds its pid
LOCK_HOLDER_BYTES = 200  # enough for the "pid N on HOST" line the holder writes
TRAINING_COMMANDS = ("train", "sft", "adapt")  # the commands a stopped run is continued with (plus --resume)
EXIT_INTERRUPTED = 130  # what the CLI returns for Ctrl-C (128 + SIGINT)
LAUNCHER_EXIT_WAIT_S = 10.0  # how long a process Fabric started lets rank 0 exit first (see train)
PARENT_POLL_S = 0.1
MONITOR_WINDOWS = 2  # validation windows the sink monitor looks at
MONITOR_T = 0.5  # their masking level
# what a resumed run must share with the saved one to continue the same trajectory (max_steps may grow)
SAME_ON_RESUME = ("global_batch", "seed", "t_sampling", "eps", "random_length_prob", "objective")
SFT_VAL_SHARE = 10  # SFT holds out at most 1 in this many examples (and at most data.val_windows)
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# data: pretraining windows or SFT examples, behind the same two calls


@dataclass
class Source:
    """Where batches come from. `response` masks are None for pretraining (every token maskable)."""

    vocab_size: int
    eos_id: int
    tokenizer_path: Path | None
    identity: dict[str, Any]  # what a resumed run must find unchanged (saved in each checkpoint's meta)
    batch: Any  # (step, indices) -> (ids (n, L), response mask (n, L) | None)
    val: tuple[Tensor, Tensor | None]  # fixed held-out examples


def pretrain_source(cfg: Config) -> Source:
    from sinkdlm.data.shards import PackedData, fixed_windows, window_sampler

    data = PackedData(cfg.data.path)
    seq = cfg.seq_len
    windows = window_sampler(cfg.data.order, data.tokens("train"), seq, cfg.train.seed, cfg.train.global_batch)
    val = fixed_windows(data.tokens("val"), seq, cfg.data.val_windows)
    identity = {**data.meta, "order": cfg.data.order}  # another window order is another trajectory
    return Source(data.vocab_size, data.eos_id, Path(cfg.data.path) / data.meta["tokenizer_file"], identity,
                  lambda step, idx: (windows(step, idx), None), (val, None))


def sft_source(cfg: Config) -> Source:
    from sinkdlm.data.sft import SFTData, sft_indices

    if not cfg.train.init_from:
        raise UserError("SFT needs train.init_from=<pretrained checkpoint> (its tokenizer defines the data)")
    tok_path = ckpt.resolve(cfg.train.init_from) / ckpt.TOKENIZER
    eos = ckpt.load_meta(cfg.train.init_from).get("eos_id")
    if eos is None:
        raise UserError(f"checkpoint {cfg.train.init_from} records no eos_id; SFT pads responses with EOS")
    data = SFTData(cfg.data.sft_path, ckpt.load_tokenizer(cfg.train.init_from), cfg.seq_len, eos)
    # the last examples are held out for validation, and never trained on
    n_val = min(cfg.data.val_windows, len(data) // SFT_VAL_SHARE)
    if n_val < 1:
        raise UserError(f"{cfg.data.sft_path} has {len(data)} examples; SFT needs at least {SFT_VAL_SHARE} "
                        f"to hold some out for validation")
    n_train = len(data) - n_val

    def batch(step: int, idx: list[int]) -> tuple[Tensor, Tensor]:
        return data.batch(sft_indices(cfg.train.seed, step, idx, n_train))

    identity = {"sft_data_sha256": hashlib.sha256(Path(cfg.data.sft_path).read_bytes()).hexdigest()}
    return Source(cfg.model.require_vocab(), eos, tok_path, identity, batch,
                  data.batch(list(range(n_train, len(data)))))


# ---------------------------------------------------------------------------------------------
# the objective


def diffusion_loss(model: torch.nn.Module, cfg: Config, ids: Tensor, response: Tensor | None, step: int,
                   indices: list[int], attention: Tensor | None = None) -> Tensor:
    """The ELBO for one micro-batch: mask with p(t), predict the masked tokens, weight by 1/p.

    `indices` are the rows' places in the global batch of `step`: with cfg.train's seed they key every
    draw, so a row's masks do not depend on the micro-batch or the process it lands in."""
    t = cfg.train
    p = diffusion.noise_level(diffusion.draw_t(t.seed, step, indices, t.global_batch, t.t_sampling), t.eps)
    uniforms = diffusion.draw_uniforms(t.seed, step, indices, ids.shape[1])
    noisy, masked = diffusion.mask_tokens(ids, p, uniforms, cfg.model.mask_id, maskable=response)
    weights = diffusion.pretrain_weights(ids) if response is None else diffusion.sft_weights(response)
    return diffusion.elbo_loss(model(noisy, attention), ids, masked, p, weights)


def lr_at(step: int, total: int, o: OptimConfig) -> float:
    """Linear warmup for max(warmup_frac * total, warmup_min_steps) steps, then cosine to min_lr."""
    warmup = min(total, max(int(o.warmup_frac * total), o.warmup_min_steps))
    if step < warmup:
        return o.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return o.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (o.lr - o.min_lr)


@torch.no_grad()
def validate(model: torch.nn.Module, val: tuple[Tensor, Tensor | None], mask_id: int, micro: int,
             seed: int, eps: float) -> float:
    """Held-out ELBO (nats per token) with fixed, stratified masks: comparable across runs."""
    ids, response = val
    n, length = ids.shape
    p = diffusion.noise_level(diffusion.draw_t(seed, 0, range(n), n, "stratified"), eps)
    noisy, masked = diffusion.mask_tokens(ids, p, diffusion.draw_uniforms(seed, 0, range(n), length), mask_id, response)
    weights = diffusion.pretrain_weights(ids) if response is None else diffusion.sft_weights(response)
    device = next(model.parameters()).device
    total = 0.0
    for s in range(0, n, micro):
        part = slice(s, s + micro)
        logits = model(noisy[part].to(device))
        total += diffusion.elbo_loss(logits, ids[part].to(device), masked[part].to(device), p[part],
                             weights[part].to(device)).item()
    return total


@torch.no_grad()
def sink_monitor(model: torch.nn.Module, val: tuple[Tensor, Tensor | None], mask_id: int, seed: int) -> list[dict]:
    """Per layer: attention mass on the sink tokens (or the most-attended key in a plain model) and
    the value-vector L2 norm of the sink against the median content token's."""
    ids = val[0][:MONITOR_WINDOWS]
    response = None if val[1] is None else val[1][:MONITOR_WINDOWS]
    uniforms = diffusion.draw_uniforms(seed, 1, range(len(ids)), ids.shape[1])
    noisy, _ = diffusion.mask_tokens(ids, torch.full((len(ids),), MONITOR_T), uniforms, mask_id, response)
    rows: list[dict] = []

    def observe(layer: int, probs: Tensor, keys: Tensor, values: Tensor, n_sink: int) -> None:
        mass = probs.float().mean(dim=(0, 1, 2))  # incoming share per key
        norms = values.float().norm(dim=-1).mean(dim=(0, 1))  # value L2 per key, mean over heads
        top = n_sink + int(mass[n_sink:].argmax())
        key = slice(0, n_sink) if n_sink else slice(top, top + 1)
        rows.append({"layer": layer, "sink_mass": float(mass[key].sum()),
                     "sink_value_norm": float(norms[key].mean()),
                     "median_value_norm": float(norms[n_sink:].median())})

    model(noisy.to(next(model.parameters()).device), observer=observe)
    return rows


# ---------------------------------------------------------------------------------------------
# run folder, resume and checkpoints


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


def resolve_model(cfg: Config, source: Source) -> Config:
    """Fill the vocabulary from the data, and with init_from the architecture from the checkpoint
    (the config's runtime fields stay, see ModelConfig); reject mismatches."""
    if cfg.train.init_from:
        init_model = ckpt.load_config_of(cfg.train.init_from).model
        cfg.model = init_model.with_runtime(**cfg.model.runtime())
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = source.vocab_size
    # imported models may pad their embedding past the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens)
    too_small = cfg.model.vocab_size < source.vocab_size
    if too_small or (not cfg.train.init_from and cfg.model.vocab_size != source.vocab_size):
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
                        f"{source.vocab_size} tokens; re-prepare the data with the model's tokenizer")
    if cfg.train.init_from and source.tokenizer_path:
        check_same_tokenizer(ckpt.resolve(cfg.train.init_from) / ckpt.TOKENIZER, source.tokenizer_path)
    if cfg.seq_len > cfg.model.block_size:
        raise UserError(f"data.seq_len={cfg.seq_len} exceeds model.block_size={cfg.model.block_size}; "
                        f"lower data.seq_len or raise model.block_size")
    return cfg


def check_same_tokenizer(model_tok: Path, data_tok: Path) -> None:
    """Data tokenized with another vocabulary would train the model on foreign ids."""
    from tokenizers import Tokenizer

    if not model_tok.is_file() or model_tok.resolve() == data_tok.resolve():
        return
    if Tokenizer.from_file(str(model_tok)).get_vocab() != Tokenizer.from_file(str(data_tok)).get_vocab():
        raise UserError(f"the data's tokenizer ({data_tok}) differs from train.init_from's ({model_tok}); "
                        f"prepare the data with --tokenizer {model_tok}")


def accumulation(train_cfg: TrainConfig, world: int) -> int:
    per_step = world * train_cfg.micro_batch
    if train_cfg.global_batch % per_step:
        raise UserError(f"train.global_batch={train_cfg.global_batch} is not a multiple of devices x micro_batch "
                        f"= {world} x {train_cfg.micro_batch}; change train.micro_batch")
    return train_cfg.global_batch // per_step


def make_fabric(train_cfg: TrainConfig):
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import ModelParallelStrategy
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    strategy: Any = train_cfg.strategy
    precision = train_cfg.precision
    if strategy == "fsdp":
        strategy = ModelParallelStrategy(functools.partial(parallelize, train_cfg=train_cfg))
        precision = "32-true"  # FSDP2's MixedPrecisionPolicy casts (parallelize.py), not Fabric's autocast
    try:
        return Fabric(accelerator=train_cfg.accelerator, devices=train_cfg.devices, num_nodes=train_cfg.num_nodes,
                      strategy=strategy, precision=precision)
    except (ValueError, RuntimeError, MisconfigurationException) as e:  # e.g. a GPU asked for on a CPU machine
        raise UserError(f"train.accelerator/devices/strategy/precision: {str(e).splitlines()[0]}") from None


def build(cfg: Config, fabric, resume_from: Path | None):
    """The model and its AdamW, set up by Fabric, with the weights to start from."""
    o, fsdp = cfg.optim, cfg.train.strategy == "fsdp"
    torch.manual_seed(cfg.train.seed)
    model = DLM(cfg.model)
    start = resume_from if resume_from and not fsdp else cfg.train.init_from
    if start:  # an FSDP run resumes from its sharded state, after sharding
        ckpt.load_into(model, start)
    if not fsdp:  # FSDP applies them in parallelize, before sharding
        model = apply_block_options(model, cfg.train)
    model = fabric.setup_module(model)
    # only now: FSDP replaces the parameters with sharded ones
    optimizer = fabric.setup_optimizers(torch.optim.AdamW(
        model.parameters(), lr=o.lr, betas=(o.beta1, o.beta2), weight_decay=o.weight_decay, foreach=False))
    return model, optimizer


def restore(fabric, model, optimizer, last: Path, trainer_state: dict[str, Any]) -> None:
    """Optimizer state (and under FSDP the model's) from a checkpoint; FSDP's sharded state is
    resharded to this run's world size."""
    if ckpt.is_sharded(last):
        fabric.load(last / ckpt.SHARDED, {"model": model, "optimizer": optimizer}, weights_only=True)
    else:
        optimizer.load_state_dict(trainer_state["optimizer"])


def full_weights(model: torch.nn.Module) -> dict[str, Tensor]:
    """The whole model's weights on rank 0's CPU under the plain model's names (whatever wraps its
    Blocks); a collective under FSDP: every rank calls it, and the others get {}."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def on_rank_zero(fabric, fn: Callable[[], T]) -> T:
    """fn() on rank 0 and its result on every rank; when it fails, every rank raises (rank 0 its
    own error), rather than the others waiting for rank 0 forever."""
    result, error = None, None
    if fabric.global_rank == 0:
        try:
            result = fn()
        except Exception as e:
            error = e
    shared = error if error is None or isinstance(error, UserError) else RuntimeError(f"rank 0 failed: {error!r}")
    result, shared = fabric.broadcast((result, shared))
    if error is not None:
        raise error
    if shared is not None:
        raise shared
    return result


# ---------------------------------------------------------------------------------------------
# stopping: Ctrl-C and SIGTERM


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


# ---------------------------------------------------------------------------------------------
# the loop


def make_logger(name: str, run: Path):
    """One of config.LOGGERS as a Lightning logger writing into the run folder; a new version per
    (re)start. ModuleNotFoundError when its package is not installed."""
    if name == "csv":
        from lightning.fabric.loggers import CSVLogger

        return CSVLogger(run, name=LOGGER_DIRS[name], flush_logs_every_n_steps=1)
    if name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(run, name=LOGGER_DIRS[name], default_hp_metric=False)
    from lightning.pytorch.loggers import WandbLogger  # Fabric has no W&B logger of its own

    return WandbLogger(save_dir=str(run), name=run.name, project=WANDB_PROJECT)


def make_loggers(names: list[str], run: Path) -> tuple[list[Any], str]:
    """The loggers that could be started, and a line saying which are active and which are missing."""
    loggers, active, missing = [], [f"{METRICS} (canonical)"], []
    for name in names:
        try:
            logger = make_logger(name, run)
        except ModuleNotFoundError:
            missing.append(f"{name} is not installed ({LOGGER_INSTALL[name]})")
            continue
        loggers.append(logger)
        active.append(f"{name} in {logger.log_dir}" if getattr(logger, "log_dir", None) else name)
    return loggers, "logging to " + ", ".join(active) + "".join(f"; {m}" for m in missing)


def logged_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers for the loggers; the sink monitor's rows as sink/layer{i}/{key}."""
    out = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    for row in record.get("sink_monitor", []):
        out.update({f"sink/layer{row['layer']}/{k}": v for k, v in row.items() if k != "layer"})
    return out


def records_to_keep(path: Path, resume_step: int) -> list[str]:
    """metrics.jsonl lines up to the step a run resumes from. A torn last line (a kill during an
    append) is dropped with a warning; a bad line elsewhere is a UserError naming it."""
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = json_object(line)
        if record is None and number < len(lines):
            raise UserError(f"{path}:{number}: not a JSON object; fix or remove that line, then resume")
        if record is None:
            print(f"warning: {path}:{number}: dropped a torn last line (a kill during an append)", file=sys.stderr)
        elif record.get("step", 0) <= resume_step:
            kept.append(line)
    return kept


def json_object(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """metrics.jsonl, plus the train.loggers that are installed (rank 0 only)."""

    def __init__(self, run: Path, resume_step: int, names: list[str], enabled: bool) -> None:
        self.path, self.enabled, self.loggers = run / METRICS, enabled, []
        if not enabled:
            return
        run.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what a crashed run logged past the checkpoint we resume from
            self.path.write_text("".join(line + "\n" for line in records_to_keep(self.path, resume_step)))
        self.loggers, announcement = make_loggers(names, run)
        print(announcement)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = logged_scalars(record)
        for logger in self.loggers:
            logger.log_metrics(scalars, step=record["step"])

    def close(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)


def train(cfg: Config) -> dict[str, Any]:
    """Train per cfg; returns {"checkpoint", "val_loss", "steps", "tokens", "rank"} (rank: this process's).

    The settings, the data and the batch arithmetic are checked before Fabric starts any process;
    then rank 0 locks the run folder (one trainer per folder) and the checkpoints are checked before
    the folder changes; `--overwrite` sets the old run aside and deletes it only once the new run has
    written a checkpoint. Rank 0 reports a UserError or an interruption; other ranks exit quietly.
    """
    rank = int(os.environ.get("RANK", "0") or 0)  # an external launcher's (torchrun), until Fabric's
    started_by_rank_zero = False
    try:
        fabric = make_fabric(cfg.train)
        rank, started_by_rank_zero = fabric.global_rank, starts_the_processes(fabric)
        with StopSignals(cfg.train.checkpoint_on_signal, fabric) as signals:
            return launch_and_train(cfg, fabric, signals)
    except (UserError, KeyboardInterrupt) as e:
        if rank != 0:
            if started_by_rank_zero:
                wait_for_parent_exit(LAUNCHER_EXIT_WAIT_S)
            raise SystemExit(EXIT_BAD_INPUT if isinstance(e, UserError) else EXIT_INTERRUPTED) from None
        if isinstance(e, (UserError, Interrupted)):
            raise
        cause = f"by {e}, " if str(e).startswith("SIG") else ""
        raise Interrupted(f"{cause}before training started") from None


def launch_and_train(cfg: Config, fabric, signals: StopSignals) -> dict[str, Any]:
    check_run_flags(cfg.train)
    source = sft_source(cfg) if cfg.train.objective == "sft" else pretrain_source(cfg)
    cfg = resolve_model(cfg, source)
    accum = accumulation(cfg.train, fabric.world_size)
    lock, before_launch = RunLock(Path(cfg.train.out_dir)), starts_the_processes(fabric)
    try:
        if before_launch and fabric.global_rank == 0:
            lock.acquire()
        fabric.launch()  # only now: every check above fails in the launching process alone
        if not before_launch:
            on_rank_zero(fabric, lock.acquire)  # before anything in the folder changes
        return train_in_run_dir(cfg, fabric, source, accum, signals)
    finally:
        lock.release()


def wait_for_parent_exit(timeout_s: float) -> None:
    """Fabric's launcher SIGKILLs rank 0 as soon as a process it started exits non-zero, maybe before
    rank 0 has said why (or exited with its own code): let it go first, unless it is stuck."""
    parent, deadline = os.getppid(), time.monotonic() + timeout_s
    while os.getppid() == parent and time.monotonic() < deadline:
        time.sleep(PARENT_POLL_S)


def starts_the_processes(fabric) -> bool:
    """Whether global rank 0 is the only process or starts the others (Fabric's own launcher): then it
    locks the run folder before they start. Under torchrun or SLURM every process exists already, and
    rank 0 locks once they have met, so that all stop if it cannot."""
    from lightning.fabric.plugins.environments import LightningEnvironment

    environment = getattr(fabric.strategy, "cluster_environment", None)
    return environment is None or isinstance(environment, LightningEnvironment)


def train_in_run_dir(cfg: Config, fabric, source: Source, accum: int, signals: StopSignals) -> dict[str, Any]:
    run = Path(cfg.train.out_dir)
    if fabric.global_rank == 0:
        settle_previous_run(run)
    fabric.barrier()
    resume_from = claim_run_dir(cfg, source)
    state, loop = {"step": 0, "tokens": 0}, None
    try:
        if resume_from:
            trainer_state = ckpt.load_trainer_state(resume_from)
            state = {"step": trainer_state["step"], "tokens": trainer_state["tokens"]}
            finished = finished_result(cfg, resume_from, **state)
            if finished:
                fabric.print(f"{run} already finished at {resume_from.name}; nothing to do "
                             f"(raise train.max_steps to train further)")
                return {**finished, "rank": fabric.global_rank}
        model, optimizer = build(cfg, fabric, resume_from)
        if resume_from:
            restore(fabric, model, optimizer, resume_from, trainer_state)
            fabric.print(f"resuming {run} from {resume_from.name}")
        if fabric.global_rank == 0 and cfg.train.overwrite and not resume_from and run_files(run):
            set_aside_run(run)
        fabric.barrier()
        loop = Loop(cfg, fabric, model, optimizer, source, accum, state, resume_from, signals)
        return loop.run()
    except KeyboardInterrupt as e:
        step = loop.state["step"] if loop else state["step"]
        wrote = loop is not None and loop.saved_step is not None
        raise Interrupted(stopped_message(cfg, step, wrote, str(e))) from None
    finally:
        if fabric.global_rank == 0:
            settle_previous_run(run)


class Loop:
    def __init__(self, cfg: Config, fabric, model, optimizer, source: Source, accum: int,
                 state: dict[str, int], resume_from: Path | None, signals: StopSignals) -> None:
        self.cfg, self.fabric, self.model, self.optimizer = cfg, fabric, model, optimizer
        self.source, self.accum, self.state, self.signals = source, accum, state, signals
        self.steps = cfg.steps()
        self.run_dir = Path(cfg.train.out_dir)
        self.log = MetricsLog(self.run_dir, state["step"], cfg.train.loggers, fabric.global_rank == 0)
        self.last_checkpoint = resume_from
        self.saved_step: int | None = None  # the last checkpoint this run wrote
        self.val_loss = float("nan")
        if fabric.global_rank == 0:
            n = count_params(model.module)
            gate = f" (+ {n['gate'] / 1e6:.2f}M gate)" if n["gate"] else ""  # SMDM's N leaves gates out
            fabric.print(f"model {cfg.model.name}: {n['non_embedding'] / 1e6:.2f}M non-embedding{gate}, "
                         f"{n['total'] / 1e6:.2f}M total parameters; {self.steps} steps x "
                         f"{cfg.train.global_batch} x {cfg.seq_len} tokens; accumulation {accum}")

    def micro_indices(self, micro: int) -> list[int]:
        train_cfg, f = self.cfg.train, self.fabric
        start = (micro * f.world_size + f.global_rank) * train_cfg.micro_batch
        return list(range(start, start + train_cfg.micro_batch))

    def train_step(self, step: int) -> float:
        cfg, train_cfg = self.cfg, self.cfg.train
        length = diffusion.truncated_length(train_cfg.seed, step, cfg.seq_len, train_cfg.random_length_prob)
        total = torch.zeros((), device=self.fabric.device)
        attention = None
        if step < train_cfg.mask_anneal_steps:
            opened = step / train_cfg.mask_anneal_steps
            attention = diffusion.annealed_mask(train_cfg.seed, step, length, opened).to(self.fabric.device)
        for micro in range(self.accum):
            indices = self.micro_indices(micro)
            ids, response = self.source.batch(step, indices)
            ids = ids[:, :length].to(self.fabric.device)
            response = None if response is None else response[:, :length].to(self.fabric.device)
            with self.fabric.no_backward_sync(self.model, enabled=micro < self.accum - 1):
                loss = diffusion_loss(self.model, cfg, ids, response, step, indices, attention) / self.accum
                self.fabric.backward(loss)
            total += loss.detach()
        loss_value = float(self.fabric.all_reduce(total, reduce_op="mean"))
        if not math.isfinite(loss_value):
            where = self.last_checkpoint or "none was written yet"
            raise UserError(f"loss is {loss_value} at step {step}; stopped before updating the weights; "
                            f"last good checkpoint: {where}; lower optim.lr or check the data")
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(step, self.steps, cfg.optim)
        if cfg.optim.grad_clip > 0:
            self.fabric.clip_gradients(self.model, self.optimizer, max_norm=cfg.optim.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_value

    def run(self) -> dict[str, Any]:
        try:
            result = self.train_all()
        except BaseException:
            self.log.close("failed")
            raise
        self.log.close("success")
        return result

    def train_all(self) -> dict[str, Any]:
        from tqdm.auto import tqdm

        train_cfg = self.cfg.train
        tokens_per_step = train_cfg.global_batch * self.cfg.seq_len
        bar = tqdm(total=self.steps, initial=self.state["step"], unit="step", dynamic_ncols=True,
                   disable=not (train_cfg.progress and self.fabric.global_rank == 0))
        while self.state["step"] < self.steps:
            step, started = self.state["step"], time.perf_counter()
            loss = self.train_step(step)
            elapsed = time.perf_counter() - started
            self.state = {"step": step + 1, "tokens": self.state["tokens"] + tokens_per_step}
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_step / elapsed:,.0f}")
            self.periodic(step + 1, loss, tokens_per_step / elapsed)
            if self.stop_requested():
                self.stop_at_signal(step + 1)
        bar.close()  # periodic() validated and saved the last step
        return {"checkpoint": self.last_checkpoint, "val_loss": self.val_loss, "steps": self.steps,
                "tokens": self.state["tokens"], "rank": self.fabric.global_rank}

    def periodic(self, step: int, loss: float, tokens_per_s: float) -> None:
        train_cfg = self.cfg.train
        if step % train_cfg.log_every == 0 or step == 1:
            self.log.write({"step": step, "loss": loss, "lr": self.optimizer.param_groups[0]["lr"],
                            "tokens": self.state["tokens"], "tokens_per_s": tokens_per_s})
        if train_cfg.sink_monitor_every and step % train_cfg.sink_monitor_every == 0:
            rows = sink_monitor(self.model, self.source.val, self.cfg.model.mask_id, self.cfg.data.val_seed)
            self.log.write({"step": step, "sink_monitor": rows})
        if step % train_cfg.val_every == 0 or step == self.steps:
            self.validation(step)
        if step % train_cfg.save_every == 0 or step == self.steps:
            self.save(step)

    def stop_requested(self) -> bool:
        """With train.checkpoint_on_signal, whether any rank received a stop signal (all ranks agree)."""
        if not self.cfg.train.checkpoint_on_signal:
            return False
        received = torch.tensor(float(self.signals.received is not None), device=self.fabric.device)
        return float(self.fabric.all_reduce(received, reduce_op="sum")) > 0

    def stop_at_signal(self, step: int) -> None:
        """A checkpoint at this step boundary (unless periodic() just wrote it), then stop; it is not
        validated, so a resumed run logs exactly what an uninterrupted one does."""
        if self.saved_step != step:
            self.val_loss = float("nan")
            self.save(step)
        raise KeyboardInterrupt(self.signals.received or "a stop signal on another rank")

    def validation(self, step: int) -> None:
        self.model.eval()
        self.val_loss = validate(self.model, self.source.val, self.cfg.model.mask_id,
                                 self.cfg.train.micro_batch, self.cfg.data.val_seed, self.cfg.train.eps)
        self.model.train()
        self.log.write({"step": step, "val_loss": self.val_loss})
        if self.fabric.global_rank == 0:  # through tqdm, so the line is not glued onto the progress bar
            from tqdm.auto import tqdm

            tqdm.write(f"step {step}: validation ELBO {self.val_loss:.4f} nats/token")

    def save(self, step: int) -> None:
        """Every rank takes part (FSDP writes its shards and gathers the whole model collectively);
        rank 0 writes the rest and renames the folder into place."""
        run, train_cfg = self.run_dir, self.cfg.train
        tmp = on_rank_zero(self.fabric, lambda: ckpt.start_checkpoint(run, step))
        trainer_state: dict[str, Any] = {"step": step, "tokens": self.state["tokens"]}
        if train_cfg.strategy == "fsdp":
            self.save_shards(tmp)
        else:
            trainer_state["optimizer"] = self.optimizer.state_dict()
        weights = full_weights(self.model.module)
        meta = {"tokens": self.state["tokens"], "eos_id": self.source.eos_id, "val_loss": self.val_loss,
                "objective": train_cfg.objective, "data": self.source.identity}

        def finish() -> Path:
            final = ckpt.finish_checkpoint(tmp, weights, self.cfg, meta, self.source.tokenizer_path,
                                           trainer_state, train_cfg.keep_last)
            settle_previous_run(run)  # the new run has a checkpoint: an overwritten one goes
            return final

        self.last_checkpoint = on_rank_zero(self.fabric, finish)
        self.saved_step = step

    def save_shards(self, tmp: Path) -> None:
        """FSDP's sharded state, every rank its shard; a full disk fails on every rank alike."""
        from torch.distributed.checkpoint.api import CheckpointException

        try:
            self.fabric.save(tmp / ckpt.SHARDED, {"model": self.model, "optimizer": self.optimizer})
        except (OSError, RuntimeError, CheckpointException) as e:
            full = ckpt.disk_full_error(tmp, e)
            if full is None:
                raise
            raise full from None
