"""What a run logs: metrics.jsonl (the canonical log, trimmed to the checkpoint a run resumes
from) and the optional Lightning loggers (CSV, TensorBoard, W&B) as extra views of it."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from sinkdlm.errors import UserError
from sinkdlm.files import METRICS_LOG as METRICS  # the canonical log; train.loggers' are extra views
from sinkdlm.optional import install_hint

LOGGER_DIRS = {"csv": "csv", "tensorboard": "tb", "wandb": "wandb"}  # each logger's folder in the run
# wandb is no extra of ours: it is installed on its own
LOGGER_INSTALL = {"tensorboard": install_hint("tensorboard"), "wandb": "pip install wandb"}
WANDB_PROJECT = "sinkdlm"


def make_logger(name: str, run: Path):
    """One of config.LOGGERS as a Lightning logger writing into the run folder; a new version per
    (re)start. ModuleNotFoundError when its package is not installed."""
    if name == "csv":
        from lightning.fabric.loggers import CSVLogger

        return CSVLogger(run, name=LOGGER_DIRS[name], flush_logs_every_n_steps=1)
    if name == "tensorboard":
        from lightning.fabric.loggers import TensorBoardLogger

        return TensorBoardLogger(run, name=LOGGER_DIRS[name], default_hp_metric=False)
    from lightning.pytorch.loggers import WandbLogger  # Fabric has no W&B logger of its own

    return WandbLogger(save_dir=str(run), name=run.name, project=WANDB_PROJECT)


def make_loggers(names: list[str], run: Path) -> tuple[list[Any], str]:
    """The loggers that could be started, and a line saying which are active and which are missing."""
    loggers, active, missing = [], [f"{METRICS} (canonical)"], []
    for name in names:
        try:
            logger = make_logger(name, run)
        except ModuleNotFoundError:
            missing.append(f"{name} is not installed ({LOGGER_INSTALL[name]})")
            continue
        loggers.append(logger)
        active.append(f"{name} in {logger.log_dir}" if getattr(logger, "log_dir", None) else name)
    return loggers, "logging to " + ", ".join(active) + "".join(f"; {m}" for m in missing)


def logged_scalars(record: dict[str, Any]) -> dict[str, float]:
    """A record's numbers for the loggers; the sink monitor's rows as sink/layer{i}/{key}."""
    out = {k: v for k, v in record.items() if k != "step" and isinstance(v, (int, float))}
    for row in record.get("sink_monitor", []):
        out.update({f"sink/layer{row['layer']}/{k}": v for k, v in row.items() if k != "layer"})
    return out


def records_to_keep(path: Path, resume_step: int) -> list[str]:
    """metrics.jsonl lines up to the step a run resumes from. A torn last line (a kill during an
    append) is dropped with a warning; a bad line elsewhere is a UserError naming it."""
    lines = path.read_text(errors="replace").splitlines()
    kept = []
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        record = json_object(line)
        if record is None and number < len(lines):
            raise UserError(f"{path}:{number}: not a JSON object; fix or remove that line, then resume")
        if record is None:
            print(f"warning: {path}:{number}: dropped a torn last line (a kill during an append)", file=sys.stderr)
        elif record.get("step", 0) <= resume_step:
            kept.append(line)
    return kept


def json_object(line: str) -> dict[str, Any] | None:
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        return None
    return record if isinstance(record, dict) else None


class MetricsLog:
    """metrics.jsonl, plus the train.loggers that are installed (rank 0 only)."""

    def __init__(self, run: Path, resume_step: int, names: list[str], enabled: bool) -> None:
        self.path, self.enabled, self.loggers = run / METRICS, enabled, []
        if not enabled:
            return
        run.mkdir(parents=True, exist_ok=True)
        if self.path.exists():  # drop what a crashed run logged past the checkpoint we resume from
            self.path.write_text("".join(line + "\n" for line in records_to_keep(self.path, resume_step)))
        self.loggers, announcement = make_loggers(names, run)
        print(announcement)

    def write(self, record: dict[str, Any]) -> None:
        if not self.enabled:
            return
        with self.path.open("a") as f:
            f.write(json.dumps(record) + "\n")
        scalars = logged_scalars(record)
        for logger in self.loggers:
            logger.log_metrics(scalars, step=record["step"])

    def close(self, status: str) -> None:
        for logger in self.loggers:
            logger.finalize(status)
