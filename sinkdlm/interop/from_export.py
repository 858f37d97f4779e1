"""`sinkdlm convert --from FOLDER`: a folder `sinkdlm export` wrote, back into a checkpoint."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

from sinkdlm.checkpoint import (
    CONFIG_JSON,
    META,
    TOKENIZER,
    WEIGHTS,
    check_state_shapes,
    load_config_of,
    load_meta,
    load_weights,
    save_checkpoint,
)
from sinkdlm.config import ModelConfig
from sinkdlm.errors import UserError
from sinkdlm.interop.hf_tokenizer import sinkdlm_tokenizer
from sinkdlm.interop.llama_layout import LLAMA_TYPE, weights_from_llama


def is_export(folder: str | Path) -> bool:
    """Whether `folder` was written by `sinkdlm export`: its meta.json names the checkpoint it came from
    (so an --out that is any other model folder is never replaced, and `convert --from` knows it)."""
    try:
        return "exported_from" in json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError, TypeError):
        return False


def checkpoint_from_export(folder: str | Path, out_dir: str | Path, sink_tokens: int = 0) -> Path:
    """`sinkdlm convert --from FOLDER`: an exported folder back into a checkpoint in the run folder
    `out_dir` (which `convert` has checked holds none), with the weights, Config, meta and tokenizer
    it was exported from."""
    if sink_tokens:
        raise UserError(f"{folder} is a sinkdlm export, converted back as it is (its sinks included); "
                        f"drop --sink-tokens")
    if not (Path(folder) / TOKENIZER).is_file():
        raise UserError(f"the exported folder {folder} has no {TOKENIZER}; export the checkpoint again")
    cfg, meta, weights = load_config_of(folder), load_meta(folder), load_weights(folder)
    if json.loads((Path(folder) / CONFIG_JSON).read_text()).get("model_type") == LLAMA_TYPE:
        weights = weights_from_llama(weights, cfg.model)
    check_weights(weights, cfg.model, folder)
    step = int(meta.get("step", 0))
    meta = {key: value for key, value in meta.items() if key not in ("exported_from", "step")}
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer = Path(tmp) / TOKENIZER
        tokenizer.write_text(sinkdlm_tokenizer((Path(folder) / TOKENIZER).read_text(encoding="utf-8")),
                             encoding="utf-8")
        return save_checkpoint(out_dir, step, weights, cfg, {**meta, "imported_from": str(folder)}, tokenizer)


def check_weights(weights: dict[str, torch.Tensor], m: ModelConfig, folder: str | Path) -> None:
    """A UserError unless `weights` are exactly the tensors (names, shapes) of a DLM built from `m`."""
    check_state_shapes(weights, m, f"{Path(folder) / WEIGHTS} does not match its config.json",
                       "the folder was edited, export the checkpoint again")
