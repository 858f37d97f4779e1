"""The command line: every option explains itself, mistakes name the fix, commands only parse."""

import argparse
import dataclasses
import re
import sys
from pathlib import Path

import pytest

from sinkdlm.cli import COMMANDS, build_parser, main
from sinkdlm.errors import UserError
from sinkdlm.fields import HelpFormatter, check_choices, choices_of, field_types

ROOT = Path(__file__).resolve().parents[1]


def leaf_parsers(parser: argparse.ArgumentParser, prog: str):
    """(name, parser) of a command and of each of its sub-commands."""
    yield prog, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from leaf_parsers(sub, f"{prog} {name}")


@pytest.mark.parametrize("command", list(COMMANDS))
def test_every_option_has_help_that_shows_its_default(command):
    _, parser = build_parser(command)
    for prog, p in leaf_parsers(parser, command):
        formatter = HelpFormatter(prog)
        for action in p._actions:
            if isinstance(action, (argparse._HelpAction, argparse._SubParsersAction)):
                continue
            name = "/".join(action.option_strings) or action.dest
            assert action.help, f"sinkdlm {prog} {name} has no help"
            shown = formatter._get_help_string(action)
            positional = not action.option_strings
            assert positional or action.required or "default" in shown, f"sinkdlm {prog} {name}: {shown!r}"


def test_help_exits_0_and_shows_defaults(capsys):
    assert main(["generate", "--help"]) == 0
    out = capsys.readouterr().out
    assert "--top-k TOP_K" in out and "(default: 0)" in out and "--guidance" in out
    assert main(["train", "--help"]) == 0
    assert "sinkdlm config" in capsys.readouterr().out  # how to list every section.key


@pytest.mark.parametrize("argv,usage,hint", [
    (["generate", "--promt", "x"], "usage: sinkdlm generate", "did you mean --prompt?"),
    (["generate", "--checkpoint", "c", "--gen-lenght=8"], "usage: sinkdlm generate", "did you mean --gen-length?"),
    (["data", "benchmarks", "--tsks", "x"], "usage: sinkdlm data benchmarks", "did you mean --tasks?"),
    (["train", "--confg", "x.yaml"], "usage: sinkdlm train", "did you mean --config?"),
])
def test_misspelled_option_names_the_closest_in_the_commands_usage(argv, usage, hint, capsys):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith(usage) and hint in err, err


def test_main_leaves_sys_argv_alone(monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", ["sinkdlm", "demo", "--steps", "not-a-number"])
    assert main(["config", "train.max_steps=7"]) == 0
    assert "train.max_steps" in capsys.readouterr().out and sys.argv[1] == "demo"


def test_config_lists_every_key_with_its_type_and_value(capsys):
    from sinkdlm.config import Config

    assert main(["config", "--model", "tiny", "model.attn_gate=headwise", "train.max_steps=7"]) == 0
    lines = capsys.readouterr().out.splitlines()
    keys = [f"{s.name}.{k}" for s in dataclasses.fields(Config) for k in field_types(type(getattr(Config(), s.name)))]
    assert [line.split()[0] for line in lines] == keys
    assert re.search(r"^model\.attn_gate +none\|elementwise\|headwise +'headwise' +# ", "\n".join(lines), re.M)
    assert re.search(r"^train\.max_steps +int >= 1 +7 +# optimizer steps", "\n".join(lines), re.M)


def test_generate_flags_are_sample_config_fields():
    from sinkdlm.sample import SampleConfig

    _, parser = build_parser("generate")
    defaults = SampleConfig()
    options = {a.dest: a for a in parser._actions}
    for f in dataclasses.fields(SampleConfig):
        action = options[f.name]
        assert action.default == getattr(defaults, f.name) and action.help.startswith(f.metadata["help"])
        allowed = choices_of(field_types(SampleConfig)[f.name])
        assert (tuple(action.choices) if action.choices else None) == allowed
    args = parser.parse_args(["--checkpoint", "c", "--guidance", "0.5", "--cache", "dual", "--length-includes-prompt"])
    assert (args.guidance, args.cache, args.length_includes_prompt) == (0.5, "dual", True)


def test_allowed_values_come_from_the_literal_type():
    from sinkdlm.config import ModelConfig, load_config
    from sinkdlm.sample import SampleConfig

    with pytest.raises(UserError, match=r"sampling cache='full' is not one of \['none', 'prefix', 'dual'\]"):
        SampleConfig(cache="full")
    with pytest.raises(UserError, match=r"model.sink_position='middle' is not one of \['front', 'end'\]"):
        load_config(None, ["model.sink_position=middle"])
    check_choices(ModelConfig(attn_gate="headwise"), "model.")  # allowed values pass
    assert main(["generate", "--checkpoint", "c", "--prompt", "x", "--eos", "halt"]) == 2


def test_only_the_cli_table_imports_commands():
    importers = [f"{p.relative_to(ROOT)}:{i}" for folder in ("sinkdlm", "benchmarks")
                 for p in (ROOT / folder).rglob("*.py") if p.name != "cli.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1)
                 if re.search(r"(from|import) sinkdlm\.commands|from sinkdlm import commands", line)]
    assert not importers, importers


def test_no_single_letter_module_aliases():
    """`from sinkdlm import study as S` hides what S is; PyTorch's `functional as F` is the one idiom kept."""
    aliases = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for folder in ("sinkdlm", "tests", "benchmarks")
               for p in (ROOT / folder).rglob("*.py")
               for i, line in enumerate(p.read_text().splitlines(), 1)
               if re.match(r"\s*(from [\w.]+ )?import [\w.]+ as [A-Za-z]\s*(#.*)?$", line)
               and "torch.nn.functional as F" not in line]
    assert not aliases, aliases


