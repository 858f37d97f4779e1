"""sinkdlm.data: sources, tokenizers, the prepared folder and deterministic windows (offline, seconds)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer

from sinkdlm.data import PackedData, fixed_windows, sample_windows
from sinkdlm.data.prepare import ensure_demo_data, prepare
from sinkdlm.data.shards import ShardWriter
from sinkdlm.data.tokenizer import eos_id, load_tokenizer, train_bpe
from sinkdlm.errors import EXIT_BAD_INPUT, UserError

VOCAB = "bpe:300"
WORDS = "the quick brown fox jumps over a lazy dog while seven bold kings sing of night and day".split()
needs_network = pytest.mark.skipif(os.environ.get("SINKDLM_TEST_NETWORK") != "1",
                                   reason="fetches from PyPI; set SINKDLM_TEST_NETWORK=1")


def make_docs(n: int, words_per_doc: int = 120, seed: int = 0) -> list[str]:
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(WORDS, size=words_per_doc)) + "." for _ in range(n)]


@pytest.fixture
def corpus_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "corpus"
    (folder / "nested").mkdir(parents=True)
    docs = make_docs(12)
    for i, doc in enumerate(docs[:10]):
        (folder / f"doc{i:02}.txt").write_text(doc)
    (folder / "nested" / "extra.md").write_text(docs[10])
    (folder / "blank.txt").write_text("  \n")  # skipped: empty documents are dropped
    (folder / "ignored.csv").write_text(docs[11])  # not a corpus suffix
    return folder


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def encoded_lengths(tok: Tokenizer, docs: list[str]) -> list[int]:
    return [len(tok.encode(d, add_special_tokens=False).ids) + 1 for d in docs]  # + EOS


def test_prepare_folder_meta_and_tokens(corpus_dir, tmp_path):
    out = prepare(str(corpus_dir), tmp_path / "out", VOCAB, progress=False)
    data = PackedData(out)
    files = sorted(p for p in corpus_dir.rglob("*") if p.suffix in (".txt", ".md"))
    docs = [p.read_text() for p in files if p.read_text().strip()]
    splits = data.meta["splits"]
    assert data.meta["dtype"] == "uint16" and data.vocab_size == data.tokenizer.get_vocab_size() <= 300
    assert data.eos_id == data.tokenizer.token_to_id("<|endoftext|>")
    assert splits["train"]["n_docs"] + splits["val"]["n_docs"] == len(docs) == 11
    assert splits["val"]["n_docs"] >= 1
    total = splits["train"]["n_tokens"] + splits["val"]["n_tokens"]
    assert total == sum(encoded_lengths(data.tokenizer, docs))
    train, val = data.tokens("train")[:], data.tokens("val")[:]  # the whole split, as arrays
    assert train.dtype == np.uint16 and len(train) == splits["train"]["n_tokens"]
    assert int((train == data.eos_id).sum() + (val == data.eos_id).sum()) == len(docs)
    assert train[-1] == val[-1] == data.eos_id


def test_prepare_jsonl_with_text_field(tmp_path):
    docs = make_docs(6, seed=1)
    path = tmp_path / "c.jsonl"
    path.write_text("".join(json.dumps({"id": i, "body": d}) + "\n" for i, d in enumerate(docs)) + "\n")
    data = PackedData(prepare(str(path), tmp_path / "out", VOCAB, text_field="body", progress=False))
    assert sum(s["n_docs"] for s in data.meta["splits"].values()) == len(docs)
    total = sum(s["n_tokens"] for s in data.meta["splits"].values())
    assert total == sum(encoded_lengths(data.tokenizer, docs))


def test_prepare_is_deterministic_and_max_docs(corpus_dir, tmp_path):
    a = prepare(str(corpus_dir), tmp_path / "a", VOCAB, seed=3, progress=False)
    b = prepare(str(corpus_dir), tmp_path / "b", VOCAB, seed=3, progress=False)
    assert folder_bytes(a) == folder_bytes(b) and "train-00000.bin" in folder_bytes(a)
    c = PackedData(prepare(str(corpus_dir), tmp_path / "c", VOCAB, max_docs=4, progress=False))
    assert sum(s["n_docs"] for s in c.meta["splits"].values()) == 4


def test_one_document_splits_by_tokens(tmp_path):
    path = tmp_path / "book.txt"
    path.write_text(make_docs(1, words_per_doc=400)[0])
    data = PackedData(prepare(str(path), tmp_path / "out", VOCAB, val_fraction=0.1, progress=False))
    n_train, n_val = (len(data.tokens(s)) for s in ("train", "val"))
    assert n_val == pytest.approx(0.1 * (n_train + n_val), abs=1)


def test_overwrite_and_refusal(corpus_dir, tmp_path):
    out = prepare(str(corpus_dir), tmp_path / "out", VOCAB, progress=False)
    with pytest.raises(UserError, match="--overwrite"):
        prepare(str(corpus_dir), out, VOCAB, progress=False)
    (out / "notes.txt").write_text("mine")
    prepare(str(corpus_dir), out, VOCAB, max_docs=3, overwrite=True, progress=False)
    assert (out / "notes.txt").read_text() == "mine"  # only prepared files are replaced
    assert sum(s["n_docs"] for s in PackedData(out).meta["splits"].values()) == 3


def test_overwrite_with_a_bad_corpus_or_a_kill_keeps_the_old_data(corpus_dir, tmp_path, monkeypatch):
    out = prepare(str(corpus_dir), tmp_path / "out", VOCAB, progress=False)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "fine words"}\n{oops\n')
    with pytest.raises(UserError, match="not valid JSON"):
        prepare(str(bad), out, VOCAB, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(ShardWriter, "write", killed)
    with pytest.raises(KeyboardInterrupt):
        prepare(str(corpus_dir), out, VOCAB, max_docs=3, overwrite=True, progress=False)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.jsonl", "corpus", "out"]  # nothing staged is left


@pytest.mark.parametrize("content, match", [
    ('{"text": "fine"}\n{"text": broken}\n', r"bad\.jsonl:2: not valid JSON"),
    ('{"text": "fine"}\n\n{"body": "x"}\n', r"bad\.jsonl:3: expected an object with string field\(s\) 'text'"),
])
def test_bad_jsonl_names_the_line(tmp_path, content, match):
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    with pytest.raises(UserError, match=match):
        prepare(str(path), tmp_path / "out", VOCAB, progress=False)


def test_bad_inputs_raise_user_error(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "a.txt").write_text("\n \n")
    with pytest.raises(UserError, match="is empty"):
        prepare(str(tmp_path / "empty"), tmp_path / "out", VOCAB, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        prepare(str(tmp_path / "missing"), tmp_path / "out", VOCAB, progress=False)
    with pytest.raises(UserError, match="does not exist"):
        PackedData(tmp_path / "missing")
    with pytest.raises(UserError, match="not a prepared data folder"):
        PackedData(tmp_path / "empty")
    with pytest.raises(UserError, match="bpe:N"):
        load_tokenizer("bpe:many", corpus_iter=["x"])
    with pytest.raises(UserError, match="val-fraction"):
        prepare(str(tmp_path / "empty"), tmp_path / "out", VOCAB, val_fraction=1.5, progress=False)


def test_a_crash_leaves_no_prepared_folder(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"text": "fine words here"}) + "\n" + "{oops\n")
    with pytest.raises(UserError):
        prepare(str(path), tmp_path / "out", VOCAB, progress=False)
    assert not (tmp_path / "out" / "meta.json").exists()
    assert not list((tmp_path / "out").glob("*.bin*"))


def test_tokenizer_specs(tmp_path):
    tok = train_bpe(make_docs(5), 280)
    assert eos_id(tok) == tok.token_to_id("<|endoftext|>")
    tok.save(str(tmp_path / "tokenizer.json"))
    text = "the lazy dog sings"
    for spec in (str(tmp_path / "tokenizer.json"), str(tmp_path)):
        assert load_tokenizer(spec).encode(text).ids == tok.encode(text).ids
    assert load_tokenizer(str(tmp_path)).decode(tok.encode(text).ids) == text
    with pytest.raises(UserError, match="does not exist"):
        load_tokenizer("./no/such/tokenizer.json")
    with pytest.raises(UserError, match="end-of-text"):
        eos_id(Tokenizer(type(tok.model)(vocab={"a": 0}, merges=[])))


def test_sample_windows_depend_only_on_seed_step_index():
    tokens = np.arange(10_000, dtype=np.uint16)
    full = sample_windows(tokens, 16, seed=7, step=3, indices=range(8))
    part = sample_windows(tokens, 16, seed=7, step=3, indices=[4, 5])
    assert full.shape == (8, 16) and full.dtype == torch.long
    assert (full[4:6] == part).all()
    assert (full == sample_windows(tokens, 16, seed=7, step=3, indices=range(8))).all()
    assert not (full == sample_windows(tokens, 16, seed=7, step=4, indices=range(8))).all()
    assert not (full == sample_windows(tokens, 16, seed=8, step=3, indices=range(8))).all()
    assert ((full[:, 1:] - full[:, :-1]) == 1).all()  # contiguous windows
    starts = sample_windows(tokens, 16, seed=0, step=0, indices=range(4000))[:, 0].numpy()
    assert starts.min() >= 0 and starts.max() <= len(tokens) - 16
    assert starts.min() < 100 and starts.max() > len(tokens) - 116  # covers the whole split
    with pytest.raises(UserError, match="seq_len"):
        sample_windows(tokens[:10], 16, seed=0, step=0, indices=[0])


def test_fixed_windows_even_and_deterministic():
    tokens = np.arange(1000, dtype=np.uint32)
    w = fixed_windows(tokens, 10, 5)
    assert w[:, 0].tolist() == [0, 248, 495, 742, 990]
    assert (w == fixed_windows(tokens, 10, 5)).all()
    assert len(fixed_windows(tokens[:35], 10, 5)) == 3  # fewer when the split is short
    with pytest.raises(UserError, match="lower data.seq_len"):
        fixed_windows(tokens[:5], 10, 5)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "sinkdlm", "prepare", *args], capture_output=True, text=True)


@pytest.mark.slow
def test_cli_bad_input_exits_2_with_one_line(tmp_path):
    done = run_cli("--source", str(tmp_path / "missing"), "--out", str(tmp_path / "out"))
    assert done.returncode == EXIT_BAD_INPUT
    assert done.stderr.strip().count("\n") == 0
    assert done.stderr.startswith("sinkdlm prepare: error: corpus") and "does not exist" in done.stderr


@pytest.mark.slow
def test_cli_prepares(corpus_dir, tmp_path):
    done = run_cli("--source", str(corpus_dir), "--out", str(tmp_path / "out"), "--tokenizer", VOCAB)
    assert done.returncode == 0, done.stderr
    assert "train" in done.stdout and PackedData(tmp_path / "out").vocab_size <= 300


@needs_network
def test_demo_corpus_and_gpt2(tmp_path, monkeypatch):
    from sinkdlm.data.shakespeare import demo_corpus_texts

    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path / "cache"))
    texts = demo_corpus_texts()
    assert len(texts) == 42 and texts == demo_corpus_texts()  # the second call reads the cache
    out = ensure_demo_data(tmp_path / "demo", vocab_size=1000, progress=False)
    stamp = (out / "meta.json").stat().st_mtime_ns
    assert ensure_demo_data(tmp_path / "demo", vocab_size=1000, progress=False) == out
    assert (out / "meta.json").stat().st_mtime_ns == stamp  # reused, not prepared again
    gpt2 = load_tokenizer("gpt2")
    assert gpt2.get_vocab_size() == 50257 and eos_id(gpt2) == 50256
    assert gpt2.encode("Hello world").ids == [15496, 995]
