"""`sinkdlm export --llama`: the plain variant's weights in LlamaForCausalLM's names and config (for
tools that know only standard architectures), and the way back."""

from __future__ import annotations

from typing import Any

import torch

from sinkdlm.config import Config, ModelConfig
from sinkdlm.errors import UserError
from sinkdlm.hf_format import CONFIG_KEY, LLAMA_LAYER_NAMES
from sinkdlm.optional import require

LLAMA_TYPE = "llama"


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
    out = {ours.get(name, name): tensor for name, tensor in weights.items()}  # checkpoint_from_export names strays
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
        num_hidden_layers=m.n_layer, num_attention_heads=m.n_head, num_key_value_heads=m.kv_heads, head_dim=m.head_size,
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
