"""Timing helpers shared by the benchmarks: interleaved repeats, robust statistics, a measured
matmul peak for MFU, and peak memory (CUDA allocator stats, or activation bytes on CPU).

Run benchmarks from the repository root as modules (`python -m benchmarks.bench_train`), so
`from benchmarks.common import ...` resolves without path tricks.
"""

from __future__ import annotations

import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import torch

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
MATMUL_SIZE = 2048  # square fp32 matmul: large enough to reach BLAS peak, ~0.1 s on 2 CPU cores
MATMUL_REPEATS = 10
MIB = 2**20


@dataclass
class Stats:
    """Seconds per call over the repeats: median, inter-quartile range, min and max."""

    median: float
    q1: float
    q3: float
    min: float
    max: float
    n: int

    @classmethod
    def of(cls, samples: list[float]) -> Stats:
        s = sorted(samples)
        q1, _, q3 = statistics.quantiles(s, n=4, method="inclusive") if len(s) > 1 else (s[0],) * 3
        return cls(statistics.median(s), q1, q3, s[0], s[-1], len(s))


    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# wall: elapsed time, what a user waits for. cpu: this process's CPU time, which a shared machine's
# other tenants do not inflate (meaningful on CPU only, and with 1 thread, as idle threads may spin)
CLOCKS: dict[str, Callable[[], float]] = {"wall": time.perf_counter, "cpu": time.process_time}


def time_once(fn: Callable[[], Any], device: torch.device, clock: str = "wall") -> float:
    now = CLOCKS[clock]
    synchronize(device)
    start = now()
    fn()
    synchronize(device)
    return now() - start


def time_interleaved(fns: dict[str, Callable[[], Any]], repeats: int, warmup: int, device: torch.device,
                     progress: Callable[[], None] | None = None, clock: str = "wall") -> dict[str, list[float]]:
    """Seconds per call of every fn, timed in rounds A, B, C, A, B, C, ... so that machine drift
    (clock boost, other tenants) hits all of them alike; sample i of each fn is from the same round."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_once(fn, device, clock))
            if progress is not None:
                progress()
    return samples


def paired_ratio(a: list[float], b: list[float]) -> Stats:
    """Statistics of a[i] / b[i] over rounds: a ratio less noisy than median(a) / median(b)."""
    return Stats.of([x / y for x, y in zip(a, b)])


def matmul_peak_flops(device: torch.device, dtype: torch.dtype = torch.float32, size: int = MATMUL_SIZE,
                      repeats: int = MATMUL_REPEATS, clock: str = "wall") -> float:
    """The best FLOP/s of a square matmul on this device: the denominator of MFU."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up: BLAS thread pool, CUDA context and kernel selection
    best = min(time_once(lambda: a @ b, device, clock) for _ in range(repeats))
    return 2 * size**3 / best


def saved_activation_bytes(fn: Callable[[], Any], exclude: list[torch.Tensor]) -> int:
    """Bytes of distinct storages autograd keeps for backward while fn() builds its graph.

    On CPU there is no allocator peak to read; what a training step holds at its peak is, to within
    the transient of one op, the activations saved for backward. Storages are counted once (views
    share them) and tensors in `exclude` (the parameters) are not activations.
    """
    skip = {t.untyped_storage().data_ptr() for t in exclude}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip and storage.device.type != "meta":
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


def cuda_peak_bytes(fn: Callable[[], Any], device: torch.device) -> int:
    """Peak bytes allocated by the CUDA caching allocator during fn(), above what was live before."""
    synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    before = torch.cuda.memory_allocated(device)
    fn()
    synchronize(device)
    return torch.cuda.max_memory_allocated(device) - before


def machine(device: torch.device) -> str:
    """One line naming the hardware the numbers come from."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{cpu_model()} ({platform.machine()}), torch threads: {torch.get_num_threads()}"


def load_average() -> float:
    """The 1-minute load average: above the core count, other processes share the CPU and wall
    times inflate (use the cpu clock with 1 thread then)."""
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
