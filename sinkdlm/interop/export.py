"""A folder to publish a checkpoint, which transformers loads as it loads LLaDA and Dream.

`AutoModel.from_pretrained(folder, trust_remote_code=True)` needs only torch and transformers: the
folder ships sinkdlm's own model.py and attention.py (as sinkdlm_model.py / sinkdlm_attention.py,
their sinkdlm imports made relative: the one forward, never a second copy) beside a thin
PreTrainedModel wrapper and a PretrainedConfig (sinkdlm/interop/hf_code/). It also holds model.safetensors
(the weights, bit-identical, under the wrapper's `model.` prefix), config.json (see sinkdlm/hf_format.py),
tokenizer.json + tokenizer_config.json for AutoTokenizer (the mask token added at the mask id),
meta.json and a README.md model card. `sinkdlm.checkpoint.load_model` loads the folder too, and
`sinkdlm convert --from FOLDER` turns it back into a checkpoint (from_export.py).

Its parts: hf_tokenizer.py (the tokenizer and its mask token), llama_layout.py (`--llama`),
model_card.py (README.md), from_export.py (the way back). The folder is written beside its target under a hidden name and renamed into place once complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import save_file

from sinkdlm.checkpoint import (
    CONFIG_JSON,
    META,
    TMP_PREFIX,
    TOKENIZER,
    TRASH_PREFIX,
    WEIGHTS,
    chat_settings,
    load_config_of,
    load_meta,
    load_tokenizer,
    load_weights,
    resolve,
)
from sinkdlm.errors import UserError
from sinkdlm.files import use_umask
from sinkdlm.hf_format import CONFIG_FILE_CODE, MODELING_FILE_CODE, hf_config, hf_weights
from sinkdlm.interop.from_export import is_export
from sinkdlm.interop.hf_tokenizer import TOKENIZER_CONFIG, hf_tokenizer
from sinkdlm.interop.llama_layout import check_llama, llama_config, llama_weights
from sinkdlm.interop.model_card import llama_card, model_card, transformers_card

CARD = "README.md"
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
    tokenizer_config.update(exported_chat_settings(ckpt, tokenizer))
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


def exported_chat_settings(ckpt: Path, tokenizer) -> dict[str, Any]:
    """The checkpoint's chat template for tokenizer_config.json (AutoTokenizer's apply_chat_template and
    `sinkdlm serve` read it there); its BOS text only where the tokenizer has that token (else
    AutoTokenizer would add a token past the mask id)."""
    chat = chat_settings(ckpt)
    if "bos_token" in chat and tokenizer.token_to_id(chat["bos_token"]) is None:
        del chat["bos_token"]
    return chat


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
