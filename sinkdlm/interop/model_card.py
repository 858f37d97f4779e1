"""The README.md model card of an exported folder: the variant, its size, its training, and how to
load it (with transformers, with sinkdlm, or in the Llama layout)."""

from __future__ import annotations

from typing import Any

from sinkdlm.config import Config
from sinkdlm.hf_format import CONFIG_FILE_CODE, CONFIG_KEY, MODELING_FILE_CODE
from sinkdlm.interop.hf_tokenizer import TOKENIZER_CONFIG
from sinkdlm.interop.llama_layout import llama_vocabulary

SOURCE_PREFIX = "source_"  # meta keys an importer copies from the source checkpoint (SMDM's iter_num, ...)


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
    if step == 0 and meta.get("converted_from"):  # an import: its training happened before sinkdlm
        source = [meta["converted_from"]] + [f"{key.removeprefix(SOURCE_PREFIX)} {value}"
                                             for key, value in meta.items() if key.startswith(SOURCE_PREFIX)]
        return f"trained elsewhere ({', '.join(map(str, source))}); 0 diffusion training steps in sinkdlm"
    if step == 0:
        return "none yet (initialised weights, 0 diffusion training steps)"
    flops = 6 * cfg.model.non_embedding_params() * tokens
    return (f"{step} steps x {cfg.train.global_batch} sequences x {cfg.seq_len} tokens = {tokens:,} tokens "
            f"(~{flops:.2e} FLOPs by 6ND; objective {cfg.train.objective}, lr {cfg.optim.lr} -> {cfg.optim.min_lr})")


def model_card(cfg: Config, meta: dict[str, Any], mask_token: str) -> str:
    """What every card says: the variant, its size, where it started and what training it had.
    mask_token: the exported tokenizer's mask token."""
    m = cfg.model
    mask = f"+1 mask token `{mask_token}`, id {m.mask_id}" if m.mask_token_id is None else \
        f"mask: the vocabulary's own token `{mask_token}`, id {m.mask_id}; the embedding's extra row " \
        f"{m.require_vocab()} is unused"
    start = meta.get("converted_from") or cfg.train.init_from or "random initialisation"
    return f"""# {m.name}: masked diffusion language model ({variant(cfg, meta)})

Made with [sinkdlm](https://arxiv.org/abs/2601.19657) (masked diffusion LM with sink tokens).

- Variant: {variant(cfg, meta)}
- Architecture: {m.n_layer} layers, {m.n_head} heads ({m.kv_heads} KV groups, head dim {m.head_size}), width {m.n_embd},
  MLP {m.intermediate_size}, vocabulary {m.vocab_size} ({mask}),
  {m.non_embedding_params():,} non-embedding parameters
- Starting point: {start}
- Training budget: {training_budget(cfg, meta)}
- End-of-sequence id: {meta.get("eos_id")}
"""


def transformers_card(cfg: Config) -> str:
    m = cfg.model
    attention = "causal attention (a parity-check model)" if m.causal else \
        "bidirectional attention (every position sees every other)"
    shift = " Logits are shifted (logit_shift: position i predicts token i+1, as in Dream)." if m.logit_shift else ""
    return f"""
## Use with transformers (needs torch and transformers only, not sinkdlm)
```python
from transformers import AutoModel, AutoTokenizer
model = AutoModel.from_pretrained("<this folder>", trust_remote_code=True)
tokenizer = AutoTokenizer.from_pretrained("<this folder>", trust_remote_code=True)
logits = model(**tokenizer(["some text"], return_tensors="pt")).logits  # (batch, length, {m.vocab_size})
```
A masked diffusion LM with {attention}. Put the mask token where text is to be
predicted and read the logits there; it is no left-to-right model, so `generate()` does not
apply.{shift} The model code is sinkdlm's own (`sinkdlm_model.py`, `sinkdlm_attention.py`, copied at
export).

## Use with sinkdlm
Every `sinkdlm` command that takes a checkpoint takes this folder (see `sinkdlm --help`), and
`sinkdlm convert --from <this folder> --out RUN` turns it back into a checkpoint. From Python:
```python
from sinkdlm.checkpoint import load_model
model, cfg = load_model("<this folder>")
```

## Files
`model.safetensors` (weights: sinkdlm's names under `model.`), `config.json` (a transformers config
holding every sinkdlm model setting; the rest of the run's config under `{CONFIG_KEY}`),
`{CONFIG_FILE_CODE}.py` and `{MODELING_FILE_CODE}.py` (the transformers classes), `sinkdlm_model.py`
and `sinkdlm_attention.py`, `tokenizer.json` and `{TOKENIZER_CONFIG}` (the tokenizer and
its mask token), `meta.json` (step, eos id, provenance).
"""


def llama_card(cfg: Config) -> str:
    m = cfg.model
    return f"""
## Llama layout: the weights are right, Llama's attention is not
This folder holds the weights in `LlamaForCausalLM`'s names and config, for tools that know only
standard architectures. **This model's attention is {"causal" if m.causal else "bidirectional"}**; transformers'
Llama code runs attention causally, so `LlamaForCausalLM` computes other logits than this model does
(those of the same weights with causal attention). {llama_vocabulary(m)}
To run the model as it was trained, turn the folder back into a checkpoint with
`sinkdlm convert --from <this folder> --out RUN`, or export it without `--llama`.

## Files
`model.safetensors` (Llama names), `config.json` (a Llama config; the whole sinkdlm config under
`{CONFIG_KEY}`), `tokenizer.json` and `{TOKENIZER_CONFIG}` (the tokenizer and its mask token),
`meta.json` (step, eos id, provenance).
"""
