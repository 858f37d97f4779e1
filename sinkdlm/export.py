"""A self-contained folder to publish a checkpoint: weights, config, tokenizer, meta and a model card.

The folder holds model.safetensors (bit-identical weights, no trainer state), config.json (the
resolved Config), tokenizer.json, meta.json and a README.md model card. `sinkdlm.checkpoint.load_model`
loads it by path (it reads config.json when there is no config.yaml).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from sinkdlm.checkpoint import CONFIG_JSON, META, TOKENIZER, WEIGHTS, load_config_of, load_meta, resolve
from sinkdlm.config import Config
from sinkdlm.errors import UserError

CARD = "README.md"


def export(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False) -> Path:
    """Write the folder `out_dir` (refusing to delete anything that is not an earlier export); returns it."""
    ckpt, out = resolve(checkpoint), Path(out_dir)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; pick another --out or pass --overwrite")
    if out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents:
        raise UserError(f"--out {out} contains the checkpoint; pick another folder")
    if out.exists() and any(out.iterdir()) and not (out / CONFIG_JSON).is_file():
        raise UserError(f"{out} holds files but no earlier export; refusing to delete it, pick another --out")
    cfg, meta = load_config_of(ckpt), load_meta(ckpt)
    if not (ckpt / TOKENIZER).is_file():
        raise UserError(f"checkpoint {ckpt} has no {TOKENIZER}; a published model needs its tokenizer")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    shutil.copyfile(ckpt / WEIGHTS, out / WEIGHTS)
    shutil.copyfile(ckpt / TOKENIZER, out / TOKENIZER)
    (out / CONFIG_JSON).write_text(json.dumps(cfg.to_dict(), indent=2))
    (out / META).write_text(json.dumps({**meta, "exported_from": str(ckpt)}, indent=2))
    (out / CARD).write_text(model_card(cfg, meta))
    return out


def variant(cfg: Config, meta: dict[str, Any]) -> str:
    """ModelConfig.variant() (the label eval and analysis use) plus what a reader of a card also needs."""
    m = cfg.model
    init = meta.get("sink_init") or m.sink_init  # convert records its finer choice (mean, bos, ...)
    extras = ([f"sink init {init}"] if m.sink_tokens else []) + \
        ["causal attention" if m.causal else "bidirectional attention"]
    return f"{m.variant()}; {', '.join(extras)}"


def training_budget(cfg: Config, meta: dict[str, Any]) -> str:
    step = int(meta.get("step", 0))
    tokens = int(meta.get("tokens", step * cfg.train.global_batch * cfg.seq_len))
    if step == 0:
        return "none yet (converted or initialised weights, 0 diffusion training steps)"
    flops = 6 * cfg.model.non_embedding_params() * tokens
    return (f"{step} steps x {cfg.train.global_batch} sequences x {cfg.seq_len} tokens = {tokens:,} tokens "
            f"(~{flops:.2e} FLOPs by 6ND; objective {cfg.train.objective}, lr {cfg.optim.lr} -> {cfg.optim.min_lr})")


def model_card(cfg: Config, meta: dict[str, Any]) -> str:
    m = cfg.model
    start = meta.get("converted_from") or cfg.train.init_from or "random initialisation"
    return f"""# {m.name}: masked diffusion language model ({variant(cfg, meta)})

Made with [sinkdlm](https://arxiv.org/abs/2601.19657) (masked diffusion LM with sink tokens).

- Variant: {variant(cfg, meta)}
- Architecture: {m.n_layer} layers, {m.n_head} heads ({m.groups} KV groups, head dim {m.hd}), width {m.n_embd},
  MLP {m.intermediate_size}, vocabulary {m.vocab_size} (+1 mask token, id {m.mask_id}),
  {m.non_embedding_params():,} non-embedding parameters
- Starting point: {start}
- Training budget: {training_budget(cfg, meta)}
- End-of-sequence id: {meta.get("eos_id")}

## Files
`model.safetensors` (weights), `config.json` (the full sinkdlm config),
`tokenizer.json` (a `tokenizers` tokenizer), `meta.json` (step, eos id, provenance).

## Use
Every `sinkdlm` command that takes a checkpoint takes this folder (see `sinkdlm --help`); from Python:
```python
from sinkdlm.checkpoint import load_model, load_tokenizer
model, cfg = load_model("<this folder>")
```
"""
