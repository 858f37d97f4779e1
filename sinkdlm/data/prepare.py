"""`sinkdlm prepare`: tokenize a corpus into a packed folder (meta.json, tokenizer.json, train/val .bin).

Streams: documents are read, encoded in batches and appended to the token files, so corpora larger
than memory work. A tokenizer trained here (`bpe:N`) needs a first pass over (at most
TOKENIZER_TRAIN_CHARS of) the corpus.

Train/val split, by document: document i goes to val when a hash of (seed, i) falls below
val_fraction. If that leaves val empty (few documents, e.g. the 42 demo works), the last train
document goes to val instead; a one-document corpus gives the last val_fraction of its tokens.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
from tokenizers import Tokenizer
from tqdm import tqdm

from sinkdlm.data.shards import (FORMAT_VERSION, META_FILE, SPLITS, TMP_SUFFIX, TOKENIZER_FILE, PackedData,
                                 ShardWriter, hash_ints, token_dtype)
from sinkdlm.data.sources import DocStream, describe, documents
from sinkdlm.data.tokenizer import DEFAULT_BPE_VOCAB, eos_id, load_tokenizer
from sinkdlm.errors import UserError

DEFAULT_TOKENIZER = f"bpe:{DEFAULT_BPE_VOCAB}"
DEFAULT_VAL_FRACTION = 0.01
DEFAULT_SEED = 0
TOKENIZER_TRAIN_CHARS = 1_000_000_000  # text a trained BPE sees: plenty for merges, bounded memory
ENCODE_BATCH_DOCS = 256  # documents encoded together (tokenizers parallelises within a batch)
ENCODE_BATCH_CHARS = 8_000_000  # ... unless they are long: bounds the memory of one batch
SPLIT_RULE = ("by document: hash(seed, index) < val_fraction; if val would be empty, the last train "
              "document (or, for one document, its last val_fraction of tokens)")
PREPARED_FILES = [META_FILE, TOKENIZER_FILE, *(f"{s}.bin" for s in SPLITS)]
STAGING_PREFIX = ".preparing-"  # the new folder is written beside --out and moved in only when complete


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--source", required=True,
                        help="demo | boolq | a .txt/.md/.jsonl file or a folder of them | hf:NAME[:CONFIG]")
    parser.add_argument("--out", required=True, help="folder to write (meta.json, tokenizer.json, *.bin)")
    parser.add_argument("--tokenizer", default=DEFAULT_TOKENIZER,
                        help="bpe:N (train on the corpus) | gpt2 | tokenizer.json | HF folder | Hub name "
                             f"(default {DEFAULT_TOKENIZER})")
    parser.add_argument("--text-field", default="text", help="JSONL / HF field holding the text (default text)")
    parser.add_argument("--val-fraction", type=float, default=DEFAULT_VAL_FRACTION,
                        help=f"share of documents held out for validation (default {DEFAULT_VAL_FRACTION})")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seeds the train/val split")
    parser.add_argument("--max-docs", type=int, default=None, help="use only the first N documents")
    parser.add_argument("--overwrite", action="store_true", help="replace a prepared folder at --out")


def run(args: argparse.Namespace) -> int:
    out = prepare(args.source, args.out, args.tokenizer, text_field=args.text_field,
                  val_fraction=args.val_fraction, seed=args.seed, max_docs=args.max_docs,
                  overwrite=args.overwrite)
    print(summary(PackedData(out)))
    return 0


def summary(data: PackedData) -> str:
    splits = data.meta["splits"]
    parts = ", ".join(f"{s} {splits[s]['n_tokens']:,} tokens / {splits[s]['n_docs']:,} docs" for s in SPLITS)
    return f"prepared {data.path}: {parts}; vocab {data.vocab_size:,} ({data.meta['dtype']}), eos id {data.eos_id}"


def prepare(source: str, out: str | Path, tokenizer: str = DEFAULT_TOKENIZER, *, text_field: str = "text",
            val_fraction: float = DEFAULT_VAL_FRACTION, seed: int = DEFAULT_SEED, max_docs: int | None = None,
            overwrite: bool = False, progress: bool = True) -> Path:
    """Tokenize `source` into the folder `out` (see the module docstring); return the folder.

    Everything is written into a hidden sibling folder first; the prepared files of `out` are
    replaced only once it is complete, so a bad corpus or a crash leaves `out` as it was.
    """
    out = Path(out).expanduser()
    _check_settings(val_fraction, max_docs, seed)
    stream = _capped(documents(source, text_field), max_docs)
    _check_out_dir(out, overwrite)
    staging = out.parent / f"{STAGING_PREFIX}{out.name}"
    shutil.rmtree(staging, ignore_errors=True)  # left by a killed run
    staging.mkdir(parents=True)
    try:
        tok = load_tokenizer(tokenizer, corpus_iter=_training_text(stream(), progress))
        writer = ShardWriter(staging, token_dtype(tok.get_vocab_size()))
        try:
            _write_documents(stream(), tok, writer, val_fraction, seed, progress)
        finally:
            writer.close()
        tok.save(str(staging / TOKENIZER_FILE))
        writer.finish({
            "format_version": FORMAT_VERSION, "source": describe(source),
            "settings": _settings(source, tokenizer, text_field, val_fraction, seed, max_docs),
            "seed": seed, "split_rule": SPLIT_RULE, "tokenizer_file": TOKENIZER_FILE,
            "vocab_size": tok.get_vocab_size(), "eos_id": eos_id(tok)})
        _install(staging, out)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return out


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
        return PackedData(out).meta.get("settings") == _settings("demo", f"bpe:{vocab_size}", "text",
                                                                 val_fraction, seed, None)
    except UserError:
        return False


def _settings(source: str, tokenizer: str, text_field: str, val_fraction: float, seed: int,
              max_docs: int | None) -> dict[str, Any]:
    return {"source": source, "tokenizer": tokenizer, "text_field": text_field,
            "val_fraction": val_fraction, "seed": seed, "max_docs": max_docs}


def _check_settings(val_fraction: float, max_docs: int | None, seed: int) -> None:
    if not 0 < val_fraction < 1:
        raise UserError(f"--val-fraction {val_fraction} should be between 0 and 1 (exclusive), e.g. 0.01")
    if max_docs is not None and max_docs < 1:
        raise UserError(f"--max-docs {max_docs} should be a positive number of documents")
    if seed < 0:
        raise UserError(f"--seed {seed} should be >= 0")


def _check_out_dir(out: Path, overwrite: bool) -> None:
    """Refuse a file, or a non-empty folder unless `overwrite` (which replaces only prepared files)."""
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder path")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise UserError(f"--out {out} exists and is not empty; "
                        f"pass --overwrite to replace it or choose another folder")


def _install(staging: Path, out: Path) -> None:
    """Move the complete prepared files into `out`, meta.json last: until then `out` is never a
    mix that looks prepared (its old meta.json goes first), and other files in it stay."""
    out.mkdir(parents=True, exist_ok=True)
    for name in PREPARED_FILES:
        for path in (out / name, out / (name + TMP_SUFFIX)):
            path.unlink(missing_ok=True)
    for name in [*(n for n in PREPARED_FILES if n != META_FILE), META_FILE]:
        os.replace(staging / name, out / name)


def _capped(stream: DocStream, max_docs: int | None) -> DocStream:
    if max_docs is None:
        return stream
    return lambda: (doc for _, doc in zip(range(max_docs), stream()))


def _training_text(docs: Iterator[str], progress: bool) -> Iterator[str]:
    """The documents a trained tokenizer sees: the first TOKENIZER_TRAIN_CHARS characters' worth."""
    used = 0
    for doc in tqdm(docs, desc="training tokenizer", unit="doc", disable=not progress):
        if used >= TOKENIZER_TRAIN_CHARS:
            return
        used += len(doc)
        yield doc


