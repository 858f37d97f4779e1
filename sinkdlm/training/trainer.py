"""One Lightning Fabric trainer for pretraining, SFT and adaptation; they differ only by config.

Every random choice (which windows, which t, which tokens are masked) is a pure function of
(seed, step, global sample index), so resuming is exact and the global batch is the same samples
whatever the world size: micro-batch and accumulation follow from the real number of devices.
Its parts: batches.py (the data), objective.py (loss, schedule, validation), run_folder.py (lock,
resume checks, --overwrite), stopping.py (signals), loggers.py (metrics.jsonl and loggers).
"""

from __future__ import annotations

import functools
import math
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import torch
from torch import Tensor

from sinkdlm import checkpoint as ckpt
from sinkdlm import diffusion
from sinkdlm.config import Config, TrainConfig
from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from sinkdlm.model import DLM, count_params
from sinkdlm.training.batches import Source, pretrain_source, resolve_model, sft_source
from sinkdlm.training.loggers import MetricsLog
from sinkdlm.training.objective import copy_task_metrics, diffusion_loss, lr_at, sink_monitor, validate
from sinkdlm.training.parallelize import apply_block_options, parallelize
from sinkdlm.training.run_folder import (
    RunLock,
    check_run_flags,
    claim_run_dir,
    finished_result,
    run_files,
    set_aside_run,
    settle_previous_run,
)
from sinkdlm.training.stopping import EXIT_INTERRUPTED, Interrupted, StopSignals, stopped_message

LAUNCHER_EXIT_WAIT_S = 10.0  # how long a process Fabric started lets rank 0 exit first (see train)
PARENT_POLL_S = 0.1
T = TypeVar("T")


# ---------------------------------------------------------------------------------------------
# Fabric: devices, the model and its optimizer, collectives


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
# a run: checks, launch, the loop


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
        # the tokenizer is init_from's, and so is its chat template (an adapted or fine-tuned instruct model)
        self.chat = ckpt.chat_settings(cfg.train.init_from) if cfg.train.init_from else {}
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
        task = self.source.identity.get("task") if self.source.val[1] is None else None
        probes = copy_task_metrics(self.model, self.source.val[0], task, self.cfg.model.mask_id,
                                   self.cfg.data.val_seed) if task else {}
        self.model.train()
        self.log.write({"step": step, "val_loss": self.val_loss, **probes})
        if self.fabric.global_rank == 0:  # through tqdm, so the line is not glued onto the progress bar
            from tqdm.auto import tqdm

            copy = "".join(f", copy accuracy {a:.3f} at mask level {lv}" for lv, a in
                           probes.get("copy_accuracy", {}).items() if a is not None)
            tqdm.write(f"step {step}: validation ELBO {self.val_loss:.4f} nats/token{copy}")

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
                "objective": train_cfg.objective, "data": self.source.identity, **self.chat}

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
