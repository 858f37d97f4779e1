"""A folder to publish a checkpoint, which transformers loads as it loads LLaDA and Dream.

`AutoModel.from_pretrained(folder, trust_remote_code=True)` needs only torch and transformers: the
folder ships sinkdlm's own model.py and attention.py (as sinkdlm_model.py / sinkdlm_attention.py,
their sinkdlm imports made relative: the one forward, never a second copy) beside a thin
PreTrainedModel wrapper and a PretrainedConfig (sinkdlm/interop/hf_code/). It also holds model.safetensors
(the weights, bit-identical, under the wrapper's `model.` prefix), config.json (see hf_format),
tokenizer.json + tokenizer_config.json for AutoTokenizer (the mask token added at the mask id),
meta.json and a README.md model card. `sinkdlm.checkpoint.load_model` loads the folder too, and
`sinkdlm convert --from FOLDER` turns it back into a checkpoint (`import_export`).

The folder is written beside its target under a hidden name and renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from tokenizers import AddedToken, Tokenizer

from sinkdlm.checkpoint import (
    CONFIG_JSON,
    META,
    TMP_PREFIX,
    TOKENIZER,
    TRASH_PREFIX,
    WEIGHTS,
    check_state_shapes,
    load_config_of,
    load_meta,
    load_tokenizer,
    load_weights,
    resolve,
    save_checkpoint,
)
from sinkdlm.config import Config, ModelConfig
from sinkdlm.errors import UserError
from sinkdlm.files import use_umask
from sinkdlm.interop.hf_format import (
    CONFIG_FILE_CODE,
    CONFIG_KEY,
    LLAMA_LAYER_NAMES,
    MODELING_FILE_CODE,
    hf_config,
    hf_weights,
)
from sinkdlm.optional import require

CARD = "README.md"
TOKENIZER_CONFIG = "tokenizer_config.json"
PACKAGE = Path(__file__).parents[1]  # sinkdlm/, whose model.py and attention.py are shipped
WRAPPER_CODE = Path(__file__).parent / "hf_code"  # configuration_sinkdlm.py and modeling_sinkdlm.py, shipped as they are
# sinkdlm module -> the file it is shipped as
SHIPPED_MODULES = {"model": "sinkdlm_model", "attention": "sinkdlm_attention"}
# whole import lines of the shipped modules -> their form inside the exported folder
IMPORT_REWRITES = {
    "from sinkdlm import attention": f"from . import {SHIPPED_MODULES['attention']} as attention",
    "from sinkdlm.config import ModelConfig": f"from .{CONFIG_FILE_CODE} import SinkDLMConfig as ModelConfig",
}
SINKDLM_IMPORT = re.compile(r"^\s*(?:from|import)\s+sinkdlm\b.*$", re.MULTILINE)
MASK_TOKEN = "<|sinkdlm_mask|>"
MODEL_INPUTS = ("input_ids", "attention_mask")  # SinkDLMForMaskedLM.forward's inputs, named for the tokenizer
RESERVED_TOKEN = "<|sinkdlm_reserved_{}|>"  # fills the ids between the tokenizer's last one and the mask id
ADDED_TOKEN = re.compile(r"<\|sinkdlm_(?:mask|reserved_\d+)\|>")
LLAMA_TYPE = "llama"
SOURCE_PREFIX = "source_"  # meta keys an importer copies from the source checkpoint (SMDM's iter_num, ...)


def export(checkpoint: str | Path, out_dir: str | Path, overwrite: bool = False, llama: bool = False) -> Path:
    """Write the folder `out_dir` (refusing to replace anything but an earlier export); returns it.
    llama: the plain variant's weights in LlamaForCausalLM's names and config instead (see llama_card)."""
    ckpt, out = resolve(checkpoint), Path(out_dir)
    restore_interrupted(out)
    check_out(ckpt, out, overwrite)
    cfg, meta = load_config_of(ckpt), load_meta(ckpt)
    if llama:
        check_llama(cfg.model)
    if not (ckpt / TOKENIZER).is_file():
        raise UserError(f"checkpoint {ckpt} has no {TOKENIZER}; a published model needs its tokenizer")
    tokenizer, tokenizer_config = hf_tokenizer(load_tokenizer(ckpt), cfg, meta.get("eos_id"))
    weights = load_weights(ckpt)
    dtype = str(next(iter(weights.values())).dtype).removeprefix("torch.")
    files = {TOKENIZER: tokenizer.to_str(), TOKENIZER_CONFIG: json.dumps(tokenizer_config, indent=2),
             META: json.dumps({**meta, "exported_from": str(ckpt)}, indent=2)}
    if llama:
        files.update({CONFIG_JSON: json.dumps(llama_config(cfg, dtype, meta.get("eos_id")), indent=2),
                      CARD: model_card(cfg, meta, tokenizer_config["mask_token"]) + llama_card(cfg)})
        return write_folder(out, files, llama_weights(weights, cfg.model))
    files.update({CONFIG_JSON: json.dumps(hf_config(cfg, dtype, meta.get("eos_id")), indent=2),
                  CARD: model_card(cfg, meta, tokenizer_config["mask_token"]) + transformers_card(cfg),
                  **shipped_code()})
    return write_folder(out, files, hf_weights(weights))


def check_out(ckpt: Path, out: Path, overwrite: bool) -> None:
    """Refuse an --out that holds the checkpoint, lies inside it, or holds files but no earlier export."""
    if out.resolve() == ckpt.resolve() or out.resolve() in ckpt.resolve().parents:
        raise UserError(f"--out {out} contains the checkpoint; pick another folder")
    if ckpt.resolve() in out.resolve().parents:
        raise UserError(f"--out {out} is inside the checkpoint {ckpt}, which is never changed; pick another folder")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pick a folder")
    if out.exists() and any(out.iterdir()):
        if not overwrite:
            raise UserError(f"{out} exists and is not empty; pick another --out or pass --overwrite")
        if not is_export(out):
            raise UserError(f"{out} holds files but no earlier export; refusing to delete it, pick another --out")


def is_export(folder: str | Path) -> bool:
    """Whether `folder` was written by `sinkdlm export`: its meta.json names the checkpoint it came from
    (so an --out that is any other model folder is never replaced, and `convert --from` knows it)."""
    try:
        return "exported_from" in json.loads((Path(folder) / META).read_text())
    except (OSError, ValueError, TypeError):
        return False


def trash_of(out: Path) -> Path:
    """Where write_folder moves an earlier export aside while the new one takes its place."""
    return out.parent / f"{TRASH_PREFIX}{out.name}"


def restore_interrupted(out: Path) -> None:
    """Put back an earlier export that a kill left aside between write_folder's two renames: there,
    with `out` gone, the trash folder holds its only copy (with `out` present it is a stale leftover)."""
    trash = trash_of(out)
    if not out.exists() and trash.is_dir() and is_export(trash):
        os.replace(trash, out)


def write_folder(out: Path, files: dict[str, str], weights: dict[str, Any]) -> Path:
    """Write `files` and model.safetensors beside `out` under a hidden name, then rename it into place
    (an earlier export there is moved aside first and deleted last; see restore_interrupted)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp, trash = out.parent / f"{TMP_PREFIX}{out.name}", trash_of(out)
    for leftover in (tmp, trash):  # restore_interrupted has put back any trash that was the only copy
        shutil.rmtree(leftover, ignore_errors=True)
    try:
        tmp.mkdir()
        save_file({k: v.contiguous() for k, v in weights.items()}, str(tmp / WEIGHTS), metadata={"format": "pt"})
        use_umask(tmp / WEIGHTS)
        for name, text in files.items():
            (tmp / name).write_text(text, encoding="utf-8")
        earlier = out.exists()
        if earlier:
            os.replace(out, trash)
        try:
            os.replace(tmp, out)
        except OSError:
            if earlier:  # put the earlier export back
                os.replace(trash, out)
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    shutil.rmtree(trash, ignore_errors=True)
    return out