def test_analyze_and_eval_gsm8k_options_come_from_their_settings():
    from sinkdlm.analysis import AnalysisConfig
    from sinkdlm.cli import parse_args
    from sinkdlm.eval.gsm8k import GSM8K_PRESETS

    args = parse_args(["analyze", "--checkpoint", "c", "--out", "o", "--levels", "0.8,0.2", "--no-interventions",
                       "--rule", "top1"])
    _, parser = build_parser("analyze")
    options = [a.dest for a in parser._actions if a.dest in {f.name for f in dataclasses.fields(AnalysisConfig)}]
    chosen = AnalysisConfig(**{name: getattr(args, name) for name in options})
    assert (chosen.levels, chosen.interventions, chosen.rule, chosen.steps) == ([0.8, 0.2], False, "top1", 32)

    _, parser = build_parser("eval-gsm8k")
    from importlib import import_module

    command = import_module("sinkdlm.commands.eval_gsm8k")
    settings = command.settings_from(parser.parse_args(["--checkpoint", "c", "--preset", "paper", "--steps", "128"]))
    paper = GSM8K_PRESETS["paper"]
    assert settings.first == dataclasses.replace(paper.first, steps=128) and settings.second == paper.second


@pytest.mark.parametrize("argv, said", [
    (["study", "--seeds", "1,x"], "--seeds '1,x' should be comma-separated integers"),
    (["study", "--seeds", ","], "--seeds ',' should be comma-separated integers"),
    (["analyze", "--checkpoint", "c", "--out", "o", "--checkpoint-steps", "last"], "--checkpoint-steps 'last' should be `all`"),
])
def test_comma_separated_integer_options_are_one_line_exit_2(argv, said, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert said in err and len(err.splitlines()) == 1


@pytest.mark.slow
def test_a_reader_that_closes_the_pipe_ends_the_command_without_a_traceback():
    """`sinkdlm config | head`: the reader leaves before the command writes (closed before it starts)."""
    import subprocess

    done = subprocess.Popen([sys.executable, "-m", "sinkdlm", "config"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, cwd=ROOT)
    done.stdout.close()
    err = done.stderr.read().decode()
    assert done.wait(timeout=120) == 141 and "Traceback" not in err and "BrokenPipe" not in err, err


def test_threads_leave_busy_cores_free_unless_chosen(monkeypatch):
    from sinkdlm import cli

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(cli.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (1.2, 0.0, 0.0))
    assert cli.default_threads(2) == 1
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (0.3, 0.0, 0.0))
    assert cli.default_threads(2) == 2  # an idle machine: torch's default
    monkeypatch.setattr(cli.os, "getloadavg", lambda: (7.0, 0.0, 0.0))
    assert cli.default_threads(2) == 1  # never fewer than one
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert cli.default_threads(2) == 2  # the user's (or torchrun's) choice stands


def test_every_command_takes_threads(capsys):
    import torch

    before = torch.get_num_threads()
    try:
        assert main(["config", "--threads", "2"]) == 0 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)
    assert main(["config", "--threads", "0"]) == 2
    assert "--threads: '0' is not a whole number >= 1" in capsys.readouterr().err
    for command in COMMANDS:
        _, parser = build_parser(command)
        assert "--threads" in parser._option_string_actions, command
