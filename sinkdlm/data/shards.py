"""The prepared data folder: meta.json + tokenizer.json + one flat token file per split.

Documents are tokenized, each followed by EOS, and concatenated; `<split>.bin` holds the ids as a
raw uint16 array (uint32 when the vocabulary needs it), read back with np.memmap. Training windows
are drawn by a pure function of (seed, step, global sample index), so resuming and changing the
world size give exactly the same batches without replaying anything.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from sinkdlm.errors import UserError
from sinkdlm.files import META_FILE, TMP_SUFFIX, TOKENIZER_FILE, atomic_write

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 1
SPLITS = ("train", "val")
UINT16_VOCAB_LIMIT = 2**16
PREPARE_HINT = "run `sinkdlm prepare --source CORPUS --out DIR` and point data.path at DIR"

# splitmix64 (Steele, Lea & Flood 2014): a cheap, well-mixed hash of 64-bit integers
_SPLITMIX_INCREMENT = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
_UINT64_MASK = 2**64 - 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)


class ShardWriter:
    """Streams token ids into `<split>.bin.tmp`; `finish` renames them and writes meta.json last.

    meta.json is what marks a folder as prepared, so a crash part-way leaves a folder that
    PackedData refuses, never one that looks complete.
    """

    def __init__(self, out: Path, dtype: np.dtype):
        self.out, self.dtype = out, dtype
        self.files = {s: open(self._tmp(s), "wb") for s in SPLITS}
        self.n_tokens = dict.fromkeys(SPLITS, 0)
        self.n_docs = dict.fromkeys(SPLITS, 0)

    def _tmp(self, split: str) -> Path:
        return self.out / f"{split}.bin{TMP_SUFFIX}"

    def write(self, split: str, ids: np.ndarray, docs: int = 1) -> None:
        self.files[split].write(np.asarray(ids, dtype=self.dtype).tobytes())
        self.n_tokens[split] += len(ids)
        self.n_docs[split] += docs

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Close, rename the token files into place and write meta.json (+ split counts); return it."""
        self.close()
        meta = dict(meta, dtype=self.dtype.name, splits={})
        for split in SPLITS:
            os.replace(self._tmp(split), self.out / f"{split}.bin")
            meta["splits"][split] = {"file": f"{split}.bin", "n_tokens": self.n_tokens[split],
                                     "n_docs": self.n_docs[split]}
        atomic_write(self.out / META_FILE, json.dumps(meta, indent=2) + "\n")
        return meta

    def close(self) -> None:
        for f in self.files.values():
            f.close()


def read_meta(path: Path) -> dict[str, Any]:
    """meta.json of a prepared folder, checked; UserError naming the folder otherwise."""
    if not path.is_dir():
        raise UserError(f"data folder {path} does not exist; {PREPARE_HINT}")
    meta_path = path / META_FILE
    if not meta_path.is_file():
        raise UserError(f"{path} is not a prepared data folder (no {META_FILE}); {PREPARE_HINT}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}); prepare the folder again") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path} has format_version {meta.get('format_version')!r}, this sinkdlm "
                        f"reads {FORMAT_VERSION}; prepare the folder again with this version")
    return meta


class PackedData:
    """A folder made by `sinkdlm prepare`: `.meta`, `.vocab_size`, `.eos_id`, `.tokenizer`, `.tokens(split)`."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser()
        self.meta = read_meta(self.path)

    @property
    def vocab_size(self) -> int:
        return int(self.meta["vocab_size"])

    @property
    def eos_id(self) -> int:
        return int(self.meta["eos_id"])

    @cached_property
    def tokenizer(self) -> Tokenizer:
        return Tokenizer.from_file(str(self.path / self.meta["tokenizer_file"]))

    def tokens(self, split: str) -> np.memmap:
        """The split's token ids, memory-mapped read-only (never loaded whole)."""
        splits = self.meta["splits"]
        if split not in splits:
            raise UserError(f"data folder {self.path} has no split {split!r}; it has {sorted(splits)}")
        info, dtype = splits[split], np.dtype(self.meta["dtype"])
        if info["n_tokens"] == 0:
            raise UserError(f"split {split!r} of {self.path} is empty; prepare it from a larger corpus "
                            f"or a larger --val-fraction")
        file = self.path / info["file"]
        expected = info["n_tokens"] * dtype.itemsize
        if not file.is_file() or file.stat().st_size != expected:
            raise UserError(f"{file} is missing or not {expected} bytes as meta.json says; prepare the folder again")
        return np.memmap(file, dtype=dtype, mode="r", shape=(info["n_tokens"],))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    with np.errstate(over="ignore"):  # uint64 wrap-around is the point
        x = x + _SPLITMIX_INCREMENT
        x = (x ^ (x >> np.uint64(30))) * _SPLITMIX_MUL1
        x = (x ^ (x >> np.uint64(27))) * _SPLITMIX_MUL2
        return x ^ (x >> np.uint64(31))


def hash_ints(*keys: int | Sequence[int] | np.ndarray) -> np.ndarray:
    """A uint64 hash per element of the last key, chained through the earlier (scalar) keys."""
    h = np.zeros(1, dtype=np.uint64)
    for key in keys:
        arr = np.asarray([k & _UINT64_MASK for k in np.atleast_1d(key).tolist()], dtype=np.uint64)
        h = _splitmix64(h ^ arr)
    return h


def window_starts(n_tokens: int, seq_len: int, seed: int, step: int, indices: Sequence[int]) -> np.ndarray:
    """Start of window i: a hash of (seed, step, i), uniform over [0, n_tokens - seq_len]."""
    n_starts = n_tokens - seq_len + 1
    if n_starts < 1:
        raise UserError(f"the training split has {n_tokens} tokens, fewer than one window of "
                        f"data.seq_len={seq_len}; lower data.seq_len or add data")
    # modulo bias is at most n_starts / 2**64: negligible
    return (hash_ints(seed, step, list(indices)) % np.uint64(n_starts)).astype(np.int64)


def sample_windows(tokens: np.ndarray, seq_len: int, seed: int, step: int,
                   indices: Sequence[int]) -> torch.Tensor:
    """(len(indices), seq_len) LongTensor; window i depends only on (seed, step, i), not on `indices`."""
    starts = window_starts(len(tokens), seq_len, seed, step, indices)
    return _gather(tokens, starts, seq_len)


def fixed_windows(tokens: np.ndarray, seq_len: int, n: int) -> torch.Tensor:
    """Up to n non-overlapping windows evenly spaced over the split (validation; no randomness)."""
    count = min(n, len(tokens) // seq_len)
    if count < 1:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than one window of "
                        f"data.seq_len={seq_len}; lower data.seq_len or add data (or a larger --val-fraction)")
    starts = np.linspace(0, len(tokens) - seq_len, count).round().astype(np.int64)
    return _gather(tokens, starts, seq_len)


def _gather(tokens: np.ndarray, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    import torch  # here, not at the top: `sinkdlm prepare` need not pay torch's import time

    if len(starts) == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    rows = np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts.tolist()])
    return torch.from_numpy(rows)
