"""The tokenizer of an exported folder: sinkdlm's tokenizer with the mask token (and any reserved
tokens below it) added, and the tokenizer_config.json AutoTokenizer reads; and the way back."""

from __future__ import annotations

import json
import re
from typing import Any

from tokenizers import AddedToken, Tokenizer

from sinkdlm.config import Config
from sinkdlm.errors import UserError

TOKENIZER_CONFIG = "tokenizer_config.json"
MASK_TOKEN = "<|sinkdlm_mask|>"
MODEL_INPUTS = ("input_ids", "attention_mask")  # SinkDLMForMaskedLM.forward's inputs, named for the tokenizer
RESERVED_TOKEN = "<|sinkdlm_reserved_{}|>"  # fills the ids between the tokenizer's last one and the mask id
ADDED_TOKEN = re.compile(r"<\|sinkdlm_(?:mask|reserved_\d+)\|>")


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
