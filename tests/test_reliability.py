"""Bad checkpoints, budgets, interrupted writes and changed data: one-line refusals, nothing lost."""

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkdlm import checkpoint as ckpt
from sinkdlm.cli import main
from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from sinkdlm.training.trainer import train
from tests.conftest import tiny_train_config


def config(data, out, steps=3, **train_):
    return tiny_train_config(data, out, steps=steps, loggers=[], **train_)


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def edit_weights(folder: Path, change) -> None:
    path = folder / ckpt.WEIGHTS
    weights = load_file(str(path))
    change(weights)
    save_file(weights, str(path))


# ---------------------------------------------------------------------------------------------
# weights that do not match their config


@pytest.mark.parametrize("change, names", [
    (lambda w: w.update(sink=torch.zeros(3, 32)), r"has sink of shape \(3, 32\) where the config needs \(1, 32\)"),
    (lambda w: w.pop("sink"), "lacks sink"),
])
def test_mismatched_weights_are_one_line_exit_2(tiny_data, tmp_path, capsys, change, names):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    last = ckpt.list_checkpoints(run)[-1]
    edit_weights(last, change)
    with pytest.raises(UserError, match=f"step-00000003/model.safetensors {names}"):
        ckpt.load_model(run)
    with pytest.raises(UserError, match=names):
        train(config(tiny_data, run, steps=6, resume=True))
    assert main(["generate", "--checkpoint", str(run), "--prompt", "the", "--gen-length", "4", "--steps", "4"]) \
        == EXIT_BAD_INPUT
    assert "model.safetensors" in one_line_error(capsys)


def test_load_model_never_builds_a_random_model_beside_the_weights(tiny_data, tmp_path, monkeypatch):
    """The model is built on the meta device and takes the loaded tensors (an 8B import is held once,
    in the dtype asked for), and gives the weights exactly."""
    run = tmp_path / "run"
    train(config(tiny_data, run))
    initialised, normal = [], torch.nn.init.normal_

    def recording_normal(*args, **kwargs):
        initialised.append((args[0] if args else kwargs["tensor"]).device.type)
        return normal(*args, **kwargs)

    monkeypatch.setattr(torch.nn.init, "normal_", recording_normal)
    model, _ = ckpt.load_model(run)
    assert initialised and set(initialised) == {"meta"}
    stored = ckpt.load_weights(run)
    assert all(torch.equal(stored[name], tensor) for name, tensor in model.state_dict().items())
    half, _ = ckpt.load_model(run, dtype=torch.bfloat16)
    assert {p.dtype for p in half.parameters()} == {torch.bfloat16}
    assert all(torch.equal(stored[name].to(torch.bfloat16), t) for name, t in half.state_dict().items())


def test_init_from_with_mismatched_weights_is_refused(tiny_data, tmp_path):
    first = train(config(tiny_data, tmp_path / "a", steps=1))["checkpoint"]
    edit_weights(first, lambda w: w.pop("lm_head.weight"))
    with pytest.raises(UserError, match="lacks lm_head.weight"):
        train(config(tiny_data, tmp_path / "b", steps=1, init_from=str(first)))


