"""Corpora as streams of documents: `demo`, `boolq`, text files/folders, JSONL, `hf:NAME[:CONFIG][@SPLIT]`,
`synthetic:RULE[:key=value,...]` (sinkdlm.data.synthetic).

`documents(source)` returns a function that starts a fresh stream each call (preparing with a
tokenizer trained on the corpus reads it twice) and can start past the first `skip` records, so a
resumed prepare does not tokenize again what it has written. A record is a text file, a non-blank
JSONL line, a Hugging Face row or a demo work; the stream yields (records read so far, text) for
each record kept: blank texts and records a `RecordFilter` rejects are dropped (but counted).
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sinkdlm.data import synthetic
from sinkdlm.errors import UserError
from sinkdlm.jsonl import JSONL_SUFFIXES, is_jsonl, read_jsonl
from sinkdlm.optional import require

TEXT_SUFFIXES = (".txt", ".md")
HF_PREFIX = "hf:"
HF_SPLIT_SEP = "@"
HF_DEFAULT_SPLIT = "train"
FIELD_SEP = "."

Document = tuple[int, str]  # (records read so far, this one included; its text)
DocStream = Callable[[int], Iterator[Document]]  # skip -> documents after the first `skip` records


@dataclass(frozen=True)
class RecordFilter:
    """Which JSON records to keep, by dotted field path: none of `exclude` matches, and one of
    `include` does when any are given. `PATH=VALUE` matches a string field equal to VALUE, or a
    number/bool/null whose JSON spelling is VALUE. A record without the field is an error (a typo
    in the path would otherwise filter nothing)."""

    exclude: tuple[tuple[str, str], ...] = ()
    include: tuple[tuple[str, str], ...] = ()

    @classmethod
    def parse(cls, exclude: Sequence[str] = (), include: Sequence[str] = ()) -> RecordFilter:
        return cls(tuple(_parse_match(s, "--exclude") for s in exclude),
                   tuple(_parse_match(s, "--include") for s in include))

    def __bool__(self) -> bool:
        return bool(self.exclude or self.include)

    def keep(self, record: dict[str, Any], where: str) -> bool:
        if any(_matches(record, m, where, "--exclude") for m in self.exclude):
            return False
        return not self.include or any(_matches(record, m, where, "--include") for m in self.include)


def _parse_match(spec: str, flag: str) -> tuple[str, str]:
    path, sep, value = spec.partition("=")
    if not sep or not path or not all(path.split(FIELD_SEP)):
        raise UserError(f"{flag} {spec!r} should be FIELD=VALUE with a dotted field path, "
                        f"e.g. {flag} meta.redpajama_set_name=RedPajamaGithub")
    return path, value


def _matches(record: dict[str, Any], match: tuple[str, str], where: str, flag: str) -> bool:
    path, value = match
    node: Any = record
    for key in path.split(FIELD_SEP):
        if not isinstance(node, dict) or key not in node:
            fields = sorted(node) if isinstance(node, dict) else type(node).__name__
            raise UserError(f"{where}: no field {path!r} for {flag} {path}={value} (at {key!r}: {fields}); "
                            f"check the field path")
        node = node[key]
    return node == value if isinstance(node, str) else json.dumps(node) == value


def documents(source: str, text_field: str = "text", record_filter: RecordFilter | None = None) -> DocStream:
    """A restartable document stream for `source` (checked now; files are read lazily)."""
    record_filter = record_filter or RecordFilter()
    if source == "demo":
        _require_records(not record_filter, source)
        from sinkdlm.data.shakespeare import demo_corpus_texts

        return lambda skip=0: _kept(_counted(demo_corpus_texts(), skip))
    if source == "boolq":
        _require_records(not record_filter, source)
        from sinkdlm.data.boolq import boolq_passages

        return lambda skip=0: _kept(_counted(boolq_passages(), skip))
    if synthetic.is_synthetic(source):
        _require_records(not record_filter, source)
        synthetic.parse(source)  # bad options fail now
        return lambda skip=0: _kept(_counted(synthetic.documents(source), skip))
    if source.startswith(HF_PREFIX):
        name, config, split = hf_spec(source)
        require("datasets", f"source hf:{name}")  # now, not after the tokenizer is trained or downloaded
        return lambda skip=0: _hf_documents(name, config, split, text_field, record_filter, skip)
    files = corpus_files(Path(source).expanduser())
    _require_records(not record_filter or all(is_jsonl(f) for f in files), source)
    return lambda skip=0: _kept(_file_documents(files, text_field, record_filter, skip))


def describe(source: str) -> str:
    """How meta.json names the source: the demo's provenance, the HF name, or an absolute path."""
    if source == "demo":
        from sinkdlm.data.shakespeare import DESCRIPTION

        return DESCRIPTION
    if source == "boolq":
        from sinkdlm.data.boolq import DESCRIPTION as BOOLQ

        return BOOLQ
    if synthetic.is_synthetic(source):
        return synthetic.describe(source)
    if source.startswith(HF_PREFIX):
        name, config, split = hf_spec(source)
        return f"Hugging Face dataset {name}{f' ({config})' if config else ''}, split {split}"
    return str(Path(source).expanduser().resolve())


