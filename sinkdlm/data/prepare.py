"""`sinkdlm prepare`: tokenize a corpus into a prepared folder (meta.json, tokenizer.json, token shards).

Streams: documents are read in order, encoded in chunks by `workers` processes (results are taken
in order, so any number of workers writes the same bytes) and appended to fixed-size shards, so
corpora far larger than memory work. A tokenizer trained here (`bpe:N`) needs a first pass over (at
most TOKENIZER_TRAIN_CHARS of) the corpus.

Resumable: everything is written into a hidden staging folder beside `out`. Each time a shard is
filled, a progress record (records read, shard sizes) is saved there; after a stop (Ctrl-C, a kill,
a crash) the same command continues from the last record, without tokenizing the finished part
again (it is re-read to be skipped; JSONL files wholly inside it are only line-counted). A stop
before the first filled shard leaves nothing. The complete folder replaces the prepared files of
`out` at the end, meta.json last, so `out` is never a mix that looks prepared.

Train/val split, by document: document i goes to val when a hash of (seed, i) falls below
val_fraction. If that leaves val empty (few documents, e.g. the 42 demo works), the last train
document goes to val instead; a one-document corpus gives the last val_fraction of its tokens.
With `val_source`, that corpus is the validation split (read first, whole) and `source` is all train.
"""

from __future__ import annotations

import itertools
import json
import math
import multiprocessing
import os
import re
import shutil
import signal
import sys
from collections import deque
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from sinkdlm.data import synthetic
from sinkdlm.data.shards import (
    DEFAULT_SHARD_TOKENS,
    FORMAT_VERSION,
    SHARD_SUFFIX,
    SPLITS,
    PackedData,
    ShardWriter,
    StaleState,
    hash_ints,
    token_dtype,
    write_json_atomic,
)
from sinkdlm.data.sources import DocStream, RecordFilter, describe, documents
from sinkdlm.data.tokenizer import DEFAULT_BPE_VOCAB, eos_id, load_tokenizer
from sinkdlm.errors import UserError
from sinkdlm.files import META_FILE, TMP_SUFFIX, TOKENIZER_FILE

DEFAULT_TOKENIZER = f"bpe:{DEFAULT_BPE_VOCAB}"
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SEED = 0
TOKENIZER_TRAIN_CHARS = 1_000_000_000  # text a trained BPE sees: plenty for merges, bounded memory
CHUNK_CHARS = 2**21  # text per task sent to a worker: large enough to amortise the transfer
IN_FLIGHT_PER_WORKER = 2  # tasks queued per worker: keeps workers busy, bounds memory
SPLIT_RULE = ("by document: hash(seed, index) < val_fraction; if val would be empty, the last train "
              "document (or, for one document, its last val_fraction of tokens)")
VAL_SOURCE_RULE = "val = every document of val_source (read first); train = every document of source"
STAGING_PREFIX = ".preparing-"  # the new folder is written beside --out and moved in only when complete
PROGRESS_FILE = "progress.json"  # in the staging folder: where a stopped prepare continues
SHARD_PATTERN = re.compile(rf"({'|'.join(SPLITS)})(-\d+)?{re.escape(SHARD_SUFFIX)}({re.escape(TMP_SUFFIX)})?")


