"""Every command on a core install: an optional package it needs is named in one line, before any download.

Each case runs a command's real entry path (sinkdlm.cli.main) with one optional module made unimportable
(as on `pip install -e .` without extras) and downloads forbidden, and asserts exit code 2, one line of
stderr naming the extra, and no download. `--help` of every command works with all of them blocked.
"""

from __future__ import annotations

import importlib.abc
import json
import os
import re
import socket
import sys
import types
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.cli import COMMANDS, main
from sinkdlm.config import Config
from sinkdlm.data import fetch
from sinkdlm.errors import UserError
from sinkdlm.model import DLM
from sinkdlm.optional import DEPENDENCIES, available, install_hint
from tests.conftest import tiny

OWN = "sinkdlm"
BPE_VOCAB = 300
TEXT = ["The cat sat on the mat.", "Sarah ran home fast.", "Question: Which is a planet? Answer: Mars"] * 4


class Blocker(importlib.abc.MetaPathFinder):
    """A finder ahead of all others that refuses `roots` and their submodules, as if not installed."""

    def __init__(self, roots: set[str]):
        self.roots = roots

    def find_spec(self, fullname, path=None, target=None):
        if fullname.partition(".")[0] in self.roots:
            raise ModuleNotFoundError(f"No module named {fullname!r} (blocked by the test)", name=fullname)


def _origin(value: object) -> str | None:
    """The module a global comes from: a module's own name, a function's or class's __module__."""
    if isinstance(value, types.ModuleType):
        return value.__name__
    if isinstance(value, (type, types.FunctionType, types.BuiltinFunctionType)):
        return getattr(value, "__module__", None)
    return None


def _within(name: str | None, roots: set[str]) -> bool:
    return name is not None and any(name == r or name.startswith(r + ".") for r in roots)


def _holders(roots: set[str]) -> set[str]:
    """The blocked modules already imported, and every sinkdlm module whose globals hold one of them (or
    a module that does, transitively): a fresh process would fail importing those, so they go too.
    A package's own submodules do not count (a package holds them as attributes)."""
    gone = {name for name in sys.modules if _within(name, roots)}
    grew = True
    while grew:
        grew = False
        for name, module in list(sys.modules.items()):
            if name in gone or module is None or not _within(name, {OWN}):
                continue
            held = (_origin(v) for v in vars(module).values())
            if any(h in gone or _within(h, roots) for h in held if h and not h.startswith(name + ".")):
                gone.add(name)
                grew = True
    return gone


@contextmanager
def blocked(*modules: str) -> Iterator[None]:
    """`modules` (import names) unimportable inside the block: a sys.meta_path finder refuses them, and
    they and the sinkdlm modules holding them leave sys.modules; all is restored on leaving, the parent
    packages' attributes too (a re-import overwrites them)."""
    roots = set(modules)
    before = set(sys.modules)
    blocker = Blocker(roots)
    with pytest.MonkeyPatch.context() as mp:
        for name in sorted(_holders(roots)):
            parent, _, child = name.rpartition(".")
            if parent in sys.modules and hasattr(sys.modules[parent], child):
                # gone from the parent too: `from sinkdlm.analysis import plots` takes a parent's attribute
                # without importing again, and would hand out the copy that holds the blocked module
                mp.delattr(sys.modules[parent], child)
            mp.delitem(sys.modules, name)
        if "tensorboard" in roots:  # Lightning decides from package metadata, which no finder hides
            import lightning.fabric.loggers.tensorboard as lightning_tb

            mp.setattr(lightning_tb, "_TENSORBOARD_AVAILABLE", False)
            mp.setattr(lightning_tb, "_TENSORBOARDX_AVAILABLE", False)
        sys.meta_path.insert(0, blocker)
        try:
            yield
        finally:
            sys.meta_path.remove(blocker)
            for name in set(sys.modules) - before:  # copies imported while blocked, some half-imported
                if _within(name, roots | {OWN}):
                    del sys.modules[name]


class DownloadAttempted(BaseException):
    """Raised by a blocked download; a BaseException so that no `except Exception` swallows it."""


@pytest.fixture
def downloads(monkeypatch, tmp_path) -> list[str]:
    """The downloads a command attempted (each fails the command at once): pip downloads, wherever a
    module imported pip_download, and any network connection (the Hub, lazily imported clients)."""
    attempts: list[str] = []

    def refuse(what: str) -> None:
        attempts.append(what)
        raise DownloadAttempted(what)

    original = fetch.pip_download
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "pip_download", None) is original:
            monkeypatch.setattr(module, "pip_download", lambda req, *a, **k: refuse(f"pip download {req}"))
    monkeypatch.setattr(socket, "create_connection", lambda address, *a, **k: refuse(f"connect {address}"))
    monkeypatch.setattr(socket.socket, "connect", lambda self, address: refuse(f"connect {address}"))
    monkeypatch.setenv(fetch.CACHE_ENV, str(tmp_path / "cache"))  # nothing fetched earlier is reused
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    return attempts


