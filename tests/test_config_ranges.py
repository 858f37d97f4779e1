"""Numbers are checked where they are declared (`setting(..., at_least=1)`), config files explain their
mistakes in one line, a misspelled option is offered the option it means, and a run's saved config
finds its training data from any folder."""

import dataclasses
import math
import typing
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from sinkdlm import checkpoint as ckpt
from sinkdlm.analysis.pipeline import AnalysisConfig
from sinkdlm.cli import main
from sinkdlm.config import (
    Config,
    DataConfig,
    ModelConfig,
    OptimConfig,
    TrainConfig,
    load_config,
    save_config,
    with_run_data_paths,
)
from sinkdlm.errors import UserError
from sinkdlm.eval.likelihood import LikelihoodConfig
from sinkdlm.eval.run import EvalConfig
from sinkdlm.experiments.study import StudyConfig
from sinkdlm.fields import check_choices, field_types, range_of, setting, without_none
from sinkdlm.sample import SampleConfig

SETTINGS_CLASSES = [ModelConfig, DataConfig, OptimConfig, TrainConfig, SampleConfig, AnalysisConfig, LikelihoodConfig,
                    EvalConfig, StudyConfig]


def error_line(argv: list[str], capsys) -> str:
    """The one line a command refusing its input prints (exit 2)."""
    assert main(argv) == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if "error:" in line or line.startswith("Trace")]
    assert len(lines) == 1, lines
    return lines[0]


def is_numeric(hint) -> bool:
    base = without_none(hint)
    return base in (int, float) or (typing.get_origin(base) is not None and
                                    set(typing.get_args(base)) & {int, float} == set(typing.get_args(base)))


@pytest.mark.parametrize("cls", SETTINGS_CLASSES, ids=lambda c: c.__name__)
def test_every_numeric_field_declares_its_range(cls):
    hints = field_types(cls)
    unbounded = [f.name for f in dataclasses.fields(cls) if is_numeric(hints[f.name]) and range_of(f) is None]
    assert not unbounded, f"{cls.__name__}: declare the range of {unbounded} (setting(..., at_least=...))"
    cls()  # the defaults lie in their ranges


@pytest.mark.parametrize("override, message", [
    ("optim.lr=-1", "optim.lr=-1.0 must be a finite number > 0"),
    ("optim.lr=nan", "optim.lr=nan must be a finite number > 0"),
    ("optim.beta2=1", "optim.beta2=1.0 must be a finite number in [0, 1)"),
    ("optim.min_lr=1", "optim.min_lr=1.0 is above optim.lr=0.0002"),
    ("train.save_every=0", "train.save_every=0 must be >= 1"),
    ("train.val_every=-5", "train.val_every=-5 must be >= 1"),
    ("train.flops=.inf", "train.flops=inf must be a finite number >= 0"),
    ("train.global_batch=0", "train.global_batch=0 must be >= 1"),
    ("train.micro_batch=3", "train.global_batch=8 is not a multiple of train.micro_batch=3"),
    ("data.seq_len=0", "data.seq_len=0 must be >= 1"),
    ("model.rope_base=0", "model.rope_base=0.0 must be a finite number > 0"),
    ("train.random_length_prob=1.5", "train.random_length_prob=1.5 must be a finite number in [0, 1]"),
])
def test_a_number_out_of_its_range_is_one_line_before_anything_starts(override, message, capsys):
    assert message in error_line(["config", override], capsys)


def test_the_same_check_holds_for_python_flags_and_yaml(tmp_path, capsys):
    with pytest.raises(UserError, match=r"sampling top_p=0 must be a finite number in \(0, 1\]"):
        SampleConfig(top_p=0)
    with pytest.raises(UserError, match=r"analysis levels=\[0.5, 2.0\] must each be a finite number in \(0, 1\]"):
        AnalysisConfig(levels=(0.5, 2.0))
    with pytest.raises(UserError, match="limit=0 must be >= 1"):
        EvalConfig(limit=0)
    with pytest.raises(UserError, match="study mc_num=0 must be >= 1"):
        StudyConfig(mc_num=0)
    with pytest.raises(UserError, match="mc_num=0 must be >= 1"):
        LikelihoodConfig(mc_num=0)
    assert "sampling steps=0 must be >= 1" in error_line(["generate", "--checkpoint", "c", "--steps", "0"], capsys)
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  save_every: 0\n")
    assert f"{recipe}: train.save_every=0 must be >= 1" in error_line(["config", "--config", str(recipe)], capsys)


def test_a_float_field_refuses_nan_and_infinity_without_a_declared_range():
    @dataclass
    class Knob:
        weight: float = setting(0.0, "any finite number")

        def __post_init__(self):
            check_choices(self, "knob ")

    assert Knob(-3.5).weight == -3.5
    for bad in (math.nan, math.inf, -math.inf):
        with pytest.raises(UserError, match=f"knob weight={bad} must be a finite number$"):
            Knob(bad)