def hf_spec(source: str) -> tuple[str, str | None, str]:
    """(name, config or None, split) of `hf:NAME[:CONFIG][@SPLIT]`."""
    rest, sep, split = source[len(HF_PREFIX):].partition(HF_SPLIT_SEP)
    name, _, config = rest.partition(":")
    if not name or (sep and not split):
        raise UserError(f"source {source!r} should be hf:NAME[:CONFIG][@SPLIT], "
                        f"e.g. hf:cerebras/SlimPajama-627B@validation")
    return name, config or None, split or HF_DEFAULT_SPLIT


def corpus_files(path: Path) -> list[Path]:
    """A file itself, or every .txt/.md/.jsonl file under a folder (sorted, recursive)."""
    suffixes = TEXT_SUFFIXES + JSONL_SUFFIXES
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise UserError(f"corpus {path} does not exist; pass demo, boolq, a text/JSONL file or folder, or hf:NAME")
    files = sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in suffixes)
    if not files:
        raise UserError(f"corpus {path} has no {'/'.join(suffixes)} files; add some or pass another --source")
    return files


def _require_records(ok: bool, source: str) -> None:
    if not ok:
        raise UserError(f"--exclude/--include select JSON records, but corpus {source} holds plain text; "
                        f"pass a JSONL file or folder, or hf:NAME, or drop the filters")


def _counted(texts: Iterable[str], skip: int) -> Iterator[Document]:
    """Number records from 1, passing over the first `skip`."""
    return itertools.islice(enumerate(texts, start=1), skip, None)


def _kept(docs: Iterator[tuple[int, str | None]]) -> Iterator[Document]:
    """Drop rejected (None) and blank texts; their records still count."""
    return ((n, text) for n, text in docs if text is not None and text.strip())


def _file_documents(files: list[Path], text_field: str, record_filter: RecordFilter,
                    skip: int) -> Iterator[tuple[int, str | None]]:
    """Every record of every file in order; whole files inside `skip` are passed over unparsed."""
    done = 0  # records in the files before this one
    for file in files:
        if not is_jsonl(file):
            done += 1
            if done > skip:
                yield done, _read_text(file)
            continue
        if done < skip and done + (n := _count_jsonl_records(file)) <= skip:
            done += n  # finished by an earlier run
            continue
        for number, text in enumerate(_jsonl_texts(file, text_field, record_filter), start=done + 1):
            done = number
            if number > skip:
                yield number, text


def _read_text(file: Path) -> str:
    try:
        return file.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UserError(f"corpus file {file} is not UTF-8 text ({e.reason} at byte {e.start}); "
                        f"convert it to UTF-8") from None


def _count_jsonl_records(file: Path) -> int:
    """Non-blank lines, as read_jsonl counts records, without parsing them."""
    try:
        with open(file, encoding="utf-8") as f:
            return sum(1 for line in f if line.strip())
    except UnicodeDecodeError as e:
        raise UserError(f"{file} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None


def _jsonl_texts(file: Path, text_field: str, record_filter: RecordFilter) -> Iterator[str | None]:
    """Each record's text, or None for a record the filter rejects."""
    hint = "; pass --text-field with the field that holds the text"
    for number, record in read_jsonl(file, [text_field], hint):
        yield record[text_field] if record_filter.keep(record, f"{file}:{number}") else None


def _hf_documents(name: str, config: str | None, split: str, text_field: str, record_filter: RecordFilter,
                  skip: int) -> Iterator[Document]:
    """A Hugging Face dataset split, streamed (needs `datasets` and the Hub)."""
    datasets = require("datasets", f"source hf:{name}")
    try:
        rows = iter(datasets.load_dataset(name, config, split=split, streaming=True))
        first = next(rows, None)
    except Exception as e:  # network, auth and missing-dataset errors have many types
        raise UserError(f"Hugging Face dataset {name!r} (split {split}) could not be loaded ({type(e).__name__}); "
                        f"it needs the Hub: download it where the Hub is reachable and pass the JSONL files") from None
    if first is None:
        raise UserError(f"corpus hf:{name} is empty (no rows in split {split}); pass another dataset")
    if text_field not in first:
        raise UserError(f"Hugging Face dataset {name!r} has no field {text_field!r} (fields: "
                        f"{sorted(first)}); pass --text-field")

    def text(number: int, row: dict[str, Any]) -> str | None:
        return row[text_field] if record_filter.keep(row, f"hf:{name} row {number}") else None

    numbered = _counted(itertools.chain([first], rows), skip)
    yield from _kept((number, text(number, row)) for number, row in numbered)
