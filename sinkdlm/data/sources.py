"""Corpora as streams of documents (str): `demo`, `boolq`, text files/folders, JSONL, `hf:NAME[:CONFIG]`.

`documents(source)` returns a function that starts a fresh stream each call, because preparing
with a tokenizer trained on the corpus reads it twice. Empty documents are skipped.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterator
from pathlib import Path

from sinkdlm.errors import UserError
from sinkdlm.jsonl import read_jsonl
from sinkdlm.optional import require

TEXT_SUFFIXES = (".txt", ".md")
JSONL_SUFFIXES = (".jsonl",)
HF_PREFIX = "hf:"
HF_SPLIT = "train"

DocStream = Callable[[], Iterator[str]]


def documents(source: str, text_field: str = "text") -> DocStream:
    """A restartable document stream for `source` (checked now; files are read lazily)."""
    if source == "demo":
        from sinkdlm.data.demo import demo_corpus_texts

        return lambda: iter(demo_corpus_texts())
    if source == "boolq":
        from sinkdlm.data.boolq import boolq_passages

        return lambda: iter(boolq_passages())
    if source.startswith(HF_PREFIX):
        return lambda: _hf_documents(source[len(HF_PREFIX):], text_field)
    files = corpus_files(Path(source).expanduser())
    return lambda: _non_empty(_file_documents(files, text_field), source)


def describe(source: str) -> str:
    """How meta.json names the source: the demo's provenance, the HF name, or an absolute path."""
    if source == "demo":
        from sinkdlm.data.demo import DESCRIPTION

        return DESCRIPTION
    if source == "boolq":
        from sinkdlm.data.boolq import DESCRIPTION as BOOLQ

        return BOOLQ
    if source.startswith(HF_PREFIX):
        return f"Hugging Face dataset {source[len(HF_PREFIX):]} (split {HF_SPLIT})"
    return str(Path(source).expanduser().resolve())


def corpus_files(path: Path) -> list[Path]:
    """A file itself, or every .txt/.md/.jsonl file under a folder (sorted, recursive)."""
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"corpus {path} does not exist; pass demo, a text/JSONL file or folder, or hf:NAME")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise UserError(f"corpus {path} has no {'/'.join(suffixes)} files; add some or pass another --source")
    return files


def _file_documents(files: list[Path], text_field: str) -> Iterator[str]:
    for file in files:
        if file.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(file, text_field)
        else:
            yield _read_text(file)


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file {file} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"convert it to UTF-8") from None


def _jsonl_documents(file: Path, text_field: str) -> Iterator[str]:
    hint = "; pass --text-field with the field that holds the text"
    for _, record in read_jsonl(file, [text_field], hint):
        yield record[text_field]


def _non_empty(docs: Iterator[str], source: str) -> Iterator[str]:
    """Drop blank documents; UserError if nothing is left."""
    seen = False
    for doc in docs:
        if doc.strip():
            seen = True
            yield doc
    if not seen:
        raise UserError(f"corpus {source} is empty (no non-blank documents); pass a corpus with text")


def _hf_documents(spec: str, text_field: str) -> Iterator[str]:
    """A Hugging Face dataset, streamed (needs `datasets` and the Hub)."""
    name, _, config = spec.partition(":")
    datasets = require("datasets", f"source hf:{spec}")
    try:
        rows = iter(datasets.load_dataset(name, config or None, split=HF_SPLIT, streaming=True))
        first = next(rows, None)
    except Exception as e:  # network, auth and missing-dataset errors have many types
        raise UserError(f"Hugging Face dataset {name!r} could not be loaded ({type(e).__name__}); it needs "
                        f"the Hub: download it where the Hub is reachable and pass the JSONL files") from None
    if first is None:
        raise UserError(f"corpus hf:{spec} is empty (no rows in split {HF_SPLIT}); pass another dataset")
    if text_field not in first:
        raise UserError(f"Hugging Face dataset {name!r} has no field {text_field!r} (fields: "
                        f"{sorted(first)}); pass --text-field")
    yield from _non_empty((row[text_field] for row in itertools.chain([first], rows)), f"hf:{spec}")
