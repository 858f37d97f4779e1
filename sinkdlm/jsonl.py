"""Reading JSONL files with errors that name the file and line."""

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


def read_jsonl(path: str | Path, required: Sequence[str] = (), hint: str = "") -> Iterator[tuple[int, dict[str, Any]]]:
    """(line number, object) for each non-blank line. Invalid JSON, a non-object, a missing string
    field of `required`, or bytes that are not UTF-8 raise one UserError naming file and line."""
    try:
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, start=1):
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
    except UnicodeDecodeError as e:
        raise UserError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); convert it to UTF-8") from None