# ----------------------------------------------------------------------------------------------
# the code transformers runs


def shipped_source(module: str) -> str:
    """sinkdlm/<module>.py with its sinkdlm imports made relative to the exported folder."""
    text = (PACKAGE / f"{module}.py").read_text(encoding="utf-8")
    for line, relative in IMPORT_REWRITES.items():
        text = re.sub(rf"^{re.escape(line)}$", relative, text, flags=re.MULTILINE)
    left = SINKDLM_IMPORT.search(text)
    if left:  # a developer error: the export would need all of sinkdlm
        raise RuntimeError(f"sinkdlm/{module}.py has `{left.group(0).strip()}`, which an exported folder cannot "
                           f"satisfy; give it a relative form in sinkdlm.interop.export.IMPORT_REWRITES")
    return text


def shipped_code() -> dict[str, str]:
    """File name -> text of every Python file of the exported folder."""
    code = {f"{name}.py": shipped_source(module) for module, name in SHIPPED_MODULES.items()}
    for name in (CONFIG_FILE_CODE, MODELING_FILE_CODE):
        code[f"{name}.py"] = (WRAPPER_CODE / f"{name}.py").read_text(encoding="utf-8")
    return code


# ----------------------------------------------------------------------------------------------
# the tokenizer


def hf_tokenizer(tokenizer: Tokenizer, cfg: Config, eos_id: int | None) -> tuple[Tokenizer, dict[str, Any]]:
    """The tokenizer with the mask token added at the mask id (reserved tokens fill any gap below it),
    and the tokenizer_config.json AutoTokenizer reads its special tokens from. A mask inside the
    vocabulary (model.mask_token_id, as LLaDA's and Dream's) is the tokenizer's own token there."""
    m, size = cfg.model, tokenizer.get_vocab_size(with_added_tokens=True)
    in_vocabulary = m.mask_token_id is not None
    top = m.require_vocab() if in_vocabulary else m.mask_id  # the ids the tokenizer may hold
    if size > top:
        raise UserError(f"the checkpoint's tokenizer has {size} tokens but the model only {top}; "
                        f"they do not belong together, copy the right tokenizer.json into the checkpoint")
    added = [RESERVED_TOKEN.format(i) for i in range(size, top)] + ([] if in_vocabulary else [MASK_TOKEN])
    clash = [token for token in added if tokenizer.token_to_id(token) is not None]
    if clash:
        raise UserError(f"the tokenizer already has a token {clash[0]!r}, which export adds; rename it")
    tokenizer.add_special_tokens([AddedToken(token, special=True, normalized=False) for token in added])
    mask_token = tokenizer.id_to_token(m.mask_id) if in_vocabulary else MASK_TOKEN
    if tokenizer.token_to_id(mask_token) != m.mask_id:
        raise UserError(f"the mask token got id {tokenizer.token_to_id(mask_token)} in the tokenizer, not the "
                        f"model's mask id {m.mask_id}: the tokenizer's ids have gaps; export needs contiguous ids")
    eos = tokenizer.id_to_token(eos_id) if eos_id is not None else None
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "mask_token": mask_token, "eos_token": eos,
              "pad_token": eos, "model_max_length": m.block_size, "clean_up_tokenization_spaces": False,
              # what the model's forward takes: transformers 4.x tokenizers add token_type_ids otherwise
              "model_input_names": list(MODEL_INPUTS)}
    return tokenizer, {key: value for key, value in config.items() if value is not None}


