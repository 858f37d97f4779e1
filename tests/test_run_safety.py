"""One trainer per run folder, contradictory flags, a full disk, and stopping (Ctrl-C, SIGTERM):
one-line messages printed once (rank 0), the run folder intact, and the way to continue named."""

import errno
import json
import os
import shlex
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkdlm import checkpoint as ckpt
from sinkdlm.cli import main
from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from sinkdlm.training import run_folder, trainer
from sinkdlm.training.trainer import train
from tests.conftest import tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
STOP_AT = 4  # the step after which the drivers below stop: between the checkpoints at 3 and 6


def config(data, out, steps=3, **train_):
    return tiny_train_config(data, out, steps=steps, loggers=[], **train_)


def cli_args(data: Path, out: Path, *overrides: str, devices: int = 1, strategy: str = "auto") -> list[str]:
    """`sinkdlm train` on the tiny model, 6 steps x global batch 4, checkpoints at steps 3 and 6."""
    return ["train", "--model", "tiny", "--data", str(data), "--out", str(out), "model.sink_tokens=1",
            "data.seq_len=32", "data.val_windows=4", "train.global_batch=4", "train.micro_batch=2",
            "train.max_steps=6", "train.log_every=1", "train.val_every=3", "train.save_every=3",
            "train.sink_monitor_every=3", "train.progress=false", "train.loggers=[]", "train.accelerator=cpu",
            f"train.devices={devices}", f"train.strategy={strategy}", "optim.warmup_min_steps=2", *overrides]


def start(script: Path | None, args: list[str], **popen) -> subprocess.Popen:
    entry = [str(script)] if script else ["-m", "sinkdlm"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, *entry, *args], text=True, env=env, cwd=ROOT, **popen)


def run_cli(args: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    proc = start(script, args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    out, err = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if ": error:" in line]


def records(run: Path) -> list[dict]:
    """metrics.jsonl without the timings (tokens_per_s), which no two runs share."""
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in record.items() if k != "tokens_per_s"} for record in lines]


def names(run: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(run)]


def same_weights(a: Path, b: Path) -> bool:
    wa, wb = ckpt.load_weights(a), ckpt.load_weights(b)
    return wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


# ---------------------------------------------------------------------------------------------
# one trainer per run folder