def _encoded(docs: Iterable[str], tok: Tokenizer, eos: int) -> Iterator[np.ndarray]:
    """Each document's ids followed by EOS, encoded in batches (no BOS/template tokens)."""
    batch: list[str] = []
    chars = 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc)
        if len(batch) >= ENCODE_BATCH_DOCS or chars >= ENCODE_BATCH_CHARS:
            yield from _encode_batch(batch, tok, eos)
            batch, chars = [], 0
    yield from _encode_batch(batch, tok, eos)


def _encode_batch(batch: list[str], tok: Tokenizer, eos: int) -> Iterator[np.ndarray]:
    for enc in tok.encode_batch(batch, add_special_tokens=False):
        yield np.array([*enc.ids, eos], dtype=np.int64)


def _in_val(index: int, seed: int, val_fraction: float) -> bool:
    return float(hash_ints(seed, index)[0]) / 2.0**64 < val_fraction


def _write_documents(docs: Iterator[str], tok: Tokenizer, writer: ShardWriter, val_fraction: float,
                     seed: int, progress: bool) -> None:
    """Route each encoded document to train or val (module docstring), streaming to `writer`."""
    bar = tqdm(desc="tokenizing", unit="doc", disable=not progress)
    held = None  # the latest train document, written late in case val would otherwise be empty
    n_docs = 0
    for index, ids in enumerate(_encoded(docs, tok, eos_id(tok))):
        n_docs += 1
        bar.update()
        if _in_val(index, seed, val_fraction):
            writer.write("val", ids)
            continue
        if held is not None:
            writer.write("train", held)
        held = ids
        bar.set_postfix(tokens=f"{sum(writer.n_tokens.values()):,}", refresh=False)
    bar.close()
    if held is None:
        return
    if writer.n_docs["val"] > 0:
        writer.write("train", held)
    elif n_docs > 1:
        writer.write("val", held)
    else:
        cut = len(held) - math.ceil(val_fraction * len(held))
        writer.write("train", held[:cut])
        writer.write("val", held[cut:])