def test_trainer_state_needing_pickle_code_is_refused_without_advising_it(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    torch.save({"step": 3, "payload": Path("x")}, ckpt.list_checkpoints(run)[-1] / ckpt.STATE)
    with pytest.raises(UserError) as caught:
        ckpt.load_trainer_state(run)
    message = str(caught.value)
    assert "pathlib" in message and "code execution" in message and "\n" not in message
    assert "weights_only" not in message and "likely succeed" not in message


# ---------------------------------------------------------------------------------------------
# budgets


@pytest.mark.parametrize("flops", ["0", "-1", "nan"])
def test_a_nonpositive_flops_budget_is_refused(tmp_path, capsys, flops):
    assert main(["train", "--model", "tiny", "--flops", flops, "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert "--flops" in one_line_error(capsys)


@pytest.mark.parametrize("value", ["-1", ".inf"])
def test_a_negative_flops_field_is_refused(tmp_path, capsys, value):
    assert main(["train", "--model", "tiny", f"train.flops={value}", "--out", str(tmp_path / "r")]) == EXIT_BAD_INPUT
    assert "train.flops" in one_line_error(capsys)


# ---------------------------------------------------------------------------------------------
# --overwrite never loses the old run to a mistake


def test_overwrite_with_a_bad_config_keeps_the_old_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    before = sorted(p.name for p in run.iterdir())
    weights = (run / "step-00000003" / ckpt.WEIGHTS).read_bytes()
    with pytest.raises(UserError, match="global_batch=6 is not a multiple"):
        train(config(tiny_data, run, overwrite=True, global_batch=6, micro_batch=4))
    assert sorted(p.name for p in run.iterdir()) == before
    assert (run / "step-00000003" / ckpt.WEIGHTS).read_bytes() == weights


def test_overwrite_that_fails_before_its_first_checkpoint_restores_the_old_run(tiny_data, tmp_path, monkeypatch):
    import sinkdlm.training.trainer as trainer

    run = tmp_path / "run"
    train(config(tiny_data, run))
    before = (run / "metrics.jsonl").read_text()
    real = trainer.Loop.train_step

    def fail_at_step_1(self, step):
        if step == 1:
            raise RuntimeError("out of memory")
        return real(self, step)

    monkeypatch.setattr(trainer.Loop, "train_step", fail_at_step_1)
    with pytest.raises(RuntimeError, match="out of memory"):
        train(config(tiny_data, run, overwrite=True, seed=7))
    assert (run / "metrics.jsonl").read_text() == before
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000003"]
    assert not (run / ".previous-run").exists()


def test_overwrite_killed_before_its_first_checkpoint_is_undone_at_the_next_start(tiny_data, tmp_path):
    from sinkdlm.training.run_folder import set_aside_run

    run = tmp_path / "run"
    train(config(tiny_data, run))
    set_aside_run(run)  # what --overwrite did before the kill
    (run / "metrics.jsonl").write_text('{"step": 1, "loss": 9.0}\n')  # the killed run's log
    result = train(config(tiny_data, run, resume=True))  # already finished: a no-op
    assert Path(result["checkpoint"]).name == "step-00000003"
    assert not (run / ".previous-run").exists()
    assert '"val_loss"' in (run / "metrics.jsonl").read_text()  # the old run's log is back


def test_a_successful_overwrite_replaces_the_old_run(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_data, run, steps=6))
    (run / "notes.txt").write_text("mine")
    train(config(tiny_data, run, steps=3, overwrite=True, seed=7))
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000003"]
    assert ckpt.load_config_of(run).train.seed == 7
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl", "notes.txt", "step-00000003"]


# ---------------------------------------------------------------------------------------------
# --resume: same data, torn logs, finished runs


@pytest.fixture
def other_data(tiny_data, tmp_path):
    """A copy of tiny_data, to be edited by a test."""
    return Path(shutil.copytree(tiny_data, tmp_path / "other"))


def test_resume_refuses_another_tokenizer_of_the_same_size(tiny_data, other_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    tok = json.loads((other_data / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = sorted(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]  # same size, two ids mean other strings
    (other_data / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(UserError, match="tokenizer .* is not the one the run trained with"):
        train(config(other_data, run, steps=6, resume=True))


def test_resume_refuses_another_corpus_and_seq_len(tiny_data, other_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    meta = json.loads((other_data / "meta.json").read_text())
    (other_data / "meta.json").write_text(json.dumps({**meta, "source": "another corpus"}))
    with pytest.raises(UserError, match=r"training data changed \(meta differs in \['source'\]\)"):
        train(config(other_data, run, steps=6, resume=True))
    cfg = config(tiny_data, run, steps=6, resume=True)
    cfg.data.seq_len = 16
    with pytest.raises(UserError, match="data.seq_len is 16 but the run trained with 32"):
        train(cfg)
    moved = Path(shutil.copytree(tiny_data, tmp_path / "moved"))  # the same data elsewhere is fine
    assert Path(train(config(moved, run, steps=6, resume=True))["checkpoint"]).name == "step-00000006"


def test_resume_drops_a_torn_last_metrics_line(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    with (run / "metrics.jsonl").open("a") as f:
        f.write('{"step": 4, "loss": 5.1, "l')  # killed mid-append
    train(config(tiny_data, run, steps=6, resume=True))
    assert "dropped a torn last line" in capsys.readouterr().err
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(steps) and steps[-1] == 6


def test_a_bad_metrics_line_inside_the_log_is_named(tiny_data, tmp_path):
    run = tmp_path / "run"
    train(config(tiny_data, run))
    lines = (run / "metrics.jsonl").read_text().splitlines()
    (run / "metrics.jsonl").write_text("\n".join([lines[0], "{oops", *lines[1:]]) + "\n")
    with pytest.raises(UserError, match=r"metrics.jsonl:2: not a JSON object"):
        train(config(tiny_data, run, steps=6, resume=True))


def test_resuming_a_finished_run_is_a_no_op(tiny_data, tmp_path, capsys):
    run = tmp_path / "run"
    first = train(config(tiny_data, run))
    final = Path(first["checkpoint"]) / ckpt.WEIGHTS
    stamp = os.stat(final)
    log = (run / "metrics.jsonl").read_text()
    again = train(config(tiny_data, run, resume=True))
    assert "already finished" in capsys.readouterr().out
    assert again["checkpoint"] == first["checkpoint"] and again["val_loss"] == first["val_loss"]
    assert (os.stat(final).st_ino, os.stat(final).st_mtime_ns) == (stamp.st_ino, stamp.st_mtime_ns)
    assert (run / "metrics.jsonl").read_text() == log
    with pytest.raises(UserError, match="at step 3, past the 2 steps"):
        train(config(tiny_data, run, steps=2, resume=True))


# ---------------------------------------------------------------------------------------------
# checkpoints: pruning and rewriting


def test_a_kill_during_pruning_leaves_no_partial_checkpoint(tiny_data, tmp_path, monkeypatch):
    run = tmp_path / "run"
    train(config(tiny_data, run, keep_last=1))
    real = shutil.rmtree

    def killed(path, *args, **kwargs):
        if Path(path).name.startswith(ckpt.TRASH_PREFIX) and (Path(path) / ckpt.WEIGHTS).exists():
            (Path(path) / ckpt.WEIGHTS).unlink()  # deleted part of it, then the kill
            raise KeyboardInterrupt
        return real(path, *args, **kwargs)

    monkeypatch.setattr(ckpt.shutil, "rmtree", killed)
    with pytest.raises(KeyboardInterrupt):
        train(config(tiny_data, run, steps=6, resume=True, keep_last=1))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000006"]
    assert (run / ".trash-step-00000003").is_dir()  # the leftover is hidden ...
    train(config(tiny_data, run, steps=9, resume=True, keep_last=1))
    assert not list(run.glob(".trash-*"))  # ... and cleaned by the next save


def test_a_finished_checkpoint_is_never_rewritten(tiny_data, tmp_path):
    run = tmp_path / "run"
    result = train(config(tiny_data, run))
    cfg = ckpt.load_config_of(result["checkpoint"])
    with pytest.raises(UserError, match="step-00000003 already exists"):
        ckpt.save_checkpoint(run, 3, {"x": torch.zeros(1)}, cfg, {})
    assert ckpt.load_model(result["checkpoint"])[0] is not None