def sinkdlm_tokenizer(hf_tokenizer_json: str) -> str:
    """The inverse of hf_tokenizer: the tokenizer without the tokens export added."""
    data = json.loads(hf_tokenizer_json)
    data["added_tokens"] = [t for t in data["added_tokens"] if not ADDED_TOKEN.fullmatch(t["content"])]
    return Tokenizer.from_str(json.dumps(data)).to_str()


# ----------------------------------------------------------------------------------------------
# the plain variant in Llama's layout


def check_llama(m: ModelConfig) -> None:
    """A UserError naming what LlamaForCausalLM cannot hold (anything but the plain variant)."""
    extras = {"sink tokens": m.sink_tokens > 0, f"attn_gate={m.attn_gate}": m.attn_gate != "none",
              "logit_shift": m.logit_shift, "q/k/v biases (a Qwen2 layout)": m.qkv_bias}
    found = [name for name, present in extras.items() if present]
    if found:
        raise UserError(f"--llama holds only the plain variant, and this model has {', '.join(found)}; "
                        f"export it without --llama (transformers loads that form with trust_remote_code=True)")


def llama_names(m: ModelConfig) -> dict[str, str]:
    """DLM name -> LlamaForCausalLM name of every weight of the plain model `m` (convert's table, reversed)."""
    names = {"wte.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    if not m.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    for i in range(m.n_layer):
        names.update({f"blocks.{i}.{ours}": f"model.layers.{i}.{theirs}" for theirs, ours in LLAMA_LAYER_NAMES.items()
                      if not theirs.endswith("bias")})
    return names


def llama_weights(weights: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """Llama's names; the LM head gains a zero row for the embedding's extra row (the mask token, or an
    unused row when the mask is a vocabulary id), so that it has as many rows as the embedding (Llama has
    one vocab_size for both; that logit is no prediction)."""
    names = llama_names(m)
    out = {names[name]: tensor for name, tensor in weights.items()}
    if "lm_head.weight" in out:
        out["lm_head.weight"] = torch.cat([out["lm_head.weight"], out["lm_head.weight"].new_zeros(1, m.n_embd)])
    return out


def weights_from_llama(weights: dict[str, torch.Tensor], m: ModelConfig) -> dict[str, torch.Tensor]:
    """The inverse of llama_weights."""
    ours = {theirs: name for name, theirs in llama_names(m).items()}
    out = {ours.get(name, name): tensor for name, tensor in weights.items()}  # import_export names strays
    if "lm_head.weight" in out:
        out["lm_head.weight"] = out["lm_head.weight"][: m.require_vocab()]
    return out


def llama_config(cfg: Config, dtype: str, eos_id: int | None) -> dict[str, Any]:
    """A standard Llama config.json (vocab_size counts the embedding's extra row) plus the whole Config
    under CONFIG_KEY."""
    transformers = require("transformers", "sinkdlm export --llama")
    m = cfg.model
    config = transformers.LlamaConfig(
        vocab_size=m.require_vocab() + 1, hidden_size=m.n_embd, intermediate_size=m.intermediate_size,
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.groups, head_dim=m.hd,
        max_position_embeddings=m.block_size, rms_norm_eps=m.norm_eps, rope_theta=m.rope_base,
        tie_word_embeddings=m.tie_embeddings, attention_bias=False, mlp_bias=False, hidden_act="silu",
        bos_token_id=None, eos_token_id=eos_id, pad_token_id=eos_id, architectures=["LlamaForCausalLM"])
    return {**config.to_dict(), "dtype": dtype, "mask_token_id": m.mask_id, CONFIG_KEY: cfg.to_dict()}


def llama_vocabulary(m: ModelConfig) -> str:
    """The card's account of the Llama config's vocab_size: the embedding's extra row and its logit."""
    extra = m.require_vocab()
    if m.mask_token_id is not None:
        return (f"The config's `vocab_size` ({extra + 1}) counts the embedding's extra row {extra}, which no input "
                f"uses (`mask_token_id` {m.mask_id}, a vocabulary token); its logit is no prediction.")
    head = "its logit comes from the embedding's tied row" if m.tie_embeddings else "the LM head's row for it is zero"
    return (f"The config's `vocab_size` ({extra + 1}) counts the mask token (`mask_token_id` {m.mask_id}); "
            f"{head}: that logit is no prediction.")


# ----------------------------------------------------------------------------------------------
# back to a checkpoint


def import_export(folder: str | Path, out_dir: str | Path, sink_tokens: int = 0) -> Path:
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


# ----------------------------------------------------------------------------------------------
# the model card


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
- Architecture: {m.n_layer} layers, {m.n_head} heads ({m.groups} KV groups, head dim {m.hd}), width {m.n_embd},
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
