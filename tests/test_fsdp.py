"""FSDP2 (train.strategy=fsdp) on the CPU with gloo: what parallelize applies, and the trainer on 2
processes: the same losses as DDP and 1 process, exact resume after a kill, resharding to another
world size, and a consolidated model.safetensors equal to the sharded state."""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from sinkdlm import checkpoint as ckpt
from sinkdlm.config import FSDP_PRECISIONS, TrainConfig
from sinkdlm.errors import UserError
from sinkdlm.model import DLM
from sinkdlm.training import parallelize
from sinkdlm.training.trainer import full_weights, on_rank_zero, train
from tests.conftest import tiny, tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
SAME_FLOATS = 1e-5  # relative: only the order of float sums differs between world sizes and strategies
BF16 = 2e-2  # relative: bf16 rounding over a couple of steps of the tiny model


# ---------------------------------------------------------------------------------------------
# parallelize, in this process on a 1-rank gloo group


@pytest.fixture(scope="module")
def mesh(tmp_path_factory):
    from torch.distributed.device_mesh import init_device_mesh

    store = tmp_path_factory.mktemp("pg") / "store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    yield init_device_mesh("cpu", (1,))
    dist.destroy_process_group()


def loss_and_grads(model: torch.nn.Module, ids: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """A diffusion-shaped loss (mean log-sum-exp of the logits) and every parameter's full gradient."""
    loss = model(ids).float().logsumexp(-1).mean()
    loss.backward()
    grads = {}
    for name, p in model.named_parameters():
        grad = p.grad.full_tensor() if hasattr(p.grad, "full_tensor") else p.grad
        grads[plain_name(name)] = grad
    return loss.detach(), grads


def plain_name(name: str) -> str:
    return name.replace("_orig_mod.", "").replace("_checkpoint_wrapped_module.", "")


def pair(mesh, **train):
    """A plain model and the same weights parallelized with train options `train`."""
    cfg = tiny(sink_tokens=1)
    torch.manual_seed(0)
    plain = DLM(cfg)
    twin = DLM(cfg)
    twin.load_state_dict(plain.state_dict())
    return plain, parallelize.parallelize(twin, mesh, TrainConfig(strategy="fsdp", **train))


def test_parallelize_shards_every_block_then_the_root_and_computes_the_same(mesh):
    from torch.distributed.fsdp import FSDPModule
    from torch.distributed.tensor import DTensor

    plain, sharded = pair(mesh)
    assert isinstance(sharded, FSDPModule) and all(isinstance(b, FSDPModule) for b in sharded.blocks)
    assert all(isinstance(p, DTensor) for p in sharded.parameters())
    ids = torch.randint(0, 50, (2, 12))
    (loss_p, grads_p), (loss_s, grads_s) = loss_and_grads(plain, ids), loss_and_grads(sharded, ids)
    assert torch.equal(loss_p, loss_s)
    assert grads_p.keys() == grads_s.keys() and all(torch.equal(grads_p[k], grads_s[k]) for k in grads_p)


def test_activation_checkpointing_recomputes_each_block_with_the_same_gradients(mesh):
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    plain, checkpointed = pair(mesh, activation_checkpointing=True)
    assert all(isinstance(b, CheckpointWrapper) for b in checkpointed.blocks)
    mlp_calls = []
    for block in checkpointed.blocks:
        block._checkpoint_wrapped_module.mlp.register_forward_hook(lambda *_: mlp_calls.append(1))
    ids = torch.randint(0, 50, (2, 12))
    (loss_p, grads_p), (loss_c, grads_c) = loss_and_grads(plain, ids), loss_and_grads(checkpointed, ids)
    assert len(mlp_calls) == 2 * len(checkpointed.blocks)  # forward, then again in backward
    assert torch.equal(loss_p, loss_c) and all(torch.equal(grads_p[k], grads_c[k]) for k in grads_p)


def test_compile_wraps_each_block_before_sharding(mesh, monkeypatch):
    """torch.compile per Block, then fully_shard on the compiled Block (so FSDP's hooks stay outside
    the compiled graph). Dynamo traces each Block for real; the eager backend skips inductor's C++
    build, which the slow test below runs."""
    from torch._dynamo.eval_frame import OptimizedModule
    from torch.distributed.fsdp import FSDPModule

    real = torch.compile
    monkeypatch.setattr(torch, "compile", lambda module: real(module, backend="eager"))
    torch._dynamo.reset()
    plain, compiled = pair(mesh, compile=True, activation_checkpointing=True)
    assert all(isinstance(b, OptimizedModule) and isinstance(b, FSDPModule) for b in compiled.blocks)
    ids = torch.randint(0, 50, (2, 12))
    (loss_p, grads_p), (loss_c, grads_c) = loss_and_grads(plain, ids), loss_and_grads(compiled, ids)
    torch.testing.assert_close(loss_c, loss_p, rtol=SAME_FLOATS, atol=0)
    for name in grads_p:
        torch.testing.assert_close(grads_c[name], grads_p[name], rtol=SAME_FLOATS, atol=SAME_FLOATS)
    assert full_weights(compiled).keys() == plain.state_dict().keys()  # checkpoints keep plain names


def test_bf16_mixed_computes_in_bf16_and_keeps_fp32_weights(mesh):
    plain, mixed = pair(mesh, precision="bf16-mixed")
    assert all(p.dtype == torch.float32 for p in mixed.parameters())
    ids = torch.randint(0, 50, (2, 12))
    assert mixed(ids).dtype == torch.bfloat16
    (loss_p, _), (loss_m, grads_m) = loss_and_grads(plain, ids), loss_and_grads(mixed, ids)
    assert all(g.dtype == torch.float32 for g in grads_m.values())
    torch.testing.assert_close(loss_m, loss_p, rtol=BF16, atol=0)
    assert not torch.equal(loss_m, loss_p)  # the compute did run in bf16


def test_fsdp_takes_only_the_precisions_its_policy_is_built_from():
    with pytest.raises(UserError, match="train.precision='16-mixed' is not supported with train.strategy=fsdp"):
        TrainConfig(strategy="fsdp", precision="16-mixed")
    assert set(parallelize.PARAM_DTYPES) == set(FSDP_PRECISIONS)


class RankStub:
    """What on_rank_zero needs of Fabric, as rank `rank` sees it when rank 0 broadcasts `sent`."""

    def __init__(self, rank: int, sent=None) -> None:
        self.global_rank, self.sent = rank, sent

    def broadcast(self, obj):
        return obj if self.global_rank == 0 else self.sent


def test_a_failure_on_rank_zero_stops_every_rank():
    def refuse():
        raise UserError("step-00000006 already exists")

    with pytest.raises(UserError, match="already exists"):
        on_rank_zero(RankStub(0), refuse)
    with pytest.raises(UserError, match="already exists"):
        on_rank_zero(RankStub(1, sent=(None, UserError("step-00000006 already exists"))), refuse)
    with pytest.raises(RuntimeError, match="rank 0 failed: OSError"):
        on_rank_zero(RankStub(1, sent=(None, RuntimeError("rank 0 failed: OSError(28)"))), refuse)
    assert on_rank_zero(RankStub(1, sent=(Path("tmp"), None)), refuse) == Path("tmp")


# ---------------------------------------------------------------------------------------------
# the trainer on 2 gloo processes (Fabric launches the second one)

KILL_AT = 5  # the killed run dies after this step: past the step-3 checkpoint, before step 6's
KILLING_DRIVER = f"""
import os, signal, sys
from sinkdlm.training import trainer
from sinkdlm.cli import main

periodic = trainer.Loop.periodic

def periodic_then_die(self, step, *args):
    periodic(self, step, *args)
    if step == {KILL_AT}:  # no collective runs between here and the other rank's kill
        os.kill(os.getpid(), signal.SIGKILL)

trainer.Loop.periodic = periodic_then_die
sys.exit(main(sys.argv[1:]))
"""


def cli_train(data: Path, out: Path, *overrides: str, devices: int = 2, strategy: str = "fsdp", steps: int = 6,
              script: Path | None = None) -> subprocess.CompletedProcess:
    """`sinkdlm train` on the tiny model, 6 steps x global batch 4, checkpoints at steps 3 and 6."""
    entry = [str(script)] if script else ["-m", "sinkdlm"]
    cmd = [sys.executable, *entry, "train", "--model", "tiny", "--data", str(data), "--out", str(out),
           "model.sink_tokens=1", "data.seq_len=32", "data.val_windows=4", "train.global_batch=4",
           "train.micro_batch=2", f"train.max_steps={steps}", "train.log_every=1", "train.val_every=3",
           "train.save_every=3", "train.sink_monitor_every=3", "train.progress=false", "train.loggers=[]",
           "train.accelerator=cpu", f"train.devices={devices}", f"train.strategy={strategy}",
           "optim.warmup_min_steps=2", *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)


def trained(data: Path, out: Path, *overrides: str, **kw) -> Path:
    done = cli_train(data, out, *overrides, **kw)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def records(run: Path, key: str) -> list[float]:
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [x[key] for x in lines if key in x]


def weights(run: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_weights(ckpt.list_checkpoints(run)[-1])


@pytest.fixture(scope="module")
def fsdp_run(tiny_data, tmp_path_factory) -> Path:
    """The uninterrupted 2-process FSDP run every other one is compared with."""
    return trained(tiny_data, tmp_path_factory.mktemp("fsdp") / "run")


def test_fsdp_ddp_and_one_process_give_the_same_losses(tiny_data, fsdp_run, tmp_path):
    """Equal global batch (4): the same samples and masks, so the same losses and weights up to the
    order of float sums (SAME_FLOATS relative)."""
    one = trained(tiny_data, tmp_path / "one", devices=1, strategy="auto")
    done = cli_train(tiny_data, tmp_path / "ddp", strategy="ddp")
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("validation ELBO:") == 1  # the result is printed once, not by every rank
    ddp = tmp_path / "ddp"
    for key in ("loss", "val_loss"):
        assert len(records(fsdp_run, key)) == (6 if key == "loss" else 2)
        assert records(fsdp_run, key) == pytest.approx(records(one, key), rel=SAME_FLOATS)
        assert records(ddp, key) == pytest.approx(records(one, key), rel=SAME_FLOATS)
    w_fsdp, w_one = weights(fsdp_run), weights(one)
    assert w_fsdp.keys() == w_one.keys()
    for name in w_one:
        torch.testing.assert_close(w_fsdp[name], w_one[name], rtol=SAME_FLOATS, atol=SAME_FLOATS)


def test_fsdp_killed_mid_run_resumes_bit_for_bit(tiny_data, fsdp_run, tmp_path):
    script = tmp_path / "killed_train.py"
    script.write_text(KILLING_DRIVER)
    run = tmp_path / "run"
    killed = cli_train(tiny_data, run, script=script)
    assert killed.returncode == -signal.SIGKILL
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000003"]
    assert len(records(run, "loss")) == KILL_AT
    trained(tiny_data, run, "train.resume=true", "train.keep_last=1")
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["step-00000006"]  # pruned after step 6 was written
    assert records(run, "loss") == records(fsdp_run, "loss")
    assert records(run, "val_loss") == records(fsdp_run, "val_loss")
    resumed, straight = weights(run), weights(fsdp_run)
    assert all(torch.equal(resumed[k], straight[k]) for k in straight)


def test_consolidated_safetensors_equal_the_sharded_state(fsdp_run, tmp_path):
    """model.safetensors (gathered by FSDP, written by rank 0) against the shards themselves,
    consolidated offline by torch.distributed.checkpoint."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    last = ckpt.list_checkpoints(fsdp_run)[-1]
    assert sorted(p.name for p in (last / ckpt.SHARDED).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    dcp_to_torch_save(last / ckpt.SHARDED, tmp_path / "gathered.pt")
    gathered = torch.load(tmp_path / "gathered.pt", weights_only=True)["model"]
    consolidated = ckpt.load_weights(last)
    assert gathered.keys() == consolidated.keys()
    assert all(torch.equal(gathered[k], consolidated[k]) for k in gathered)
    model, cfg = ckpt.load_model(last)  # what generate, eval, analyze and export read
    assert cfg.train.strategy == "fsdp" and model.cfg.sink_tokens == 1


def copy_until(run: Path, step: int, to: Path) -> Path:
    """A run folder holding `run`'s checkpoint at `step` and its log up to there."""
    to.mkdir()
    shutil.copytree(ckpt.step_dir(run, step), ckpt.step_dir(to, step))
    kept = [x for x in (run / "metrics.jsonl").read_text().splitlines() if json.loads(x)["step"] <= step]
    (to / "metrics.jsonl").write_text("\n".join(kept) + "\n")
    return to


@pytest.mark.slow
def test_fsdp_resumes_at_another_world_size(tiny_data, fsdp_run, tmp_path):
    """torch.distributed.checkpoint reshards: 2 -> 1 and 1 -> 2 processes continue the same run
    (the same losses up to the order of float sums)."""
    two_to_one = trained(tiny_data, copy_until(fsdp_run, 3, tmp_path / "2to1"), "train.resume=true", devices=1)
    one = trained(tiny_data, tmp_path / "1to2", devices=1, steps=3)
    one_to_two = trained(tiny_data, one, "train.resume=true")
    for run in (two_to_one, one_to_two):
        assert records(run, "loss") == pytest.approx(records(fsdp_run, "loss"), rel=SAME_FLOATS)
        assert records(run, "val_loss") == pytest.approx(records(fsdp_run, "val_loss"), rel=SAME_FLOATS)


def test_resuming_with_the_other_checkpoint_format_is_one_line(tiny_data, fsdp_run, tmp_path):
    """A sharded checkpoint holds no whole optimizer state and a whole one no shards: refused
    before anything changes, in one line, exit code 2."""
    sharded = copy_until(fsdp_run, 3, tmp_path / "sharded")
    train(tiny_train_config(tiny_data, tmp_path / "whole", steps=3))  # the same model, batch and length
    whole = tmp_path / "whole"
    cases = [(sharded, "auto", "step-00000003 was written with train.strategy=fsdp (sharded state); "
                               "resume it with train.strategy=fsdp (any number of devices)"),
             (whole, "fsdp", "step-00000003 was written with train.strategy=auto (no sharded state); "
                             "resume it with train.strategy=auto or ddp")]
    for run, strategy, message in cases:
        before = sorted(p.name for p in run.rglob("*"))
        done = cli_train(tiny_data, run, "train.resume=true", devices=1, strategy=strategy)
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert done.returncode == 2 and len(errors) == 1 and message in errors[0], done.stderr[-2000:]
        assert "Traceback" not in done.stderr
        assert sorted(p.name for p in run.rglob("*")) == before


def test_bf16_and_activation_checkpointing_run_in_the_fsdp_trainer(tiny_data, fsdp_run, tmp_path):
    """train.precision reaches FSDP2's policy and train.activation_checkpointing each Block. Two
    steps (bf16 is slow on a CPU): with warmup_min_steps=2 their learning rates are those of the
    6-step fp32 run, so its first two losses are the reference."""
    run = trained(tiny_data, tmp_path / "bf16", "train.precision=bf16-mixed", "train.activation_checkpointing=true",
                  steps=2)
    fp32 = records(fsdp_run, "loss")[:2]
    assert records(run, "loss") == pytest.approx(fp32, rel=BF16) and records(run, "loss") != fp32
    assert all(w.dtype == torch.float32 for w in weights(run).values())


@pytest.mark.slow
def test_compiled_blocks_train_under_fsdp(tiny_data, fsdp_run, tmp_path):
    """train.compile with inductor (a C++ build per Block and process: minutes on 2 busy cores)."""
    run = trained(tiny_data, tmp_path / "compiled", "train.compile=true", steps=2)
    assert records(run, "loss") == pytest.approx(records(fsdp_run, "loss")[:2], rel=SAME_FLOATS)


def test_block_options_apply_without_fsdp_too(tiny_data, tmp_path):
    """Activation checkpointing on one process: the same losses and weights bit for bit, and the
    checkpoint keeps the plain model's tensor names."""
    plain = train(tiny_train_config(tiny_data, tmp_path / "plain", steps=3))
    checkpointed = train(tiny_train_config(tiny_data, tmp_path / "ac", steps=3, activation_checkpointing=True))
    assert records(tmp_path / "ac", "loss") == records(tmp_path / "plain", "loss")
    w_plain, w_ac = ckpt.load_weights(plain["checkpoint"]), ckpt.load_weights(checkpointed["checkpoint"])
    assert w_plain.keys() == w_ac.keys() and all(torch.equal(w_plain[k], w_ac[k]) for k in w_plain)


@pytest.mark.parametrize("variant", ["plain", "gate", "sink"])
def test_paper_configs_train_with_fsdp_in_bf16(variant):
    from sinkdlm.config import load_config

    t = load_config(ROOT / "configs" / f"paper_472_{variant}.yaml").train
    assert (t.strategy, t.precision, t.accelerator) == ("fsdp", "bf16-mixed", "cuda")
