"""Writing files: atomically, and with the permissions any other file of the user gets.

`atomic_open`/`atomic_write` write beside the target and rename over it, so a crash or a kill leaves
the old file or the new one, never half of one. Files get the mode `open()` gives (0666 minus the
umask): some writers (safetensors' `save_file`) create 0600 files, which the other users of a shared
run folder cannot read; `use_umask` puts such a file right.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from pathlib import Path
from typing import IO

TMP_SUFFIX = ".tmp"  # a file being written; renamed into place when complete
# file names more than one module reads or writes
TOKENIZER_FILE = "tokenizer.json"  # a `tokenizers` tokenizer, in prepared data folders and checkpoints
META_FILE = "meta.json"  # what a prepared data folder or a checkpoint says about itself
METRICS_LOG = "metrics.jsonl"  # a run's training log, one JSON object per line
NEW_FILE_MODE = 0o666  # what open() asks for; the umask takes away from it


def _umask() -> int:
    mask = os.umask(0)  # the only way to read it is to set it; set it straight back
    os.umask(mask)
    return mask


def use_umask(path: str | Path) -> None:
    """Set a file's mode to what `open()` would have created it with."""
    os.chmod(path, NEW_FILE_MODE & ~_umask())


def temporary_name(path: str | Path) -> Path:
    """Where `path` is written before it is renamed into place: beside it, so the rename is atomic."""
    p = Path(path)
    return p.with_name(p.name + TMP_SUFFIX)


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "w") -> Iterator[IO]:
    """A file ("w": UTF-8 text, "wb": bytes) that replaces `path` when the block ends; an error in the
    block leaves `path` as it was and removes the partial file."""
    target, tmp = Path(path), temporary_name(path)
    try:
        with open(tmp, mode, **({} if "b" in mode else {"encoding": "utf-8"})) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, target)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write(path: str | Path, data: str | bytes) -> Path:
    """Write `data` to `path` through `atomic_open`; returns the path."""
    with atomic_open(path, "wb" if isinstance(data, bytes) else "w") as f:
        f.write(data)
    return Path(path)
