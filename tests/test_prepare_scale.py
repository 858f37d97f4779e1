"""`sinkdlm prepare` at scale: worker processes, fixed-size shards, resuming a stopped prepare,
record filters, a corpus's own validation split and a token budget (offline, seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from sinkdlm.commands import prepare as prepare_command
from sinkdlm.data import PackedData, sample_windows
from sinkdlm.data import prepare as prep
from sinkdlm.data.shards import ShardWriter
from sinkdlm.data.sources import RecordFilter, documents
from sinkdlm.errors import EXIT_BAD_INPUT, UserError
from tests.test_data import VOCAB, folder_bytes, make_docs

SHARD = 97  # tokens per shard in these tests: many shards, documents spanning them
SETS = ("RedPajamaC4", "RedPajamaGithub", "RedPajamaBook")


def write_jsonl(path: Path, docs: list[str], sets=SETS) -> Path:
    lines = [json.dumps({"text": d, "meta": {"redpajama_set_name": sets[i % len(sets)], "n": i}})
             for i, d in enumerate(docs)]
    path.write_text("\n".join(lines[:3]) + "\n\n" + "\n".join(lines[3:]) + "\n")  # a blank line is no record
    return path


@pytest.fixture
def jsonl_corpus(tmp_path: Path) -> Path:
    folder = tmp_path / "jsonl"
    folder.mkdir()
    docs = make_docs(60, words_per_doc=30, seed=4)
    write_jsonl(folder / "a.jsonl", docs[:25])
    write_jsonl(folder / "b.jsonl", docs[25:])
    return folder


@pytest.fixture
def tokenizer_file(jsonl_corpus: Path, tmp_path: Path) -> str:
    """A tokenizer trained once, so the prepares below are a single tokenizing pass."""
    out = prep.prepare(str(jsonl_corpus), tmp_path / "tok", VOCAB, progress=False)
    return str(out / "tokenizer.json")


def test_one_and_two_workers_write_identical_shards(jsonl_corpus, tokenizer_file, tmp_path, monkeypatch):
    monkeypatch.setattr(prep, "CHUNK_CHARS", 500)  # many chunks in flight, finishing out of order
    one = prep.prepare(str(jsonl_corpus), tmp_path / "one", tokenizer_file, shard_tokens=SHARD, progress=False)
    two = prep.prepare(str(jsonl_corpus), tmp_path / "two", tokenizer_file, shard_tokens=SHARD, workers=2,
                       progress=False)
    assert folder_bytes(one) == folder_bytes(two)
    assert len(PackedData(one).meta["splits"]["train"]["shards"]) > 5


def test_shards_are_fixed_size_and_read_as_one_split(jsonl_corpus, tokenizer_file, tmp_path):
    whole = PackedData(prep.prepare(str(jsonl_corpus), tmp_path / "whole", tokenizer_file, progress=False))
    cut = PackedData(prep.prepare(str(jsonl_corpus), tmp_path / "cut", tokenizer_file, shard_tokens=SHARD,
                                  progress=False))
    shards = cut.meta["splits"]["train"]["shards"]
    assert all(s["n_tokens"] == SHARD for s in shards[:-1]) and 0 < shards[-1]["n_tokens"] <= SHARD
    assert sum(s["n_tokens"] for s in shards) == cut.meta["splits"]["train"]["n_tokens"]
    assert cut.meta["n_tokens"] == sum(cut.meta["splits"][s]["n_tokens"] for s in ("train", "val"))
    files = np.concatenate([np.fromfile(cut.path / s["file"], dtype=np.uint16) for s in shards])
    a, b = whole.tokens("train"), cut.tokens("train")
    assert len(a) == len(b) == len(files) and np.array_equal(a[:], files) and np.array_equal(b[:], files)
    for start, stop in ((0, 5), (SHARD - 3, SHARD + 4), (SHARD - 1, 3 * SHARD + 2), (len(b) - 7, len(b))):
        assert np.array_equal(b[start:stop], files[start:stop])  # spanning shard boundaries
    assert b[SHARD] == files[SHARD] and b[-1] == files[-1] == cut.eos_id
    windows = [sample_windows(t, 40, seed=1, step=2, indices=range(16)) for t in (a, b)]
    assert (windows[0] == windows[1]).all()


def interrupt_after(monkeypatch, writes: int) -> None:
    """Make the n-th ShardWriter.write raise KeyboardInterrupt (Ctrl-C) part-way through a prepare."""
    real, count = ShardWriter.write, [0]

    def write(self, *args, **kwargs):
        count[0] += 1
        if count[0] == writes:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(ShardWriter, "write", write)


def count_encoded(monkeypatch) -> list[int]:
    encoded, real = [0], prep._encode_texts

    def encode(texts):
        encoded[0] += len(texts)
        return real(texts)

    monkeypatch.setattr(prep, "_encode_texts", encode)
    return encoded


def test_a_stopped_prepare_continues_to_the_same_bytes(jsonl_corpus, tokenizer_file, tmp_path, monkeypatch, capsys):
    args = (str(jsonl_corpus), tmp_path / "out", tokenizer_file)
    straight = folder_bytes(prep.prepare(*args[:1], tmp_path / "straight", args[2], shard_tokens=SHARD,
                                         progress=False))
    interrupt_after(monkeypatch, 40)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(*args, shard_tokens=SHARD, progress=False)
    staging = tmp_path / ".preparing-out"
    assert (staging / "progress.json").is_file() and not (tmp_path / "out").exists()
    assert "run the same command again" in capsys.readouterr().err
    monkeypatch.undo()
    encoded = count_encoded(monkeypatch)
    prep.prepare(*args, shard_tokens=SHARD, progress=False)
    assert "continuing the stopped prepare" in capsys.readouterr().err
    assert folder_bytes(tmp_path / "out") == straight
    assert 0 < encoded[0] < 58  # 58 non-blank documents: the finished part was not encoded again
    assert not staging.exists()


@pytest.mark.parametrize("change, message", [("seed", "had other settings"), ("shard", "is damaged"),
                                             ("progress", "has an unreadable progress record")])
def test_a_stopped_prepare_that_cannot_continue_starts_over(jsonl_corpus, tokenizer_file, tmp_path, monkeypatch,
                                                            capsys, change, message):
    interrupt_after(monkeypatch, 40)
    with pytest.raises(KeyboardInterrupt):
        prep.prepare(str(jsonl_corpus), tmp_path / "out", tokenizer_file, shard_tokens=SHARD, progress=False)
    monkeypatch.undo()
    staging, seed = tmp_path / ".preparing-out", 5 if change == "seed" else 0
    if change == "shard":
        (staging / "train-00000.bin").unlink()
    if change == "progress":
        (staging / "progress.json").write_text("{torn")
    out = prep.prepare(str(jsonl_corpus), tmp_path / "out", tokenizer_file, shard_tokens=SHARD, seed=seed,
                       progress=False)
    assert f"starting over: the stopped prepare in {staging} {message}" in capsys.readouterr().err
    expected = prep.prepare(str(jsonl_corpus), tmp_path / "expected", tokenizer_file, shard_tokens=SHARD,
                            seed=seed, progress=False)
    assert folder_bytes(out) == folder_bytes(expected)


KILL_SCRIPT = """
import os, sys
from sinkdlm.cli import main
from sinkdlm.data.shards import ShardWriter
real, saved = ShardWriter.state, [0]
def state(self):
    saved[0] += 1
    if saved[0] == int(os.environ["KILL_AFTER_SAVES"]) + 1:
        os._exit(9)  # like SIGKILL: no cleanup, unflushed buffers lost, progress of the previous save stands
    return real(self)