def test_help_and_config_show_the_ranges(capsys):
    assert main(["generate", "--help"]) == 0
    assert "must be in (0, 1]" in " ".join(capsys.readouterr().out.split())  # --top-p, wrapped anywhere
    assert main(["config"]) == 0
    lines = {line.split()[0]: line for line in capsys.readouterr().out.splitlines()}
    assert " float > 0 " in lines["optim.lr"] and "# peak learning rate" in lines["optim.lr"]
    assert " int >= 1 | None " in lines["data.seq_len"] and " float in [0, 1) " in lines["optim.beta1"]


@pytest.mark.parametrize("text, message", [
    ("model:\n  n_layer: 2\n n_head: 3\n", "is not valid YAML: line 3, column 2: expected <block end>"),
    ("model:\n  name: \"tiny\n", "line 3, column 1: found unexpected end of stream (while scanning a quoted "
                                 "scalar from line 2, column 9)"),
    ("model:\n\tn_layer: 2\n", "line 2, column 1: found character '\\t' that cannot start any token"),
    ("- model\n- train\n", "holds a list, not a mapping of sections; write it as sections model, data"),
    ("model: 3\n", "section 'model' should be a mapping of keys to values, e.g. `model: {name: 'tiny'}`"),
    ("model:\n  n_layr: 2\n", "unknown key model.n_layr (did you mean model.n_layer?); `sinkdlm config` lists"),
    ("modle:\n  n_layer: 2\n", "unknown section 'modle' (did you mean model?); the sections are model, data"),
])
def test_a_bad_config_file_is_one_line_naming_it(text, message, tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(text)
    line = error_line(["config", "--config", str(recipe)], capsys)
    assert str(recipe) in line and message in line, line


def test_a_checkpoints_invalid_config_yaml_is_one_line(tmp_path):
    (tmp_path / ckpt.WEIGHTS).write_bytes(b"")
    (tmp_path / ckpt.CONFIG).write_text("model:\n  n_layer: 2\n n_head: 3\n")
    with pytest.raises(UserError) as caught:
        ckpt.load_config_of(tmp_path)
    assert "\n" not in str(caught.value) and "line 3, column 2" in str(caught.value), str(caught.value)


@pytest.mark.parametrize("wrong, meant", [("--block-size", "--block-length"), ("--gen-lenght", "--gen-length"),
                                          ("--batch-szie", "--batch-size"), ("--top-pp", "--top-p")])
def test_a_misspelled_option_is_offered_the_one_about_the_same_thing(wrong, meant, capsys):
    line = error_line(["generate", "--checkpoint", "c", wrong, "4"], capsys)
    assert line.endswith(f"unrecognized argument {wrong}; did you mean {meant}?"), line


def test_the_saved_config_holds_absolute_data_paths(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(None, ["data.path=prepared", "data.sft_path=~/sft.jsonl"])
    save_config(cfg, tmp_path / "config.yaml")
    saved = yaml.safe_load((tmp_path / "config.yaml").read_text())["data"]
    assert saved["path"] == str(tmp_path / "prepared") and saved["sft_path"] == str(Path.home() / "sft.jsonl")
    assert cfg.data.path == "prepared"  # the config in use is left as given
    save_config(Config(), tmp_path / "empty.yaml")
    assert yaml.safe_load((tmp_path / "empty.yaml").read_text())["data"]["path"] == ""  # unset stays unset


def old_run(project: Path, data_path: str, out_dir: str = "runs/r") -> Path:
    """A checkpoint as an older sinkdlm saved it, trained from `project`: its data.path as given."""
    step = project / out_dir / "step-00000001"
    step.mkdir(parents=True)
    (step / ckpt.WEIGHTS).write_bytes(b"")
    data = Config().to_dict()
    data["data"]["path"], data["train"]["out_dir"] = data_path, out_dir
    (step / ckpt.CONFIG).write_text(yaml.safe_dump(data))
    return step


def test_an_old_run_with_a_relative_data_path_finds_its_data_from_elsewhere(tmp_path, monkeypatch):
    project, elsewhere = tmp_path / "project", tmp_path / "elsewhere"
    (project / "data" / "tiny").mkdir(parents=True)
    elsewhere.mkdir()
    step = old_run(project, "data/tiny")
    monkeypatch.chdir(elsewhere)
    assert ckpt.load_config_of(project / "runs" / "r").data.path == str(project / "data" / "tiny")
    (elsewhere / "data" / "tiny").mkdir(parents=True)  # the path as given, from where the command runs, wins
    assert ckpt.load_config_of(step).data.path == str(elsewhere / "data" / "tiny")


def test_an_old_run_whose_data_is_gone_keeps_the_path_it_saved(tmp_path, monkeypatch):
    step = old_run(tmp_path / "project", "data/gone")
    monkeypatch.chdir(tmp_path)
    assert ckpt.load_config_of(step).data.path == "data/gone"  # named as saved in the error that follows
    moved = with_run_data_paths(Config(data=DataConfig(path="data/gone"), train=TrainConfig(out_dir="/abs/r")), step)
    assert moved.data.path == "data/gone"
