"""What a newcomer is told to run next: the demo's and sft's last lines name whole README commands that work."""

import json
import shlex

from sinkdlm.cli import main
from sinkdlm.experiments.demo import NEXT_STEPS
from tests.conftest import tiny_train_config
from tests.test_readme import after_the_demo

SHORT = ["--gen-length", "8", "--steps", "8"]  # later options win: seconds on the tiny model
TINY_CONTEXT = 256  # a synthetic SFT line in the tiny corpus's 300-piece BPE fits (as tests/test_readme.py)


def printed(command: str, run: str = "runs/demo") -> list[list[str]]:
    """One NEXT_STEPS line as README's walk splits it: words, `a && b` as two commands."""
    words, commands = shlex.split(command.format(run=run)), []
    while words:
        end = words.index("&&") if "&&" in words else len(words)
        commands.append(words[:end])
        words = words[end + 1:]
    return commands


def test_the_demo_prints_whole_readme_commands_in_readmes_order():
    """Each command the demo prints is a whole README line, every option included (a prefix of README's
    generate line, without its readable decoding, passed the older substring check), in README's order."""
    readme = after_the_demo()
    positions = []
    for command in NEXT_STEPS:
        for argv in printed(command):
            assert argv in readme, f"the demo prints {shlex.join(argv)}; README has no such line"
            positions.append(readme.index(argv))
    assert positions == sorted(positions)


def test_the_demos_generate_command_writes_more_than_whitespace(tiny_data, tmp_path, capsys):
    """The printed generate settings (random remasking, temperature 0.7) give text; the default decoding
    gives the demo model only newlines and full stops (docs/demo-outputs.md)."""
    run = tmp_path / "demo"
    from sinkdlm.training.trainer import train

    train(tiny_train_config(tiny_data, run, steps=3))
    (argv,) = printed(NEXT_STEPS[0], str(run))
    assert "--remasking" in argv and "--temperature" in argv
    capsys.readouterr()
    assert main([*argv[1:], *SHORT, "--format", "jsonl"]) == 0
    completion = json.loads(capsys.readouterr().out.splitlines()[-1])["completion"]
    assert completion.strip(), repr(completion)


def test_sft_ends_with_readmes_next_commands(tiny_data, tmp_path, monkeypatch, capsys):
    """`sinkdlm sft` on the synthetic set ends by naming eval-gsm8k --data synthetic and a generate with the
    SFT prompt template, both README lines (for README's run folder)."""
    from sinkdlm.training.trainer import train

    monkeypatch.chdir(tmp_path)
    cfg = tiny_train_config(tiny_data, "runs/demo", steps=2)
    cfg.model.block_size = TINY_CONTEXT
    train(cfg)
    capsys.readouterr()
    assert main(["sft", "--init-from", "runs/demo", "--out", "runs/demo-sft", f"data.seq_len={TINY_CONTEXT}",
                 "train.max_steps=1", "train.global_batch=2", "train.micro_batch=2", "data.val_windows=2",
                 "train.progress=false"]) == 0
    printed_lines = capsys.readouterr().out.split("next:\n", 1)[1].splitlines()
    commands = [shlex.split(line, comments=True) for line in printed_lines]
    assert [c[:2] for c in commands] == [["sinkdlm", "eval-gsm8k"], ["sinkdlm", "generate"]]
    readme = after_the_demo()
    for argv in commands:
        assert argv in readme, f"sft prints {shlex.join(argv)}; README has no such line"
    assert commands[1][commands[1].index("--prompt") + 1] == "Question: What is 61 + 4?"  # the template's prefix


def test_the_example_prompt_is_a_held_out_problem():
    """What sft prints and README shows asks a problem the model never trained on."""
    from sinkdlm.data.sft import EXAMPLE_QUESTION, synthetic_gsm8k_test

    assert EXAMPLE_QUESTION in {row["question"] for row in synthetic_gsm8k_test()}