ShardWriter.state = state
sys.exit(main(sys.argv[1:]))
"""


def test_a_killed_prepare_continues_to_the_same_bytes(jsonl_corpus, tokenizer_file, tmp_path):
    """A hard kill (os._exit in the middle of a save, two workers running) in a real process; the same
    command again finishes it, byte for byte as a prepare that never stopped."""
    command = ["prepare", "--source", str(jsonl_corpus), "--tokenizer", tokenizer_file,
               "--shard-tokens", str(SHARD), "--workers", "2"]
    env = {**os.environ, "KILL_AFTER_SAVES": "4", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    killed = subprocess.run([sys.executable, "-c", KILL_SCRIPT, *command, "--out", str(tmp_path / "out")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert killed.returncode == 9, killed.stderr
    assert json.loads((tmp_path / ".preparing-out" / "progress.json").read_text())["read"][0]["documents"] > 0
    resumed = subprocess.run([sys.executable, "-m", "sinkdlm", *command, "--out", str(tmp_path / "out")],
                             capture_output=True, text=True, env=env, timeout=300)
    assert resumed.returncode == 0 and "continuing" in resumed.stderr, resumed.stderr
    straight = prep.prepare(str(jsonl_corpus), tmp_path / "straight", tokenizer_file, shard_tokens=SHARD,
                            progress=False)
    assert folder_bytes(tmp_path / "out") == folder_bytes(straight)


def test_exclude_and_include_filter_json_records(jsonl_corpus, tokenizer_file, tmp_path):
    github = "meta.redpajama_set_name=RedPajamaGithub"
    data = PackedData(prep.prepare(str(jsonl_corpus), tmp_path / "ex", tokenizer_file, exclude=[github],
                                   progress=False))
    assert sum(data.meta["splits"][s]["n_docs"] for s in ("train", "val")) == 40  # 20 of 60 are GitHub
    assert data.meta["settings"]["exclude"] == [github] and data.meta["read"][0]["documents"] == 40
    only = PackedData(prep.prepare(str(jsonl_corpus), tmp_path / "in", tokenizer_file, include=[github, "meta.n=3"],
                                   progress=False))
    assert sum(only.meta["splits"][s]["n_docs"] for s in ("train", "val")) == 22  # GitHub, and n=3 of each file
    docs = make_docs(60, words_per_doc=30, seed=4)
    text = only.tokenizer.decode(only.tokens("train")[:].tolist() + only.tokens("val")[:].tolist())
    assert docs[1] in text and docs[3] in text and docs[28] in text and docs[0] not in text


def test_filter_bad_input_is_refused_before_anything_is_written(jsonl_corpus, tmp_path):
    for bad in ("meta.redpajama_set_name", "=x", "meta..name=x"):
        with pytest.raises(UserError, match="FIELD=VALUE"):
            prep.prepare(str(jsonl_corpus), tmp_path / "out", VOCAB, exclude=[bad], progress=False)
    with pytest.raises(UserError, match=r"a\.jsonl:1: no field 'meta\.redpajama_setname'"):
        prep.prepare(str(jsonl_corpus), tmp_path / "out", VOCAB, exclude=["meta.redpajama_setname=x"],
                     progress=False)
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("words")
    with pytest.raises(UserError, match="plain text"):
        prep.prepare(str(tmp_path / "text"), tmp_path / "out", VOCAB, include=["a=b"], progress=False)
    with pytest.raises(UserError, match="every record is filtered out"):
        prep.prepare(str(jsonl_corpus), tmp_path / "out", VOCAB, include=["meta.n=-1"], progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".preparing-*"))


def test_val_source_is_the_validation_split(jsonl_corpus, tokenizer_file, tmp_path):
    val_docs = make_docs(5, words_per_doc=20, seed=9)
    val = write_jsonl(tmp_path / "val.jsonl", val_docs)
    data = PackedData(prep.prepare(str(jsonl_corpus), tmp_path / "out", tokenizer_file, val_source=str(val),
                                   shard_tokens=SHARD, exclude=["meta.redpajama_set_name=RedPajamaGithub"],
                                   progress=False))
    splits = data.meta["splits"]
    assert splits["train"]["n_docs"] == 40 and splits["val"]["n_docs"] == 3  # the filter applies to both
    assert data.meta["val_source"] == str(val) and data.meta["settings"]["val_fraction"] is None
    kept = [d for i, d in enumerate(val_docs) if SETS[i % 3] != "RedPajamaGithub"]
    assert data.tokenizer.decode(data.tokens("val")[:].tolist()) == "".join(kept)
    with pytest.raises(UserError, match="pass only one"):
        prep.prepare(str(jsonl_corpus), tmp_path / "x", VOCAB, val_source=str(val), val_fraction=0.1, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prep.prepare(str(jsonl_corpus), tmp_path / "x", VOCAB, val_source=str(tmp_path / "nope"), progress=False)


def test_max_tokens_keeps_whole_documents_within_the_budget(jsonl_corpus, tokenizer_file, tmp_path):
    full = PackedData(prep.prepare(str(jsonl_corpus), tmp_path / "full", tokenizer_file, val_fraction=0.5,
                                   progress=False))
    budget = 1000
    data = PackedData(prep.prepare(str(jsonl_corpus), tmp_path / "cut", tokenizer_file, max_tokens=budget,
                                   val_fraction=0.5, shard_tokens=SHARD, progress=False))
    n = data.meta["splits"]["train"]["n_tokens"]
    train = data.tokens("train")[:]
    assert n <= budget and train[-1] == data.eos_id
    assert np.array_equal(train, full.tokens("train")[:n])  # a prefix of the full split
    next_doc = np.flatnonzero(full.tokens("train")[:] == full.eos_id)
    assert next_doc[np.searchsorted(next_doc, n - 1) + 1] + 1 > budget  # the next document would not fit
    with pytest.raises(UserError, match="fits --max-tokens 3"):
        prep.prepare(str(jsonl_corpus), tmp_path / "tiny", tokenizer_file, max_tokens=3, progress=False)


def test_skipping_records_resumes_the_same_stream(jsonl_corpus):
    """A resumed prepare passes over the records it finished; the rest of the stream is unchanged."""
    books = documents(str(jsonl_corpus), record_filter=RecordFilter.parse(["meta.redpajama_set_name=RedPajamaBook"]))
    (jsonl_corpus / "c.txt").write_text("a text file is one record")
    (jsonl_corpus / "d.txt").write_text("  \n")  # blank: a record, never a document
    stream = documents(str(jsonl_corpus))
    full, no_books = list(stream(0)), list(books(0))
    assert full[-1] == (61, "a text file is one record") and len(full) == 61 and len(no_books) == 41
    for skip in (0, 1, 3, 24, 25, 26, 60, 61, 62):
        assert list(stream(skip)) == [d for d in full if d[0] > skip]
        assert list(books(skip)) == [d for d in no_books if d[0] > skip]


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sinkdlm", "prepare", *args], capture_output=True, text=True)


@pytest.mark.parametrize("extra, message", [
    (["--exclude", "meta.redpajama_set_name"], "FIELD=VALUE"),
    (["--workers", "0"], "--workers 0"),
    (["--max-tokens", "0"], "--max-tokens 0"),
    (["--val-source", "/no/such/corpus"], "does not exist"),
    (["--val-source", "hf:name@"], "hf:NAME"),
])
def test_cli_bad_input_exits_2_with_one_line(jsonl_corpus, tmp_path, extra, message):
    done = run_cli("--source", str(jsonl_corpus), "--out", str(tmp_path / "out"), *extra)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr
    assert done.stderr.strip().count("\n") == 0 and message in done.stderr
    assert not (tmp_path / "out").exists()


def test_a_format_1_folder_still_reads(tmp_path):
    """Folders prepared before shards (one <split>.bin each) read as one shard per split."""
    tokens = {"train": np.arange(500, dtype=np.uint16), "val": np.arange(50, dtype=np.uint16)}
    for split, ids in tokens.items():
        ids.tofile(tmp_path / f"{split}.bin")
    meta = {"format_version": 1, "vocab_size": 600, "eos_id": 0, "dtype": "uint16", "tokenizer_file": "tokenizer.json",
            "splits": {s: {"file": f"{s}.bin", "n_tokens": len(t), "n_docs": 1} for s, t in tokens.items()}}
    (tmp_path / "meta.json").write_text(json.dumps(meta))
    data = PackedData(tmp_path)
    assert np.array_equal(data.tokens("train")[:], tokens["train"])
    windows = sample_windows(data.tokens("train"), 16, seed=0, step=0, indices=range(4))
    assert (windows == sample_windows(tokens["train"], 16, seed=0, step=0, indices=range(4))).all()


def test_the_documented_slimpajama_command_parses_to_the_github_filter():
    """README's and docs/prepare.md's command for the paper's data stays a valid command with SMDM's filter."""
    import argparse
    import re
    import shlex

    root = Path(__file__).resolve().parents[1]
    readme = re.search(r"`(sinkdlm prepare --source hf:cerebras/SlimPajama-627B[^`]*)`",
                       (root / "README.md").read_text())
    block = re.search(r"```bash\n(sinkdlm prepare --source hf:cerebras/SlimPajama-627B.*?)```",
                      (root / "docs" / "prepare.md").read_text(), re.S)
    for command in (readme.group(1), block.group(1).replace("\\\n", " ")):
        parser = argparse.ArgumentParser()
        prepare_command.configure(parser)
        args = parser.parse_args(shlex.split(command)[2:])
        assert args.exclude == ["meta.redpajama_set_name=RedPajamaGithub"]
        assert args.val_source == "hf:cerebras/SlimPajama-627B@validation"
        assert RecordFilter.parse(args.exclude).exclude == (("meta.redpajama_set_name", "RedPajamaGithub"),)


def test_hf_sources_name_their_split():
    from sinkdlm.data.sources import describe, hf_spec

    assert hf_spec("hf:cerebras/SlimPajama-627B") == ("cerebras/SlimPajama-627B", None, "train")
    assert hf_spec("hf:allenai/c4:en@validation") == ("allenai/c4", "en", "validation")
    assert describe("hf:allenai/c4:en@validation") == "Hugging Face dataset allenai/c4 (en), split validation"
    for bad in ("hf:", "hf:name@", "hf:@train"):
        with pytest.raises(UserError, match=r"hf:NAME\[:CONFIG\]\[@SPLIT\]"):
            hf_spec(bad)