PAUSING_DRIVER = """
import sys
from sinkdlm.training import trainer
from sinkdlm.cli import main

periodic = trainer.Loop.periodic

def periodic_then_pause(self, step, *args):
    periodic(self, step, *args)
    if step == 3:  # step-00000003 is written: a second trainer would find a run to resume
        print("paused", flush=True)
        sys.stdin.readline()

trainer.Loop.periodic = periodic_then_pause
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_a_second_trainer_is_refused_while_the_first_runs(tiny_data, tmp_path):
    """The issue's case: `--resume` into a folder whose trainer still runs. Refused in one line naming
    the holder's pid, by one process and by two (printed once); once the holder is killed, no stale
    lock is left and the run resumes."""
    script, run = tmp_path / "pausing.py", tmp_path / "run"
    script.write_text(PAUSING_DRIVER)
    first = start(script, cli_args(tiny_data, run), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                  stderr=subprocess.DEVNULL)
    try:
        assert any(line.strip() == "paused" for line in first.stdout), "the first trainer never paused"
        log = (run / "metrics.jsonl").read_text()
        with pytest.raises(UserError, match=rf"{run} is in use by another trainer \(pid {first.pid} on "):
            train(config(tiny_data, run, steps=9, resume=True))
        two = run_cli(cli_args(tiny_data, run, "train.max_steps=9", "--resume", devices=2, strategy="ddp"))
        assert two.returncode == EXIT_BAD_INPUT, two.stderr[-2000:]
        assert len(error_lines(two.stderr)) == 1 and f"(pid {first.pid} on " in two.stderr, two.stderr[-2000:]
        assert "Traceback" not in two.stderr
        assert (run / "metrics.jsonl").read_text() == log and names(run) == ["step-00000003"]
    finally:
        first.kill()
        first.wait()
    result = train(config(tiny_data, run, steps=6, resume=True))  # the kernel released the lock
    assert Path(result["checkpoint"]).name == "step-00000006"


def test_the_lock_is_released_when_training_ends(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    with pytest.raises(UserError, match="already holds a run"):  # refused after the lock was taken...
        train(config(tiny_data, run))
    train(config(tiny_data, run, steps=6, resume=True))  # ...and released again
    assert not (run / run_folder.LOCK_FILE).exists()  # removed when training ends


# ---------------------------------------------------------------------------------------------
# contradictory flags, a run folder that is a file


def test_resume_and_overwrite_together_are_refused(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    before = sorted(p.name for p in run.rglob("*"))
    assert main([*cli_args(tiny_data, run), "--resume", "--overwrite"]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and "--resume continues the run" in err and "pass only one" in err
    assert sorted(p.name for p in run.rglob("*")) == before


@pytest.mark.parametrize("out", ["file", "file/run"])
def test_an_out_folder_that_is_a_file_is_one_line(tiny_data, tmp_path, capsys, out):
    (tmp_path / "file").write_text("keep me")
    assert main(cli_args(tiny_data, tmp_path / out)) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip()
    assert err.splitlines() == [err] and f"{tmp_path / 'file'} is a file, not a folder" in err
    assert (tmp_path / "file").read_text() == "keep me"


# ---------------------------------------------------------------------------------------------
# a full disk while writing a checkpoint


@pytest.mark.parametrize("writer, error", [
    ("save_file", OSError(errno.ENOSPC, "No space left on device")),
    ("torch.save", RuntimeError("[enforce fail at inline_container.cc:626] . unexpected pos 320 vs 0; "
                                "basic_ios::clear: iostream error")),
])
def test_a_full_disk_during_a_checkpoint_is_one_line_and_resume_is_exact(tiny_data, tmp_path, monkeypatch,
                                                                         writer, error):
    straight = train(config(tiny_data, tmp_path / "straight", steps=6))
    run = tmp_path / "run"
    train(config(tiny_data, run))

    def full(*args, **kwargs):
        raise error

    target = (ckpt.torch, "save") if writer == "torch.save" else (ckpt, "save_file")
    monkeypatch.setattr(*target, full)
    with pytest.raises(UserError, match=rf"the disk holding {run} is full \(.* MiB free\) while writing "
                                        r"checkpoint step-00000006; its partial folder is removed and the last "
                                        r"complete checkpoint is step-00000003; free space, then continue "
                                        r"with --resume"):
        train(config(tiny_data, run, steps=6, resume=True))
    monkeypatch.undo()
    assert names(run) == ["step-00000003"] and not list(run.glob(f"{ckpt.TMP_PREFIX}*"))
    resumed = train(config(tiny_data, run, steps=6, resume=True))
    assert same_weights(straight["checkpoint"], resumed["checkpoint"])
    assert resumed["val_loss"] == straight["val_loss"]


def test_a_full_disk_is_recognised_through_sharded_saves_and_chained_errors():
    from torch.distributed.checkpoint.api import CheckpointException, _wrap_exception

    try:
        raise OSError(errno.ENOSPC, "No space left on device")
    except OSError as e:
        sharded = CheckpointException("save", {1: _wrap_exception(e)})  # what FSDP's save raises
    chained = RuntimeError("writing failed")
    chained.__cause__ = OSError(errno.EDQUOT, "Disk quota exceeded")
    assert ckpt.is_disk_full(sharded) and ckpt.is_disk_full(chained)
    assert not ckpt.is_disk_full(OSError(errno.EIO, "Input/output error"))


def test_another_write_error_is_not_called_a_full_disk(tiny_data, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(ckpt, "save_file", broken)
    with pytest.raises(OSError, match="Input/output error"):
        train(config(tiny_data, tmp_path / "run"))


# ---------------------------------------------------------------------------------------------
# stopping: Ctrl-C and SIGTERM

SIGNALLING_DRIVER = f"""
import os, signal, sys
from sinkdlm.training import trainer
from sinkdlm.cli import main

periodic = trainer.Loop.periodic

def periodic_then_signal(self, step, *args):
    periodic(self, step, *args)
    if step == {STOP_AT}:
        os.kill(os.getpid(), signal.SIG{{}})

