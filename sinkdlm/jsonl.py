"""Reading a user's text and JSONL files with errors that name the file, the line and the byte."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from sinkdlm.errors import UserError

# file names read as JSON Lines wherever a data file may be JSONL or plain text (SFT data, prompts,
# corpora); a one-document .json fails on its second line, naming it
JSONL_SUFFIXES = (".jsonl", ".json")


def is_jsonl(path: str | Path) -> bool:
    return Path(path).suffix.lower() in JSONL_SUFFIXES


def not_utf8(path: str | Path, line: int, offset: int, error: UnicodeDecodeError) -> UserError:
    """The refusal of a file that is not UTF-8: where (line, byte offset in the file), what byte, the fix.
    Refused rather than decoded with replacement characters, which would change the text unseen."""
    p = Path(path)
    bad = error.object[error.start:error.start + 1].hex()
    converted = p.with_name(f"{p.stem}.utf8{p.suffix}")
    return UserError(f"{path}:{line}: byte {offset} (0x{bad}) is not UTF-8 ({error.reason}); convert the file "
                     f"to UTF-8, e.g. from Latin-1: iconv -f latin1 -t utf-8 {path} > {converted}")


def text_lines(path: str | Path) -> Iterator[tuple[int, str]]:
    """(line number, text) for each line of a UTF-8 file, its newline kept; bytes that are not UTF-8
    raise one UserError naming the line and the byte's offset in the file. Streams: a corpus may be large."""
    offset = 0  # of the line's first byte in the file (a text-mode error counts from its read buffer)
    try:
        f = open(path, "rb")
    except OSError as e:
        raise UserError(f"{path} cannot be read ({e.strerror}); pass a readable UTF-8 text file") from None
    with f:
        for number, raw in enumerate(f, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as e:
                raise not_utf8(path, number, offset + e.start, e) from None
            offset += len(raw)
            yield number, line


def read_text(path: str | Path) -> str:
    """A user's whole UTF-8 text file (prompts, text to analyse); a UserError names a byte that is not UTF-8."""
    return "".join(line for _, line in text_lines(path))


def read_jsonl(path: str | Path, required: Sequence[str] = (), hint: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line. Invalid JSON, a non-object, a missing string
    field of `required`, or bytes that are not UTF-8 raise one UserError naming file and line."""
    for number, line in text_lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise UserError(f"{path}:{number}: not valid JSON ({e.msg}); fix or remove that line") from None
        missing = [k for k in required if not (isinstance(row, dict) and isinstance(row.get(k), str))]
        if not isinstance(row, dict) or missing:
            fields = ", ".join(repr(k) for k in (missing or required))
            raise UserError(f"{path}:{number}: expected an object with string field(s) {fields}{hint}")
        yield number, row
