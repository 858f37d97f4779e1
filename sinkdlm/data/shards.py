"""The prepared data folder: meta.json + tokenizer.json + each split's tokens in fixed-size shards.

Documents are tokenized, each followed by EOS, and concatenated; the split's token stream is cut
into shard files `<split>-NNNNN.bin` of `shard_tokens` ids each (the last one shorter), raw uint16
(uint32 when the vocabulary needs it), read back with np.memmap. A split reads as one array
(`SplitTokens`), so a window may span two shards. Folders of format 1 (one `<split>.bin` per split)
read as a single shard.

Training windows are drawn by a pure function of (seed, step, global sample index), so resuming and
changing the world size give exactly the same batches without replaying anything. Two orders:
`random` (a window may start anywhere; drawn with replacement) and `epoch` (every pass over the data
visits each non-overlapping window once, in a shuffled order: SMDM's).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Sequence
from functools import cached_property, lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from tokenizers import Tokenizer

from sinkdlm.errors import UserError
from sinkdlm.files import META_FILE, atomic_write

if TYPE_CHECKING:
    import torch

FORMAT_VERSION = 2
READABLE_VERSIONS = (1, 2)  # 1: one <split>.bin per split
SPLITS = ("train", "val")
SHARD_SUFFIX = ".bin"
DEFAULT_SHARD_TOKENS = 2**27  # 256 MiB of uint16 per shard: ~4,700 shards for all of SlimPajama
MAX_OPEN_SHARDS = 256  # memory maps kept open per split (each holds a file descriptor)
UINT16_VOCAB_LIMIT = 2**16
FEISTEL_ROUNDS = 6  # rounds of the keyed permutation behind the epoch order (>= 4 mix well)
PREPARE_HINT = "run `sinkdlm prepare --source CORPUS --out DIR` and point data.path at DIR"

# splitmix64 (Steele, Lea & Flood 2014): a cheap, well-mixed hash of 64-bit integers
_SPLITMIX_INCREMENT = np.uint64(0x9E3779B97F4A7C15)
_SPLITMIX_MUL1 = np.uint64(0xBF58476D1CE4E5B9)
_SPLITMIX_MUL2 = np.uint64(0x94D049BB133111EB)
_UINT64_MASK = 2**64 - 1


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= UINT16_VOCAB_LIMIT else np.uint32)


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:05d}{SHARD_SUFFIX}"


def empty_state() -> dict[str, dict[str, Any]]:
    """A ShardWriter state with nothing written."""
    return {split: {"shards": [], "n_docs": 0} for split in SPLITS}


class StaleState(Exception):
    """The shard files on disk do not hold what a saved ShardWriter state says."""


class ShardWriter:
    """Appends each split's tokens to shard files `<split>-NNNNN.bin` of `shard_tokens` ids in `folder`.

    `state()` flushes to disk and returns what is written: per split the token count of each shard
    (all full but the last) and the documents. A writer built from such a state continues exactly
    there, cutting off whatever was written after it (StaleState if the files fall short).
    `filled` counts the shards filled since the last `state()`.
    """

    def __init__(self, folder: Path, dtype: np.dtype, shard_tokens: int, state: dict[str, Any] | None = None):
        self.folder, self.dtype, self.shard_tokens = folder, np.dtype(dtype), shard_tokens
        state = state or empty_state()
        self.shards = {s: list(state[s]["shards"]) for s in SPLITS}
        self.n_docs = {s: int(state[s]["n_docs"]) for s in SPLITS}
        self.files: dict[str, Any] = dict.fromkeys(SPLITS)
        self.filled = 0
        for split in SPLITS:
            self._restore(split)

    @property
    def n_tokens(self) -> dict[str, int]:
        return {s: sum(self.shards[s]) for s in SPLITS}

    def _path(self, split: str, index: int) -> Path:
        return self.folder / shard_name(split, index)

    def _restore(self, split: str) -> None:
        """Cut the shard files back to the state; remove shards written after it."""
        for index, n in enumerate(self.shards[split]):
            path, size = self._path(split, index), n * self.dtype.itemsize
            if not path.is_file() or path.stat().st_size < size:
                raise StaleState(f"{path} holds fewer than {n} tokens")
            os.truncate(path, size)
        for path in self.folder.glob(f"{split}-*{SHARD_SUFFIX}"):
            if int(path.stem.rpartition("-")[2]) >= len(self.shards[split]):
                path.unlink()

    def _open_shard(self, split: str) -> Any:
        shards = self.shards[split]
        if self.files[split] is None:
            if not shards or shards[-1] == self.shard_tokens:
                shards.append(0)
            self.files[split] = open(self._path(split, len(shards) - 1), "ab")
        return self.files[split]

    def write(self, split: str, ids: np.ndarray, docs: int = 1) -> None:
        ids = np.asarray(ids, dtype=self.dtype)
        shards, done = self.shards[split], 0
        while done < len(ids):
            file = self._open_shard(split)
            take = min(self.shard_tokens - shards[-1], len(ids) - done)
            file.write(ids[done:done + take].tobytes())
            shards[-1] += take
            done += take
            if shards[-1] == self.shard_tokens:
                file.close()
                self.files[split] = None
                self.filled += 1
        self.n_docs[split] += docs

    def take_last(self, split: str, n: int, docs: int = 1) -> np.ndarray:
        """Remove the last n tokens (and `docs` documents) of a split; return those tokens."""
        self.close()
        shards, pieces = self.shards[split], []
        while n > 0:
            path, take = self._path(split, len(shards) - 1), min(n, shards[-1])
            keep = shards[-1] - take
            with open(path, "rb") as f:
                f.seek(keep * self.dtype.itemsize)
                pieces.append(np.frombuffer(f.read(), dtype=self.dtype))
            if keep:
                os.truncate(path, keep * self.dtype.itemsize)
                shards[-1] = keep
            else:
                path.unlink()
                shards.pop()
            n -= take
        self.n_docs[split] -= docs
        return np.concatenate(pieces[::-1])

    def state(self) -> dict[str, dict[str, Any]]:
        """Flush the open shards to disk (fsync: the state must survive a crash) and describe them."""
        for file in self.files.values():
            if file is not None:
                file.flush()
                os.fsync(file.fileno())
        self.filled = 0
        return {s: {"shards": list(self.shards[s]), "n_docs": self.n_docs[s]} for s in SPLITS}

    def finish(self, meta: dict[str, Any]) -> dict[str, Any]:
        """Close the shards and write meta.json (+ dtype, total tokens and each split's shards); return it."""
        self.close()
        splits = {s: {"n_tokens": self.n_tokens[s], "n_docs": self.n_docs[s],
                      "shards": [{"file": shard_name(s, i), "n_tokens": n} for i, n in enumerate(self.shards[s])]}
                  for s in SPLITS}
        meta = dict(meta, dtype=self.dtype.name, n_tokens=sum(self.n_tokens.values()), splits=splits)
        write_json_atomic(self.folder / META_FILE, meta)
        return meta

    def close(self) -> None:
        for split, file in self.files.items():
            if file is not None:
                file.close()
                self.files[split] = None


def write_json_atomic(path: Path, content: Any) -> None:
    """Write JSON to a temporary file, fsync it, then rename it over `path`."""
    atomic_write(path, json.dumps(content, indent=2) + "\n")


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
    if meta.get("format_version") not in READABLE_VERSIONS:
        raise UserError(f"{meta_path} has format_version {meta.get('format_version')!r}, this sinkdlm "
                        f"reads {list(READABLE_VERSIONS)}; prepare the folder again with this version")
    return meta


def split_shards(meta: dict[str, Any], split: str) -> list[tuple[str, int]]:
    """(file, tokens) of each shard of a split, in order (a format-1 split is one shard)."""
    info = meta["splits"][split]
    if meta["format_version"] == 1:
        return [(info["file"], info["n_tokens"])]
    return [(shard["file"], shard["n_tokens"]) for shard in info["shards"]]


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
        from sinkdlm.data.tokenizer import read_tokenizer_file

        return read_tokenizer_file(self.path / self.meta["tokenizer_file"], "prepare the data again (sinkdlm prepare)")

    def tokens(self, split: str) -> SplitTokens:
        """The split's token ids over all its shards, memory-mapped read-only (never loaded whole)."""
        splits = self.meta["splits"]
        if split not in splits:
            raise UserError(f"data folder {self.path} has no split {split!r}; it has {sorted(splits)}")
        dtype = np.dtype(self.meta["dtype"])
        if splits[split]["n_tokens"] == 0:
            raise UserError(f"split {split!r} of {self.path} is empty; prepare it from a larger corpus "
                            f"or a larger --val-fraction")
        shards = split_shards(self.meta, split)
        for name, n in shards:
            file, expected = self.path / name, n * dtype.itemsize
            if not file.is_file() or file.stat().st_size != expected:
                raise UserError(f"{file} is missing or not {expected} bytes as meta.json says; "
                                f"prepare the folder again")
        return SplitTokens([self.path / name for name, _ in shards], [n for _, n in shards], dtype)


class SplitTokens:
    """A split's shards read as one token array: `len`, `[i]`, `[a:b]` (a slice may span shards).

    Shards are memory-mapped on first use; at most MAX_OPEN_SHARDS stay open at once.
    """

    def __init__(self, files: list[Path], sizes: list[int], dtype: np.dtype):
        self.files, self.sizes, self.dtype = files, sizes, np.dtype(dtype)
        self.ends = np.cumsum(sizes, dtype=np.int64)
        self._shard = lru_cache(maxsize=MAX_OPEN_SHARDS)(self._map)

    def _map(self, index: int) -> np.memmap:
        return np.memmap(self.files[index], dtype=self.dtype, mode="r", shape=(self.sizes[index],))

    def __len__(self) -> int:
        return int(self.ends[-1]) if len(self.ends) else 0

    def __getitem__(self, key: int | slice) -> Any:
        if isinstance(key, slice):
            start, stop, stride = key.indices(len(self))
            if stride != 1:
                raise IndexError("SplitTokens slices are contiguous (no step)")
            return self._read(start, stop)
        index = int(key) + (len(self) if int(key) < 0 else 0)
        if not 0 <= index < len(self):
            raise IndexError(f"token {key} is out of range for {len(self)} tokens")
        return self._read(index, index + 1)[0]

    def _read(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop): a view into one shard, or a copy joining several."""
        if stop <= start:
            return np.empty(0, dtype=self.dtype)
        pieces, shard = [], int(np.searchsorted(self.ends, start, side="right"))
        while start < stop:
            begin, end = int(self.ends[shard]) - self.sizes[shard], min(stop, int(self.ends[shard]))
            pieces.append(self._shard(shard)[start - begin:end - begin])
            start, shard = end, shard + 1
        return pieces[0] if len(pieces) == 1 else np.concatenate(pieces)


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
    """Order `random`: start of window i is a hash of (seed, step, i), uniform over [0, n_tokens - seq_len]."""
    n_starts = n_tokens - seq_len + 1
    if n_starts < 1:
        raise UserError(f"the training split has {n_tokens} tokens, fewer than one window of "
                        f"data.seq_len={seq_len}; lower data.seq_len or add data")
    # modulo bias is at most n_starts / 2**64: negligible
    return (hash_ints(seed, step, list(indices)) % np.uint64(n_starts)).astype(np.int64)


def epoch_window_starts(n_tokens: int, seq_len: int, seed: int, step: int, indices: Sequence[int],
                        global_batch: int) -> np.ndarray:
    """Order `epoch`: sample i of step s is sample p = s * global_batch + i of the run; epoch
    e = p // n passes over the n = n_tokens // seq_len non-overlapping windows once, in the order of
    a permutation keyed by (seed, e), so every window is seen once per epoch and nothing is stored."""
    n_windows = n_tokens // seq_len
    if n_windows < 1:
        raise UserError(f"the training split has {n_tokens} tokens, fewer than one window of "
                        f"data.seq_len={seq_len}; lower data.seq_len or add data")
    epoch, rank = np.divmod(step * global_batch + np.asarray(indices, dtype=np.int64), n_windows)
    return permute(rank, n_windows, hash_ints(seed, epoch)).astype(np.int64) * seq_len


def permute(values: np.ndarray, n: int, keys: np.ndarray) -> np.ndarray:
    """A keyed bijection of [0, n), applied per element with that element's key: a balanced Feistel
    network over the smallest even number of bits that covers n, repeated (cycle-walking) until the
    value falls below n. The domain is < 4n, so that takes < 4 rounds on average."""
    half = max(1, ((n - 1).bit_length() + 1) // 2)
    out = np.asarray(values, dtype=np.uint64).copy()
    keys = np.broadcast_to(keys, out.shape)
    todo = np.ones(out.shape, dtype=bool)
    while todo.any():
        out[todo] = _feistel(out[todo], keys[todo], half)
        todo = out >= np.uint64(n)
    return out


def _feistel(values: np.ndarray, keys: np.ndarray, half: int) -> np.ndarray:
    shift, mask = np.uint64(half), np.uint64((1 << half) - 1)
    left, right, mixed = values >> shift, values & mask, _splitmix64(keys)
    for round_ in range(FEISTEL_ROUNDS):
        round_keys = _splitmix64(mixed ^ np.uint64(round_))  # close keys share no round keys
        left, right = right, left ^ (_splitmix64(right ^ round_keys) & mask)
    return (left << shift) | right


def sample_windows(tokens: np.ndarray | SplitTokens, seq_len: int, seed: int, step: int,
                   indices: Sequence[int]) -> torch.Tensor:
    """(len(indices), seq_len) LongTensor in order `random`; window i depends only on (seed, step, i)."""
    starts = window_starts(len(tokens), seq_len, seed, step, indices)
    return _gather(tokens, starts, seq_len)


WindowSampler = Callable[[int, Sequence[int]], "torch.Tensor"]


def window_sampler(order: str, tokens: np.ndarray | SplitTokens, seq_len: int, seed: int,
                   global_batch: int) -> WindowSampler:
    """(step, global sample indices) -> (len(indices), seq_len) LongTensor of windows in `order`
    (one of config.WINDOW_ORDERS); a window depends only on (seed, step, its index)."""
    starts: dict[str, Callable[[int, Sequence[int]], np.ndarray]] = {
        "random": lambda step, idx: window_starts(len(tokens), seq_len, seed, step, idx),
        "epoch": lambda step, idx: epoch_window_starts(len(tokens), seq_len, seed, step, idx, global_batch),
    }
    if order not in starts:
        raise UserError(f"data.order={order!r} is not one of {sorted(starts)}")
    draw = starts[order]
    return lambda step, idx: _gather(tokens, draw(step, idx), seq_len)


def fixed_windows(tokens: np.ndarray | SplitTokens, seq_len: int, n: int) -> torch.Tensor:
    """Up to n non-overlapping windows evenly spaced over the split (validation; no randomness)."""
    count = min(n, len(tokens) // seq_len)
    if count < 1:
        raise UserError(f"the validation split has {len(tokens)} tokens, fewer than one window of "
                        f"data.seq_len={seq_len}; lower data.seq_len or add data (or a larger --val-fraction)")
    starts = np.linspace(0, len(tokens) - seq_len, count).round().astype(np.int64)
    return _gather(tokens, starts, seq_len)


def _gather(tokens: np.ndarray | SplitTokens, starts: np.ndarray, seq_len: int) -> torch.Tensor:
    import torch  # here, not at the top: `sinkdlm prepare` need not pay torch's import time

    if len(starts) == 0:
        return torch.empty((0, seq_len), dtype=torch.long)
    rows = np.stack([np.asarray(tokens[s:s + seq_len], dtype=np.int64) for s in starts.tolist()])
    return torch.from_numpy(rows)