trainer.Loop.periodic = periodic_then_signal
sys.exit(main(sys.argv[1:]))
"""


def signalling(tmp_path: Path, name: str) -> Path:
    script = tmp_path / f"send_{name}.py"
    script.write_text(SIGNALLING_DRIVER.replace("SIG{}", f"SIG{name}"))
    return script


def continue_command(stderr: str) -> list[str]:
    """The command the interruption message says continues the run, as `main` arguments."""
    line = stderr.strip().splitlines()[-1]
    words = shlex.split(line.split("continue with: ", 1)[1])
    assert words[0] == "sinkdlm" and words[-1] == "--resume"
    return words[1:]


@pytest.fixture(scope="module")
def straight(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted run the stopped ones are compared with."""
    run = tmp_path_factory.mktemp("straight") / "run"
    assert main(cli_args(tiny_data, run)) == 0
    return run


@pytest.mark.slow
def test_sigterm_stops_with_a_message_naming_resume_and_the_last_checkpoint(tiny_data, tmp_path, straight):
    run = tmp_path / "run"
    done = run_cli(cli_args(tiny_data, run), signalling(tmp_path, "TERM"))
    assert done.returncode == 130, done.stderr[-2000:]
    assert done.stderr.strip().splitlines()[-1].startswith(
        f"sinkdlm train: interrupted by SIGTERM at step {STOP_AT}; the last complete checkpoint is "
        f"{run / 'step-00000003'}; continue with: sinkdlm train ")
    assert "Traceback" not in done.stderr and names(run) == ["step-00000003"]
    assert main(continue_command(done.stderr)) == 0  # the exact command given continues the run
    assert records(run) == records(straight)
    assert same_weights(ckpt.resolve(run), ckpt.resolve(straight))


@pytest.mark.slow
def test_sigterm_with_checkpoint_on_signal_checkpoints_where_it_stopped(tiny_data, tmp_path, straight):
    run = tmp_path / "run"
    done = run_cli(cli_args(tiny_data, run, "train.checkpoint_on_signal=true"), signalling(tmp_path, "TERM"))
    assert done.returncode == 130, done.stderr[-2000:]
    assert f"interrupted by SIGTERM at step {STOP_AT}; the last complete checkpoint is " \
           f"{run / 'step-00000004'}" in done.stderr
    assert names(run) == ["step-00000003", "step-00000004"]
    assert [r["step"] for r in records(run)][-1] == STOP_AT
    assert main(continue_command(done.stderr)) == 0
    assert records(run) == records(straight)  # the signal's checkpoint logs nothing of its own
    assert same_weights(ckpt.resolve(run), ckpt.resolve(straight))


RANK_ZERO_SIGNALLING_DRIVER = SIGNALLING_DRIVER.replace("if step ==", "if self.fabric.global_rank == 0 and step ==")


@pytest.mark.slow
def test_sigterm_to_the_launching_process_stops_both_ranks_at_one_checkpoint(tiny_data, tmp_path, straight):
    """Kubernetes signals only the container's first process: the ranks agree to stop at the same step
    boundary (rank 0 also passes SIGTERM on), both write its checkpoint, and the message is printed once."""
    script, run = tmp_path / "rank0_term.py", tmp_path / "run"
    script.write_text(RANK_ZERO_SIGNALLING_DRIVER.replace("SIG{}", "SIGTERM"))
    done = run_cli(cli_args(tiny_data, run, "train.checkpoint_on_signal=true", devices=2, strategy="ddp"), script)
    assert done.returncode == 130, done.stderr[-2000:]
    interrupted = [line for line in done.stderr.splitlines() if ": interrupted" in line]
    assert len(interrupted) == 1 and f"by SIGTERM at step {STOP_AT}" in interrupted[0], done.stderr[-2000:]
    assert names(run) == ["step-00000003", "step-00000004"]
    # continued by 1 process (2 would re-run pytest): the same samples, the float order aside
    assert main([*continue_command(done.stderr), "train.devices=1", "train.strategy=auto"]) == 0
    for key in ("loss", "val_loss"):
        got, want = ([r[key] for r in records(x) if key in r] for x in (run, straight))
        assert got == pytest.approx(want, rel=1e-5)


