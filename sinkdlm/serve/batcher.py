"""Concurrent requests -> batched `sample.generate` calls, on one worker thread that owns the model.

The worker takes the oldest waiting request, waits up to the collection window for others, and runs
together those whose sampling settings equal its own (one generate call has one SampleConfig), up to
the maximum batch of rows (a request's prompts x n). Each row's noise is keyed by its request's seed
(`Generation.indices`), so a response is the same alone or in any batch.

Cancelling (a client that left): a waiting request leaves the queue; in a running batch its rows are
dropped before the next denoising step (with a window, at the next block's start: generate's `keep`),
so they are computed no more, and the others go on with exactly the outputs they would have had; a
batch whose every request has left stops there.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from sinkdlm.model import DLM
from sinkdlm.sample import generate
from sinkdlm.serve.schema import Generation
from sinkdlm.serve.text import BlockStream, Decoder

# ("step", {"step": i, "text": {k: delta}, "canvas": {k: text}}) | ("done", {"choices": [Choice], "rest": [str]})
# | ("error", message); k: the request's choice; rest: what each streamed choice has left to send
Event = tuple[str, Any]
CLOSE_WAIT_S = 1.0


@dataclass(eq=False)
class Job:
    """A request in the batcher: its generation and where its events go (called on the worker thread)."""

    generation: Generation
    on_event: Callable[[Event], None]
    cancelled: threading.Event = field(default_factory=threading.Event)

    @property
    def key(self) -> Any:
        """The settings a batch shares: everything but the seed, which the noise indices carry."""
        return dataclasses.astuple(self.generation.sampling)


class Batcher:
    def __init__(self, model: DLM, decoder: Decoder, window_s: float, max_rows: int) -> None:
        self.model, self.decoder, self.window_s, self.max_rows = model, decoder, window_s, max_rows
        self.waiting: list[Job] = []
        self.lock = threading.Condition()
        self.closed = False
        self.counts = {"batches": 0, "rows": 0, "cancelled_batches": 0}
        self.thread = threading.Thread(target=self._loop, name="sinkdlm-batcher", daemon=True)
        self.thread.start()

    def submit(self, job: Job) -> None:
        with self.lock:
            self.waiting.append(job)
            self.lock.notify()

    def cancel(self, job: Job) -> None:
        job.cancelled.set()
        with self.lock:
            if job in self.waiting:
                self.waiting.remove(job)

    def close(self) -> None:
        with self.lock:
            self.closed = True
            self.lock.notify()
        self.thread.join(CLOSE_WAIT_S)  # a long batch still running ends with the process (a daemon thread)

    def queued(self) -> int:
        with self.lock:
            return len(self.waiting)

    def _next_batch(self) -> list[Job] | None:
        """The oldest job and those that share its settings, after the collection window."""
        with self.lock:
            while not self.waiting and not self.closed:
                self.lock.wait()
            if self.closed:
                return None
            deadline = time.monotonic() + self.window_s
            while (left := deadline - time.monotonic()) > 0 and sum(
                    len(j.generation.rows) for j in self.waiting) < self.max_rows and not self.closed:
                self.lock.wait(left)
            if not self.waiting:  # all cancelled during the window
                return []
            first, batch, rows = self.waiting[0], [], 0
            for job in list(self.waiting):
                size = len(job.generation.rows)
                if job.key == first.key and (not batch or rows + size <= self.max_rows):
                    batch.append(job)
                    rows += size
                    self.waiting.remove(job)
            return batch

    def _loop(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)

    def _run(self, jobs: list[Job]) -> None:
        rows = [row for job in jobs for row in job.generation.rows]
        indices = [i for job in jobs for i in job.generation.indices]
        cfg = jobs[0].generation.sampling
        watchers = self._watchers(jobs, cfg)
        self.counts["batches"] += 1
        self.counts["rows"] += len(rows)
        leaving = [job.cancelled for job in jobs for _ in job.generation.rows]
        try:
            with torch.inference_mode():
                out = generate(self.model, rows, cfg, self.model.mask_id, self.decoder.eos_id,
                               on_step=lambda step, x: self._on_step(jobs, watchers, rows, step, x),
                               indices=indices, keep=lambda: [not left.is_set() for left in leaving])
        except Exception as e:  # a failed batch answers its requests; the server stays up
            for job in jobs:
                job.on_event(("error", f"generation failed: {type(e).__name__}: {e}"))
            return
        if all(job.cancelled.is_set() for job in jobs):
            self.counts["cancelled_batches"] += 1
        start = 0
        for job, streams in zip(jobs, watchers):
            size = len(job.generation.rows)
            if not job.cancelled.is_set():
                choices = [self.decoder.choice(ids, cfg.gen_length, job.generation.stop)
                           for ids in out[start:start + size]]
                rest = [s.finish(c.text) for s, c in zip(streams, choices)] if streams else []
                job.on_event(("done", {"choices": choices, "rest": rest}))
            start += size

    def _watchers(self, jobs: list[Job], cfg: Any) -> list[list[BlockStream] | None]:
        block = cfg.block_length or cfg.gen_length
        return [[BlockStream(self.decoder, block, job.generation.stop) for _ in job.generation.rows]
                if job.generation.stream else None for job in jobs]

    def _on_step(self, jobs: list[Job], watchers: list[list[BlockStream] | None], rows: list[list[int]],
                 step: int, x: torch.Tensor) -> None:
        gen_length = jobs[0].generation.sampling.gen_length
        start = 0
        for job, streams in zip(jobs, watchers):
            size = len(job.generation.rows)
            if streams is not None and not job.cancelled.is_set():
                text, canvas = {}, {}
                for k, stream in enumerate(streams):
                    p = len(rows[start + k])  # right padding: the generated region follows the prompt
                    region = x[start + k, p:p + gen_length]
                    if delta := stream.update(region):
                        text[k] = delta
                    if job.generation.stream_steps:
                        canvas[k] = self.decoder.canvas(region.tolist())
                if text or canvas:
                    job.on_event(("step", {"step": step, "text": text, "canvas": canvas}))
            start += size

