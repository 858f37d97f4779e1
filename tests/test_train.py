"""The trainer: exact resume, world-size independence, budgets, and bad input that loses nothing."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from sinkdlm import checkpoint as ckpt
from sinkdlm.config import Config, config_from_dict, load_config, model_preset
from sinkdlm.errors import UserError
from sinkdlm.training.objective import lr_at
from sinkdlm.training.trainer import train
from tests.conftest import tiny_train_config

ROOT = Path(__file__).resolve().parents[1]


def losses(run: Path) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x["loss"] for x in lines if "loss" in x]


def test_trains_and_writes_a_complete_checkpoint(tiny_data, tmp_path):
    result = train(tiny_train_config(tiny_data, tmp_path / "run"))
    out = Path(result["checkpoint"])
    assert out.name == "step-00000006"
    assert {p.name for p in out.iterdir()} == {"model.safetensors", "config.yaml", "tokenizer.json",
                                               "trainer_state.pt", "meta.json"}
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000003", "step-00000006"]
    model, cfg = ckpt.load_model(out)
    assert cfg.model.sink_tokens == 1 and cfg.model.vocab_size == 300
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    monitor = next(r["sink_monitor"] for r in records if "sink_monitor" in r)
    assert len(monitor) == 2 and 0 < monitor[0]["sink_mass"] < 1
    assert result["val_loss"] > 0


def test_resume_is_bit_for_bit(tiny_data, tmp_path):
    straight = train(tiny_train_config(tiny_data, tmp_path / "a", steps=6))
    train(tiny_train_config(tiny_data, tmp_path / "b", steps=3))
    resumed = train(tiny_train_config(tiny_data, tmp_path / "b", steps=6, resume=True))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    wa, wb = ckpt.load_weights(straight["checkpoint"]), ckpt.load_weights(resumed["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert straight["val_loss"] == resumed["val_loss"]


@pytest.mark.slow
def test_two_gloo_processes_match_one(tiny_data, tmp_path):
    """Same global batch over 2 CPU processes: same samples and masks, so the same losses up to
    float summation order (tolerance 1e-5 relative)."""
    def run(devices, out):
        cmd = [sys.executable, "-m", "sinkdlm", "train", "--model", "tiny", "--data", str(tiny_data),
               "--out", str(out), "model.sink_tokens=1", "data.seq_len=32", "train.global_batch=4",
               "train.micro_batch=2", "train.max_steps=4", "train.log_every=1", "train.progress=false",
               "train.accelerator=cpu", f"train.devices={devices}", "train.strategy=ddp" if devices > 1 else
               "train.strategy=auto", "data.val_windows=4", "optim.warmup_min_steps=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        done = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=ROOT)
        assert done.returncode == 0, done.stderr[-2000:]
        return losses(out)

    one, two = run(1, tmp_path / "one"), run(2, tmp_path / "two")
    assert len(one) == len(two) == 4
    assert one == pytest.approx(two, rel=1e-5)


@pytest.mark.parametrize("model", [{"sink_tokens": 1}, {"sink_tokens": 2, "attn_gate": "headwise", "sink_zero_value": True}])
def test_bf16_mixed_precision_tracks_fp32(tiny_data, tmp_path, model):
    """Fabric's bf16-mixed (autocast; on GPUs the paper's setting) through the fast path, the eager
    sink monitor and validation, on the CPU: same losses as fp32 up to bf16 rounding."""
    def run(precision, out):
        cfg = tiny_train_config(tiny_data, out, steps=3, accelerator="cpu", precision=precision)
        for key, value in model.items():
            setattr(cfg.model, key, value)
        result = train(cfg)
        return losses(out) + [result["val_loss"]]

    fp32, bf16 = run("32-true", tmp_path / "fp32"), run("bf16-mixed", tmp_path / "bf16")
    assert len(bf16) == 4 and all(math.isfinite(x) for x in bf16)
    assert bf16 == pytest.approx(fp32, rel=2e-2)
    assert bf16 != fp32  # autocast did run in bf16


def test_flops_budget_gives_smdm_steps():
    cfg = load_config(None, ["model.preset=472", "train.flops=300", "train.global_batch=256"])
    assert cfg.seq_len == 2048
    assert cfg.steps() == int(300e18 / (6 * 471_906_560 * 256 * 2048))
    assert 200_000 < cfg.steps() < 205_000


def test_lr_schedule_warmup_then_cosine():
    o = Config().optim
    assert lr_at(0, 10_000, o) == pytest.approx(o.lr / 100)
    assert lr_at(99, 10_000, o) == pytest.approx(o.lr)
    assert lr_at(9_999, 10_000, o) == pytest.approx(o.min_lr, rel=1e-3)


def test_refuses_to_overwrite_a_run(tiny_data, tmp_path):
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=3))
    before = (tmp_path / "run" / "step-00000003" / "model.safetensors").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        train(tiny_train_config(tiny_data, tmp_path / "run", steps=3))
    assert (tmp_path / "run" / "step-00000003" / "model.safetensors").read_bytes() == before
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=3, overwrite=True))


def test_resume_with_another_model_is_refused(tiny_data, tmp_path):
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=3))
    cfg = tiny_train_config(tiny_data, tmp_path / "run", steps=6, resume=True)
    cfg.model.n_layer = 3
    with pytest.raises(UserError, match="differs in \\['model.n_layer'\\]"):
        train(cfg)
    cfg = tiny_train_config(tiny_data, tmp_path / "run", steps=6, resume=True, seed=7)
    with pytest.raises(UserError, match="differs in \\['train.seed'\\]"):
        train(cfg)


def test_vocab_and_block_size_mismatch(tiny_data, tmp_path):
    cfg = tiny_train_config(tiny_data, tmp_path / "run")
    cfg.model.vocab_size = 999
    with pytest.raises(UserError, match="vocab_size=999"):
        train(cfg)
    cfg = tiny_train_config(tiny_data, tmp_path / "run")
    cfg.data.seq_len = 65
    with pytest.raises(UserError, match="exceeds model.block_size=64"):
        train(cfg)


def test_corrupt_checkpoint_names_itself_and_keeps_the_previous(tiny_data, tmp_path):
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=6))
    latest = tmp_path / "run" / "step-00000006" / "model.safetensors"
    latest.write_bytes(latest.read_bytes()[:1000])
    with pytest.raises(UserError, match="step-00000006 is corrupt or truncated"):
        train(tiny_train_config(tiny_data, tmp_path / "run", steps=9, resume=True))
    model, _ = ckpt.load_model(tmp_path / "run" / "step-00000003")  # the previous one still loads


def test_kill_during_checkpoint_write_leaves_the_previous_intact(tiny_data, tmp_path, monkeypatch):
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=3))

    def killed(*args, **kwargs):
        raise KeyboardInterrupt("killed while writing")

    monkeypatch.setattr(ckpt.torch, "save", killed)
    with pytest.raises(KeyboardInterrupt):
        train(tiny_train_config(tiny_data, tmp_path / "run", steps=6, resume=True))
    monkeypatch.undo()
    assert [p.name for p in ckpt.list_checkpoints(tmp_path / "run")] == ["step-00000003"]
    result = train(tiny_train_config(tiny_data, tmp_path / "run", steps=6, resume=True))
    assert Path(result["checkpoint"]).name == "step-00000006"


def test_nan_loss_stops_and_names_the_step(tiny_data, tmp_path, monkeypatch):
    import sinkdlm.training.trainer as trainer

    real = trainer.diffusion_loss
    monkeypatch.setattr(trainer, "diffusion_loss", lambda m, cfg, ids, response, step, *a: real(
        m, cfg, ids, response, step, *a) * (float("nan") if step == 4 else 1.0))
    with pytest.raises(UserError, match="loss is nan at step 4.*step-00000003"):
        train(tiny_train_config(tiny_data, tmp_path / "run", steps=6))


@pytest.mark.slow
def test_cli_bad_input_is_one_line_exit_2(tiny_data, tmp_path):
    cases = [["--model", "nope"], ["train.bogus=1"], ["--config", str(tmp_path / "missing.yaml")],
             ["--data", str(tmp_path / "empty")]]
    for extra in cases:
        done = subprocess.run([sys.executable, "-m", "sinkdlm", "train", "--out", str(tmp_path / "r"), *extra],
                              capture_output=True, text=True, cwd=ROOT)
        assert done.returncode == 2, (extra, done.stderr)
        assert len(done.stderr.strip().splitlines()) == 1 and "error:" in done.stderr


def test_every_shipped_config_loads_and_round_trips():
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        cfg = load_config(path)
        assert config_from_dict(cfg.to_dict()) == cfg, path  # what a checkpoint saves rebuilds the same
        assert cfg.train.global_batch % cfg.train.micro_batch == 0, path  # else training refuses it


def test_demo_yaml_mirrors_the_demo_command():
    from sinkdlm.experiments.demo import demo_config

    assert load_config(ROOT / "configs" / "demo.yaml") == demo_config()


def test_paper_presets_have_paper_shapes():
    cfg = model_preset("472")
    assert (cfg.n_layer, cfg.n_head, cfg.n_embd, cfg.intermediate_size, cfg.vocab_size, cfg.block_size) == \
        (18, 10, 1280, 5120, 32000, 2048)


def test_mask_annealing_reaches_the_model(tiny_data, tmp_path, monkeypatch):
    """Attention goes causal -> full over mask_anneal_steps: the model sees the mask, and it changes the loss."""
    from sinkdlm.model import DLM

    shares = []  # per training forward: the share of visible (query, key) pairs, None = no mask
    real = DLM.forward

    def spy(self, idx, *args, **kwargs):
        mask = args[0] if args else kwargs.get("attention_mask")
        if torch.is_grad_enabled():
            shares.append(None if mask is None else mask.float().mean().item())
        return real(self, idx, *args, **kwargs)

    monkeypatch.setattr(DLM, "forward", spy)
    annealed = train(tiny_train_config(tiny_data, tmp_path / "annealed", steps=3, mask_anneal_steps=2))
    monkeypatch.undo()
    plain = train(tiny_train_config(tiny_data, tmp_path / "plain", steps=3))
    causal = (32 + 1) / (2 * 32)  # seq_len 32: the lower triangle with its diagonal
    assert shares[:2] == [causal, causal]  # step 0 (2 micro-batches): causal only
    assert causal < shares[2] == shares[3] < 1  # step 1: causal plus part of the future
    assert shares[4:] == [None, None]  # step 2: full attention
    assert losses(tmp_path / "annealed")[0] != losses(tmp_path / "plain")[0]  # same samples, other attention
    assert annealed["val_loss"] != plain["val_loss"]


def test_preset_keeps_sink_and_gate_fields():
    cfg = load_config(ROOT / "configs" / "paper_472_sink.yaml", ["model.preset=472"])
    assert cfg.model.sink_tokens == 1 and cfg.model.n_layer == 18


@pytest.mark.parametrize("override", ["model.n_head=0", "train.micro_batch=0", "train.global_batch=0"])
def test_nonpositive_sizes_are_user_errors(override):
    with pytest.raises(UserError, match="must be >= 1"):
        load_config(None, [override])


def test_data_with_another_tokenizer_is_refused_for_init_from(tiny_data, tmp_path):
    from tokenizers import Tokenizer, models

    first = train(tiny_train_config(tiny_data, tmp_path / "first", steps=1))
    other = Tokenizer(models.WordLevel({f"w{i}": i for i in range(300)}, unk_token="w0"))
    other.save(str(Path(first["checkpoint"]) / "tokenizer.json"))
    with pytest.raises(UserError, match="differs from train.init_from"):
        train(tiny_train_config(tiny_data, tmp_path / "second", steps=1, init_from=str(first["checkpoint"])))


def test_hardware_settings_lightning_rejects_are_user_errors(tiny_data, tmp_path):
    with pytest.raises(UserError, match="invalid accelerator name"):
        train(tiny_train_config(tiny_data, tmp_path / "run", accelerator="bogus"))
    with pytest.raises(UserError, match="Precision 'bogus' is invalid"):
        train(tiny_train_config(tiny_data, tmp_path / "run", precision="bogus"))


# ---------------------------------------------------------------------------------------------
# loggers: metrics.jsonl is canonical; train.loggers adds Lightning's CSV / TensorBoard / W&B views


def test_csv_logger_mirrors_metrics_jsonl(tiny_data, tmp_path, capsys):
    import csv

    run = tmp_path / "run"
    train(tiny_train_config(tiny_data, run, steps=3, loggers=["csv"]))
    assert f"logging to metrics.jsonl (canonical), csv in {run / 'csv' / 'version_0'}" in capsys.readouterr().out
    rows = list(csv.DictReader((run / "csv" / "version_0" / "metrics.csv").open()))
    logged = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [float(r["loss"]) for r in rows if r["loss"]] == pytest.approx(losses(run))
    assert [float(r["val_loss"]) for r in rows if r["val_loss"]] == pytest.approx(
        [x["val_loss"] for x in logged if "val_loss" in x])
    monitor = next(x["sink_monitor"] for x in logged if "sink_monitor" in x)
    assert float(next(r for r in rows if r["sink/layer1/sink_mass"])["sink/layer1/sink_mass"]) == \
        pytest.approx(monitor[1]["sink_mass"])
    train(tiny_train_config(tiny_data, run, steps=4, loggers=["csv"], resume=True))
    assert (run / "csv" / "version_1" / "metrics.csv").is_file()  # a resumed run logs a new version


def test_tensorboard_logger_writes_events(tiny_data, tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    train(tiny_train_config(tiny_data, run, steps=3, loggers=["tensorboard"]))
    events = EventAccumulator(str(run / "tb" / "version_0"))
    events.Reload()
    assert [e.value for e in events.Scalars("loss")] == pytest.approx(losses(run))
    assert "sink/layer0/sink_mass" in events.Tags()["scalars"]


def test_a_missing_logger_package_is_named_with_its_install(tiny_data, tmp_path, capsys, monkeypatch):
    import sinkdlm.training.loggers as loggers

    real = loggers.make_logger

    def without_packages(name, run):
        if name != "csv":
            raise ModuleNotFoundError(name)
        return real(name, run)

    monkeypatch.setattr(loggers, "make_logger", without_packages)
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=1, loggers=["csv", "tensorboard", "wandb"]))
    out = capsys.readouterr().out
    assert 'tensorboard is not installed (pip install -e ".[log]")' in out
    assert "wandb is not installed (pip install wandb)" in out
    assert not (tmp_path / "run" / "tb").exists()


def test_loggers_are_checked_against_the_declared_names():
    from sinkdlm.config import LOGGERS
    from sinkdlm.training.loggers import LOGGER_DIRS, LOGGER_INSTALL

    assert set(LOGGER_DIRS) == set(LOGGERS) and set(LOGGER_INSTALL) < set(LOGGERS)
    with pytest.raises(UserError, match="train.loggers has \\['tensorbord'\\]; choose from"):
        load_config(None, ["train.loggers=[csv,tensorbord]"])


def test_training_from_a_checkpoint_keeps_its_chat_template(tiny_data, tmp_path):
    """An instruct model's chat template travels in meta.json (convert records it): a run trained from
    it (adapt, SFT) keeps it, so `sinkdlm serve` can still answer chat requests."""
    first = train(tiny_train_config(tiny_data, tmp_path / "first", steps=1))
    meta_file = Path(first["checkpoint"]) / "meta.json"
    chat = {"chat_template": "{% for m in messages %}{{ m['content'] }}{% endfor %}", "bos_token": "<s>"}
    meta_file.write_text(json.dumps({**json.loads(meta_file.read_text()), **chat}))
    assert ckpt.chat_settings(first["checkpoint"]) == chat
    second = train(tiny_train_config(tiny_data, tmp_path / "second", steps=1, init_from=str(first["checkpoint"])))
    assert ckpt.chat_settings(second["checkpoint"]) == chat
    third = train(tiny_train_config(tiny_data, tmp_path / "third", steps=1))  # from scratch: none
    assert ckpt.chat_settings(third["checkpoint"]) == {}