def make_checkpoint(root: Path, sink_tokens: int) -> Path:
    """A tiny random checkpoint with a byte-level BPE."""
    root.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(root / "tokenizer.json"))
    cfg = Config(model=tiny(vocab_size=tok.get_vocab_size(), sink_tokens=sink_tokens))
    torch.manual_seed(0)
    return save_checkpoint(root / "run", 1, DLM(cfg.model).state_dict(), cfg, {"eos_id": 0},
                           tokenizer=root / "tokenizer.json")


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    """A sink model's checkpoint and a plain one's (export --llama takes only the plain variant)."""
    root = tmp_path_factory.mktemp("checkpoints")
    return {"sink": make_checkpoint(root / "sink", 1), "plain": make_checkpoint(root / "plain", 0)}


def hf_folder(root: Path) -> Path:
    """What `convert` takes for a Hugging Face causal LM: config.json and model.safetensors."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    save_file({"model.embed_tokens.weight": torch.zeros(4, 4)}, str(root / "model.safetensors"))
    return root


def gguf_file(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "model.gguf").write_bytes(b"GGUF")
    return root / "model.gguf"


def corpus(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text(" ".join(TEXT))
    return root


def files_under(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


# (case, optional module, argv builder(tmp_path, checkpoints)): every optional module a command's path needs
CASES = [
    ("data benchmarks", "lm_eval", lambda tmp, ck: ["data", "benchmarks"]),
    ("data benchmarks", "pyarrow", lambda tmp, ck: ["data", "benchmarks"]),
    ("data benchmarks gsm8k", "lm_eval", lambda tmp, ck: ["data", "benchmarks", "--tasks", "gsm8k"]),
    ("data benchmarks arc", "pyarrow",
     lambda tmp, ck: ["data", "benchmarks", "--tasks", "arc_easy", "--cache-dir", str(tmp / "c")]),
    ("eval", "lm_eval", lambda tmp, ck: ["eval", "--checkpoint", str(ck["sink"]), "--tasks", "arc_easy"]),
    ("eval", "pyarrow", lambda tmp, ck: ["eval", "--checkpoint", str(ck["sink"]), "--tasks", "arc_easy"]),
    ("eval gsm8k", "lm_eval", lambda tmp, ck: ["eval", "--checkpoint", str(ck["sink"]), "--tasks", "gsm8k"]),
    ("analyze", "matplotlib", lambda tmp, ck: ["analyze", "--checkpoint", str(ck["sink"]), "--out", str(tmp / "a"),
                                               "--text", str(corpus(tmp / "corpus") / "a.txt")]),
    ("analyze over training", "matplotlib",
     lambda tmp, ck: ["analyze", "--checkpoint", str(ck["sink"].parent), "--checkpoint-steps", "all",
                      "--text", str(corpus(tmp / "corpus") / "a.txt"), "--out", str(tmp / "a")]),
    ("convert folder", "transformers",
     lambda tmp, ck: ["convert", "--from", str(hf_folder(tmp / "hf")), "--out", str(tmp / "o")]),
    *[("convert gguf", module, lambda tmp, ck: ["convert", "--from", str(gguf_file(tmp / "g")), "--out",
                                                str(tmp / "o")])
      for module in ("gguf", "accelerate", "transformers")],
    *[("convert known gguf", module, lambda tmp, ck: ["convert", "--from", "smollm2-135m", "--out",
                                                      str(tmp / "o")])
      for module in ("gguf", "accelerate", "transformers")],
    ("convert hub name", "transformers",
     lambda tmp, ck: ["convert", "--from", "someone/some-model", "--out", str(tmp / "o")]),
    ("export --llama", "transformers",
     lambda tmp, ck: ["export", "--checkpoint", str(ck["plain"]), "--out", str(tmp / "x"), "--llama"]),
    ("prepare hf", "datasets",
     lambda tmp, ck: ["prepare", "--source", "hf:someone/corpus", "--out", str(tmp / "p"), "--workers", "1"]),
    ("prepare hf gpt2", "datasets",
     lambda tmp, ck: ["prepare", "--source", "hf:someone/corpus", "--out", str(tmp / "p"), "--workers", "1",
                      "--tokenizer", "gpt2"]),
    ("prepare hf val", "datasets",
     lambda tmp, ck: ["prepare", "--source", str(corpus(tmp / "corpus")), "--val-source", "hf:someone/corpus",
                      "--out", str(tmp / "p"), "--workers", "1"]),
    ("study", "matplotlib",
     lambda tmp, ck: ["study", "--preset", "demo", "--out", str(tmp / "s"), "--steps", "1", "--tasks", ""]),
    *[("eval-generation", module, lambda tmp, ck: ["eval-generation", "--checkpoint", str(ck["sink"]), "--out",
                                                   str(tmp / "g"), "--mauve", "on"])
      for module in ("sacrebleu", "matplotlib", "transformers", "gguf", "accelerate", "mauve")],
    ("eval-length", "matplotlib",
     lambda tmp, ck: ["eval-length", "--checkpoint", str(ck["sink"]), "--out", str(tmp / "l")]),
    *[("serve", module, lambda tmp, ck: ["serve", "--checkpoint", str(ck["sink"]), "--port", "0"])
      for module in ("fastapi", "uvicorn")],
]


@pytest.mark.parametrize("case, module, argv", CASES, ids=[f"{c} without {m}" for c, m, _ in CASES])
def test_a_missing_extra_is_one_line_before_any_download(case, module, argv, checkpoints, tmp_path,
                                                         capsys, downloads):
    args = argv(tmp_path, checkpoints)
    inputs = files_under(tmp_path)
    capsys.readouterr()
    with blocked(module):
        code = main(args)
    err = capsys.readouterr().err
    assert downloads == [], f"sinkdlm {case} downloaded before saying {module} is missing"
    assert files_under(tmp_path) == inputs, f"sinkdlm {case} wrote files before saying {module} is missing"
    assert code == 2, f"sinkdlm {' '.join(args)}: exit {code}, stderr {err!r}"
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"sinkdlm {args[0]}: error: "), err
    assert install_hint(module) in lines[0], err


@pytest.mark.parametrize("command", list(COMMANDS))
def test_help_imports_no_optional_package(command, capsys, downloads):
    with blocked(*DEPENDENCIES):
        assert main([command, "--help"]) == 0
        if command == "data":
            assert main([command, "benchmarks", "--help"]) == 0
    assert "usage: sinkdlm" in capsys.readouterr().out
    assert downloads == []


def test_data_benchmarks_help_names_the_extra(capsys):
    assert main(["data", "benchmarks", "--help"]) == 0
    assert install_hint("lm_eval") in " ".join(capsys.readouterr().out.split())


def test_the_blocker_hides_a_module_and_restores_it():
    import pyarrow

    with blocked("pyarrow"):
        assert not available("pyarrow") and "pyarrow" not in sys.modules
        with pytest.raises(ModuleNotFoundError):
            import pyarrow.ipc
    assert sys.modules["pyarrow"] is pyarrow and available("pyarrow")


def test_train_without_tensorboard_logs_to_the_others_and_names_the_extra(tiny_data, tmp_path, capsys, downloads):
    """tensorboard is a default logger used where installed: training goes on and says how to get it."""
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump({
        "model": {"preset": "tiny", "sink_tokens": 1},
        "data": {"path": str(tiny_data), "seq_len": 32, "val_windows": 4},
        "optim": {"lr": 1e-3, "warmup_min_steps": 1},
        "train": {"out_dir": str(tmp_path / "run"), "global_batch": 2, "micro_batch": 2, "max_steps": 1,
                  "log_every": 1, "val_every": 1, "save_every": 1, "sink_monitor_every": 1, "progress": False,
                  "loggers": ["csv", "tensorboard"]}}))
    with blocked("tensorboard"):
        assert main(["train", "--config", str(recipe)]) == 0
    out, err = capsys.readouterr()
    assert f"tensorboard is not installed ({install_hint('tensorboard')})" in out + err
    assert "Traceback" not in err and downloads == []
    assert not (tmp_path / "run" / "tb").exists() and (tmp_path / "run" / "csv").is_dir()


def test_the_training_figure_without_matplotlib_is_one_line():
    from sinkdlm.analysis.training import plot_training

    with blocked("matplotlib"), pytest.raises(UserError, match=re.escape(install_hint("matplotlib"))):
        plot_training([], Path("unused.png"), "sinks over training")


CORE_INSTALL = """
import sys
from tests.test_optional_blocked import Blocker
from sinkdlm.data import fetch
from sinkdlm.optional import DEPENDENCIES

def refuse(requirement, *args, **kwargs):
    sys.exit(f"downloaded {requirement} before the check")

fetch.pip_download = refuse
sys.meta_path.insert(0, Blocker(set(DEPENDENCIES)))
from sinkdlm.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.mark.slow
def test_data_benchmarks_on_a_fresh_core_install(tmp_path):
    """The issue's report as it happened: a new process, no extra installed, README's `sinkdlm data benchmarks`."""
    import subprocess

    env = {**os.environ, fetch.CACHE_ENV: str(tmp_path), "OMP_NUM_THREADS": "1"}
    done = subprocess.run([sys.executable, "-c", CORE_INSTALL, "data", "benchmarks"], capture_output=True,
                          text=True, check=False, cwd=Path(__file__).parents[1], env=env, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sinkdlm data: error: ") and install_hint("lm_eval") in lines[0]