def send_at_stop_step(monkeypatch, *signums: int) -> None:
    periodic = trainer.Loop.periodic

    def periodic_then_signal(self, step, *args):
        periodic(self, step, *args)
        if step == STOP_AT:
            for signum in signums:
                os.kill(os.getpid(), signum)

    monkeypatch.setattr(trainer.Loop, "periodic", periodic_then_signal)


def test_ctrl_c_names_the_run_the_last_checkpoint_and_the_resume_command(tiny_data, tmp_path, monkeypatch,
                                                                         capsys):
    run = tmp_path / "run"
    args = cli_args(tiny_data, run)
    monkeypatch.setattr(sys, "argv", ["sinkdlm", *args])
    send_at_stop_step(monkeypatch, signal.SIGINT)
    assert main(args) == 130
    err = capsys.readouterr().err.strip()
    assert err == (f"sinkdlm train: interrupted by SIGINT at step {STOP_AT}; the last complete checkpoint is "
                   f"{run / 'step-00000003'}; continue with: {shlex.join(['sinkdlm', *args, '--resume'])}")
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # put back after training


def test_ctrl_c_twice_with_checkpoint_on_signal_stops_at_once(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    send_at_stop_step(monkeypatch, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=f"by SIGINT at step {STOP_AT}; .*step-00000004"):
        train(config(tiny_data, run, steps=6, checkpoint_on_signal=True))
    assert names(run) == ["step-00000003", "step-00000004"]
    send_at_stop_step(monkeypatch, signal.SIGINT, signal.SIGINT)
    with pytest.raises(KeyboardInterrupt, match=f"by SIGINT at step {STOP_AT}; .*step-00000003"):
        train(config(tiny_data, tmp_path / "twice", steps=6, checkpoint_on_signal=True))
    assert names(tmp_path / "twice") == ["step-00000003"]


def test_an_overwrite_stopped_before_its_first_checkpoint_says_the_old_run_is_kept(tiny_data, tmp_path,
                                                                                   monkeypatch):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    before = records(run)
    send_at_stop_step(monkeypatch, signal.SIGINT)
    monkeypatch.setattr(trainer.Loop, "save", lambda self, step: None)  # no checkpoint before the signal
    with pytest.raises(KeyboardInterrupt, match=f"the run in {run} it was to replace is kept; rerun the same"):
        train(config(tiny_data, run, steps=6, overwrite=True, seed=7))
    assert records(run) == before and names(run) == ["step-00000003"]


# ---------------------------------------------------------------------------------------------
# settings checked before any process starts; errors printed once


@pytest.mark.slow
def test_a_batch_that_devices_do_not_divide_is_refused_before_launching(tiny_data, tmp_path):
    done = run_cli(cli_args(tiny_data, tmp_path / "run", "train.micro_batch=4", devices=2, strategy="ddp"))
    assert done.returncode == EXIT_BAD_INPUT
    assert error_lines(done.stderr) == [done.stderr.strip()], done.stderr[-2000:]
    assert "train.global_batch=4 is not a multiple of devices x micro_batch = 2 x 4" in done.stderr
    assert "Initializing distributed" not in done.stdout + done.stderr  # no process was started
    assert not (tmp_path / "run").exists()


def test_under_torchrun_only_rank_zero_prints_an_error(tiny_data, tmp_path, monkeypatch, capsys):
    """torchrun starts every process itself: each finds the mistake, rank 1 exits quietly with code 2."""
    env = {"TORCHELASTIC_RUN_ID": "test", "RANK": "1", "LOCAL_RANK": "1", "GROUP_RANK": "0", "WORLD_SIZE": "2",
           "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29555"}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = cli_args(tiny_data, tmp_path / "run", "train.micro_batch=4", devices=2, strategy="ddp")
    with pytest.raises(SystemExit) as exited:
        main(args)
    assert exited.value.code == EXIT_BAD_INPUT and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("LOCAL_RANK", "0")
    assert main(args) == EXIT_BAD_INPUT
    assert "is not a multiple of devices x micro_batch = 2 x 4" in capsys.readouterr().err