def default_workers() -> int:
    """The CPU cores this process may use."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def summary(data: PackedData) -> str:
    splits = data.meta["splits"]
    parts = ", ".join(f"{s} {splits[s]['n_tokens']:,} tokens / {splits[s]['n_docs']:,} docs in "
                      f"{len(splits[s]['shards'])} shard(s)" for s in SPLITS)
    read = "; ".join(f"{r['documents']:,} documents of {r['records']:,} records read from {r['source']}"
                     for r in data.meta["read"])
    task = f"\n{synthetic.summary_line(data.meta['task'])}" if data.meta.get("task") else ""
    return (f"prepared {data.path}: {parts}; vocab {data.vocab_size:,} ({data.meta['dtype']}), "
            f"eos id {data.eos_id}; {read}{task}")


def prepare(source: str, out: str | Path, tokenizer: str | None = None, *, text_field: str = "text",
            val_fraction: float | None = None, val_source: str | None = None, seed: int = DEFAULT_SEED,
            max_docs: int | None = None, max_tokens: int | None = None,
            shard_tokens: int = DEFAULT_SHARD_TOKENS, exclude: list[str] | tuple[str, ...] = (),
            include: list[str] | tuple[str, ...] = (), workers: int = 1, overwrite: bool = False,
            progress: bool = True) -> Path:
    """Tokenize `source` into the folder `out` (see the module docstring); return the folder.

    Everything is checked before anything is written, and `out` is changed only at the end.
    `tokenizer` None: the word-level symbol tokenizer for a synthetic source, else DEFAULT_TOKENIZER.
    """
    out = Path(out).expanduser()
    tokenizer = _tokenizer_for(source, tokenizer)
    if val_fraction is None and val_source is None:
        val_fraction = DEFAULT_VAL_FRACTION
    settings = _settings(source, tokenizer, text_field, val_fraction, val_source, seed, max_docs, max_tokens,
                         shard_tokens, exclude, include)
    _check_settings(settings, workers)
    record_filter = RecordFilter.parse(exclude, include)
    streams = _streams(source, val_source, text_field, record_filter)
    _check_out_dir(out, overwrite)
    header = {"format_version": FORMAT_VERSION, "source": describe(source),
              "val_source": describe(val_source) if val_source else None, "settings": settings, "seed": seed,
              "split_rule": VAL_SOURCE_RULE if val_source else SPLIT_RULE, "tokenizer_file": TOKENIZER_FILE}
    if synthetic.is_synthetic(source):  # the rule, triggers, Bayes-optimal accuracy: what the probes read
        header["task"] = synthetic.task_meta(source)
    staging = out.parent / f"{STAGING_PREFIX}{out.name}"
    saved = _continuable(staging, header, shard_tokens)
    done = False
    try:
        if saved is None and tokenizer == synthetic.TOKENIZER_SPEC:
            tok = synthetic.symbol_tokenizer(source)
            tok.save(str(staging / TOKENIZER_FILE))
        elif saved is None:
            tok = load_tokenizer(tokenizer, corpus_iter=_training_text(streams, max_docs, progress))
            tok.save(str(staging / TOKENIZER_FILE))
        else:
            tok = Tokenizer.from_file(str(staging / TOKENIZER_FILE))
        meta = dict(header, vocab_size=tok.get_vocab_size(), eos_id=eos_id(tok))
        job = _Job(streams, staging, header, token_dtype(meta["vocab_size"]), settings, saved)
        job.run(tok, meta["eos_id"], workers, progress)
        job.writer.finish(dict(meta, read=job.read_summary()))
        _install(staging, out)
        done = True
    finally:
        _leave_staging(staging, done)
    return out


def _tokenizer_for(source: str, tokenizer: str | None) -> str:
    """The tokenizer spec to use: a synthetic corpus takes only its symbol tokenizer, and only it takes that."""
    if synthetic.is_synthetic(source):
        if tokenizer not in (None, synthetic.TOKENIZER_SPEC):
            raise UserError(f"--tokenizer {tokenizer} does not fit --source {source}: a synthetic corpus has its "
                            f"own word-level tokenizer over its symbols; drop --tokenizer")
        return synthetic.TOKENIZER_SPEC
    if tokenizer == synthetic.TOKENIZER_SPEC:
        raise UserError(f"--tokenizer {tokenizer} is only for --source synthetic:...; pass bpe:N, gpt2 or a "
                        f"tokenizer.json for {source}")
    return tokenizer or DEFAULT_TOKENIZER


def ensure_demo_data(out_dir: str | Path, vocab_size: int = DEFAULT_BPE_VOCAB,
                     val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SEED,
                     progress: bool = True) -> Path:
    """The demo corpus prepared in `out_dir`, reusing it when it was prepared with the same settings."""
    out = Path(out_dir).expanduser()
    if demo_data_ready(out, vocab_size, val_fraction, seed):
        return out
    return prepare("demo", out, f"bpe:{vocab_size}", val_fraction=val_fraction, seed=seed, overwrite=True,
                   progress=progress)


def demo_data_ready(out: Path, vocab_size: int = DEFAULT_BPE_VOCAB, val_fraction: float = DEFAULT_VAL_FRACTION,
                    seed: int = DEFAULT_SEED) -> bool:
    """Whether `out` holds the demo corpus prepared with these settings (an old or broken folder: no)."""
    if not (out / META_FILE).is_file():
        return False
    try:
        meta = PackedData(out).meta
    except UserError:
        return False
    return meta.get("format_version") == FORMAT_VERSION and meta.get("settings") == _settings(
        "demo", f"bpe:{vocab_size}", "text", val_fraction, None, seed, None, None, DEFAULT_SHARD_TOKENS, (), ())


def _settings(source: str, tokenizer: str, text_field: str, val_fraction: float | None, val_source: str | None,
              seed: int, max_docs: int | None, max_tokens: int | None, shard_tokens: int,
              exclude: list[str] | tuple[str, ...], include: list[str] | tuple[str, ...]) -> dict[str, Any]:
    """What defines the prepared data (meta.json's `settings`; a stopped prepare continues only under the same)."""
    return {"source": source, "tokenizer": tokenizer, "text_field": text_field, "val_fraction": val_fraction,
            "val_source": val_source, "seed": seed, "max_docs": max_docs, "max_tokens": max_tokens,
            "shard_tokens": shard_tokens, "exclude": list(exclude), "include": list(include)}


def _check_settings(s: dict[str, Any], workers: int) -> None:
    if s["val_fraction"] is not None and s["val_source"] is not None:
        raise UserError(f"--val-fraction {s['val_fraction']} and --val-source {s['val_source']} both choose the "
                        f"validation split; pass only one")
    if s["val_fraction"] is not None and not 0 < s["val_fraction"] < 1:
        raise UserError(f"--val-fraction {s['val_fraction']} should be between 0 and 1 (exclusive), e.g. 0.01")
    for flag, key, what in (("--max-docs", "max_docs", "documents"), ("--max-tokens", "max_tokens", "tokens"),
                            ("--shard-tokens", "shard_tokens", "tokens per shard")):
        if s[key] is not None and s[key] < 1:
            raise UserError(f"{flag} {s[key]} should be a positive number of {what}")
    if s["seed"] < 0:
        raise UserError(f"--seed {s['seed']} should be >= 0")
    if workers < 1:
        raise UserError(f"--workers {workers} should be >= 1 (1 = tokenize in this process)")


Stream = tuple[str, str | None, DocStream]  # (its option: source | val_source, its split or None: by hash, docs)


def _streams(source: str, val_source: str | None, text_field: str, record_filter: RecordFilter) -> list[Stream]:
    """The corpora in reading order; the last one is --source."""
    train = documents(source, text_field, record_filter)
    if val_source is None:
        return [("source", None, train)]
    return [("val_source", "val", documents(val_source, text_field, record_filter)), ("source", "train", train)]


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite` (which replaces only prepared files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; "
                        f"pass --overwrite to replace it or choose another folder")


def _continuable(staging: Path, header: dict[str, Any], shard_tokens: int) -> dict[str, Any] | None:
    """The saved progress of a stopped prepare with this header in `staging` (its shards cut back to
    it), or None after emptying `staging` for a fresh start."""
    saved, problem = _saved_progress(staging, header, shard_tokens)
    if saved is not None:
        shards = sum(len(s["shards"]) for s in saved["writer"].values())
        print(f"continuing the stopped prepare in {staging} ({shards} shard(s) written)", file=sys.stderr)
        return saved
    if problem:
        print(f"starting over: the stopped prepare in {staging} {problem}", file=sys.stderr)
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    return None


def _saved_progress(staging: Path, header: dict[str, Any], shard_tokens: int) -> tuple[dict[str, Any] | None, str]:
    """(the progress saved in `staging`, "") if a prepare with this header can continue from it, else
    (None, why not; "" when there is nothing to continue)."""
    path = staging / PROGRESS_FILE
    if not path.is_file():
        return None, ""
    try:
        saved = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None, "has an unreadable progress record"
    if saved.get("header") != header:
        return None, "had other settings"
    try:
        if not (staging / TOKENIZER_FILE).is_file():
            raise StaleState(f"its {TOKENIZER_FILE} is missing")
        ShardWriter(staging, np.dtype(saved["dtype"]), shard_tokens, saved["writer"]).close()
    except StaleState as e:
        return None, f"is damaged ({e})"
    return saved, ""


def _leave_staging(staging: Path, done: bool) -> None:
    """Remove the staging folder unless a stopped prepare can continue from it."""
    if not done and (staging / PROGRESS_FILE).is_file():
        print(f"prepare stopped; its finished shards are kept in {staging}: run the same command again "
              f"to continue", file=sys.stderr)
        return
    shutil.rmtree(staging, ignore_errors=True)


def _install(staging: Path, out: Path) -> None:
    """Move the complete prepared files into `out`, meta.json last: until then `out` is never a
    mix that looks prepared (its old meta.json goes first), and other files in it stay."""
    out.mkdir(parents=True, exist_ok=True)
    (out / META_FILE).unlink(missing_ok=True)
    for path in out.iterdir():
        if path.name in (TOKENIZER_FILE, META_FILE + TMP_SUFFIX) or SHARD_PATTERN.fullmatch(path.name):
            path.unlink()
    new = [p for p in staging.iterdir() if SHARD_PATTERN.fullmatch(p.name)]
    for path in [*sorted(new), staging / TOKENIZER_FILE, staging / META_FILE]:
        os.replace(path, out / path.name)


def _training_text(streams: list[Stream], max_docs: int | None,
                   progress: bool) -> Iterator[str]:
    """The documents a trained tokenizer sees: the first TOKENIZER_TRAIN_CHARS characters' worth of the
    source (the train corpus)."""
    used = 0
    docs = itertools.islice(streams[-1][2](0), max_docs)
    for _, doc in tqdm(docs, desc="training tokenizer", unit="doc", disable=not progress):
        if used >= TOKENIZER_TRAIN_CHARS:
            return
        used += len(doc)
        yield doc


def _in_val(index: int, seed: int, val_fraction: float) -> bool:
    return float(hash_ints(seed, index)[0]) / 2.0**64 < val_fraction


class _Job:
    """One prepare's tokenizing pass: reads the streams from the saved position, routes each
    encoded document to its split (module docstring), and saves progress after each filled shard."""

    def __init__(self, streams: list[Stream], staging: Path, header: dict[str, Any],
                 dtype: np.dtype, settings: dict[str, Any], saved: dict[str, Any] | None):
        self.streams, self.staging, self.header, self.settings = streams, staging, header, settings
        self.writer = ShardWriter(staging, dtype, settings["shard_tokens"], saved and saved["writer"])
        # per stream: records read up to its last document used, and documents used
        self.read = saved["read"] if saved else [{"records": 0, "documents": 0} for _ in streams]
        self.last_train = saved["last_train"] if saved else 0  # tokens of the latest train document

    def run(self, tok: Tokenizer, eos: int, workers: int, progress: bool) -> None:
        bar = tqdm(desc="tokenizing", unit="doc", disable=not progress,
                   initial=sum(r["documents"] for r in self.read))
        encoded = _ordered_map(_encode_texts, _chunks(self._documents()), workers, _start_encoder,
                               (tok.to_str(), eos, self.writer.dtype.name))
        try:
            for tags, (ids, lengths) in encoded:
                for (stream, records), doc in zip(tags, np.split(ids, np.cumsum(lengths)[:-1])):
                    if not self._add(stream, records, doc):
                        return self._finish()
                    bar.update()
                bar.set_postfix(tokens=f"{sum(self.writer.n_tokens.values()):,}", refresh=False)
        finally:
            encoded.close()  # stops the workers
            bar.close()
        self._finish()

    def _documents(self) -> Iterator[tuple[tuple[int, int], str]]:
        """((stream, records read), text): each stream from where the saved progress left it (a
        finished one yields nothing more), the source up to max_docs."""
        for stream, (name, _, docs) in enumerate(self.streams):
            done, cap = self.read[stream], None
            if name == "source" and self.settings["max_docs"] is not None:
                cap = self.settings["max_docs"] - done["documents"]
            for records, text in itertools.islice(docs(done["records"]), cap):
                yield (stream, records), text

    def _add(self, stream: int, records: int, ids: np.ndarray) -> bool:
        """Write one document where it belongs; False when it would pass --max-tokens (stop)."""
        split = self.streams[stream][1]
        index = self.read[stream]["documents"]
        if split is None:
            split = "val" if _in_val(index, self.settings["seed"], self.settings["val_fraction"]) else "train"
        budget = self.settings["max_tokens"]
        if split == "train":
            if budget is not None and self.writer.n_tokens["train"] + len(ids) > budget:
                return False
            self.last_train = len(ids)
        self.writer.write(split, ids)
        self.read[stream] = {"records": records, "documents": index + 1}
        if self.writer.filled:
            self._save()
        return True

    def _save(self) -> None:
        write_json_atomic(self.staging / PROGRESS_FILE, {
            "header": self.header, "dtype": self.writer.dtype.name, "writer": self.writer.state(),
            "read": self.read, "last_train": self.last_train})

    def _finish(self) -> None:
        """Refuse an empty result; give val the last train document if the hash gave it none (module docstring)."""
        for (name, _, _), read in zip(self.streams, self.read):
            if read["documents"] == 0:
                raise UserError(self._empty_message(name))
        writer = self.writer
        if self.streams[-1][1] is not None or writer.n_docs["val"] > 0 or writer.n_docs["train"] == 0:
            return
        if writer.n_docs["train"] > 1:
            writer.write("val", writer.take_last("train", self.last_train))
        else:  # one document: its last val_fraction of tokens
            writer.write("val", writer.take_last("train", math.ceil(self.settings["val_fraction"] * self.last_train),
                                                 docs=0))

    def _empty_message(self, name: str) -> str:
        s = self.settings
        if name == "source" and s["max_tokens"] is not None:
            return (f"no document of {s['source']} fits --max-tokens {s['max_tokens']} (or it is empty); "
                    f"raise --max-tokens")
        filtered = " or every record is filtered out" if s["exclude"] or s["include"] else ""
        return f"corpus {s[name]} is empty (no non-blank documents{filtered}); pass a corpus with text"

    def read_summary(self) -> list[dict[str, Any]]:
        """meta.json's `read`: per corpus, the records read up to its last document used, and the documents."""
        return [dict(read, source=self.header[name]) for (name, _, _), read in zip(self.streams, self.read)]


def _chunks(docs: Iterator[tuple[Any, str]]) -> Iterator[tuple[list[Any], list[str]]]:
    """(tags, texts) in groups of about CHUNK_CHARS characters (a longer document is a chunk alone)."""
    tags: list[Any] = []
    texts: list[str] = []
    chars = 0
    for tag, text in docs:
        tags.append(tag)
        texts.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS:
            yield tags, texts
            tags, texts, chars = [], [], 0
    if texts:
        yield tags, texts


def _ordered_map(fn: Callable[[Any], Any], tasks: Iterator[tuple[Any, Any]], workers: int,
                 initializer: Callable[..., None], initargs: tuple[Any, ...]) -> Iterator[tuple[Any, Any]]:
    """(tag, fn(arg)) for each (tag, arg) of `tasks`, in order. `workers` > 1: computed by that many
    spawned processes (each set up by `initializer(*initargs)`) with at most IN_FLIGHT_PER_WORKER tasks
    per worker queued, so memory stays flat; 1: here."""
    if workers == 1:
        initializer(*initargs)
        yield from ((tag, fn(arg)) for tag, arg in tasks)
        return
    with multiprocessing.get_context("spawn").Pool(workers, initializer, initargs) as pool:
        pending: deque[tuple[Any, Any]] = deque()
        for tag, arg in tasks:
            pending.append((tag, pool.apply_async(fn, (arg,))))
            if len(pending) >= IN_FLIGHT_PER_WORKER * workers:
                first, result = pending.popleft()
                yield first, result.get()
        while pending:
            first, result = pending.popleft()
            yield first, result.get()


_encoder: tuple[Tokenizer, int, np.dtype] | None = None  # this process's (tokenizer, eos id, dtype)


def _start_encoder(tokenizer_json: str, eos: int, dtype: str) -> None:
    """Set up a tokenizing process. Ctrl-C is left to the parent, which stops the pool (no traceback per worker)."""
    global _encoder
    if multiprocessing.parent_process() is not None:
        signal.signal(signal.SIGINT, signal.SIG_IGN)
    _encoder = (Tokenizer.from_str(tokenizer_json), eos, np.dtype(dtype))


def _encode_texts(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """The texts' ids, each followed by EOS (no BOS/template tokens), concatenated; and their lengths.
    One text at a time: a worker uses one core, so --workers says how many are busy."""
    assert _encoder is not None, "_start_encoder runs first"
    tok, eos, dtype = _encoder
    ids = [np.array([*tok.encode(text, add_special_tokens=False).ids, eos], dtype=dtype) for text in texts]
    return np.concatenate(ids), np.array([len(x) for x in ids], dtype=np.int64)
