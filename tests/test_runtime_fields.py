"""Runtime vs architecture model fields (declared once in ModelConfig), and override parsing."""

import json

import pytest

from sinkdlm import checkpoint as ckpt
from sinkdlm.cli import main
from sinkdlm.config import ModelConfig
from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from sinkdlm.training.trainer import train
from tests.conftest import tiny_train_config

FAST = ["train.max_steps=1", "train.global_batch=2", "train.micro_batch=2", "train.progress=false",
        "train.loggers=[]", "data.seq_len=32", "data.val_windows=2"]


@pytest.fixture(scope="module")
def base(tiny_data, tmp_path_factory):
    """A one-step tiny checkpoint to adapt, fine-tune and load."""
    out = tmp_path_factory.mktemp("base") / "run"
    return train(tiny_train_config(tiny_data, out, steps=1, loggers=[]))["checkpoint"]


@pytest.fixture(scope="module")
def sft_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("sft") / "pairs.jsonl"
    path.write_text("".join(json.dumps({"prompt": "the cat sat", "response": f"on a mat {i}"}) + "\n"
                            for i in range(20)))
    return path


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_runtime_fields_are_declared_once_and_exist():
    names = {f.name for f in ModelConfig.__dataclass_fields__.values()}
    assert ModelConfig.IMPLEMENTATION_FIELDS <= ModelConfig.RUNTIME_FIELDS <= names
    assert ModelConfig.RUNTIME_FIELDS == {"attn_impl", "logit_shift", "causal"}


def test_load_model_validates_runtime_overrides(base):
    _, cfg = ckpt.load_model(base, attn_impl="reference", logit_shift=True)
    assert (cfg.model.attn_impl, cfg.model.logit_shift) == ("reference", True)
    with pytest.raises(UserError, match="model.attn_impl='eagre' is not one of"):
        ckpt.load_model(base, attn_impl="eagre")
    with pytest.raises(UserError, match="model.causal='yes' should be bool"):
        ckpt.load_model(base, causal="yes")
    with pytest.raises(UserError, match="model.n_layer is fixed by the checkpoint"):
        ckpt.load_model(base, n_layer=3)


@pytest.mark.parametrize("command", ["adapt", "sft"])
def test_a_runtime_override_is_saved_with_the_run(command, base, tiny_data, sft_file, tmp_path):
    out = tmp_path / command
    data = ["--data", str(tiny_data if command == "adapt" else sft_file)]
    rc = main([command, "--init-from", str(base), "--out", str(out), *data, "model.logit_shift=true",
               "model.attn_impl=reference", *FAST])
    assert rc == 0
    saved = ckpt.load_config_of(out).model
    assert (saved.logit_shift, saved.attn_impl) == (True, "reference")


@pytest.mark.parametrize("command", ["adapt", "sft"])
@pytest.mark.parametrize("override, message", [
    ("model.n_layer=3", "model.n_layer=3 but the checkpoint"),
    ("model.sink_tokens=0", "model.sink_tokens=0 but the checkpoint"),
    ("model.attn_impl=eagre", "model.attn_impl='eagre' is not one of"),
])
def test_architecture_or_bad_runtime_override_is_refused(command, override, message, base, tiny_data,
                                                         sft_file, tmp_path, capsys):
    data = ["--data", str(tiny_data if command == "adapt" else sft_file)]
    rc = main([command, "--init-from", str(base), "--out", str(tmp_path / "r"), *data, override, *FAST])
    assert rc == EXIT_BAD_INPUT
    assert message in one_line_error(capsys)
    assert not (tmp_path / "r").exists()


def test_resume_may_change_the_kernel_but_not_the_function(tiny_data, tmp_path):
    train(tiny_train_config(tiny_data, tmp_path / "run", steps=3, loggers=[]))
    cfg = tiny_train_config(tiny_data, tmp_path / "run", steps=4, resume=True, loggers=[])
    cfg.model.logit_shift = True
    with pytest.raises(UserError, match=r"differs in \['model.logit_shift'\]"):
        train(cfg)
    cfg = tiny_train_config(tiny_data, tmp_path / "run", steps=4, resume=True, loggers=[])
    cfg.model.attn_impl = "reference"
    assert ckpt.load_config_of(train(cfg)["checkpoint"]).model.attn_impl == "reference"


def test_overrides_may_stand_before_options(tiny_data, tmp_path):
    out = tmp_path / "run"
    rc = main(["train", "model.n_layer=1", "--model", "tiny", *FAST, "--data", str(tiny_data), "--out", str(out)])
    assert rc == 0
    assert ckpt.load_config_of(out).model.n_layer == 1


def test_a_bad_override_before_an_option_is_the_one_named(tmp_path, capsys):
    rc = main(["train", "train.bogus=1", "--out", str(tmp_path / "r"), "train.max_steps=3"])
    assert rc == EXIT_BAD_INPUT
    err = one_line_error(capsys)
    assert "unknown key train.bogus" in err and "max_steps=3" not in err
