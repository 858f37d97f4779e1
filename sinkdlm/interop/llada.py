"""LLaDA (GSAI-ML/LLaDA-8B-Base and -Instruct, LLaDA 1.5): its HF folder read without its own code.

LLaDA's "llama" block computes what a DLM layer computes: RMSNorm (eps rms_norm_eps, float32 inside)
-> q_proj/k_proj/v_proj -> rotate-halves RoPE over head_dim = d_model / n_heads with base rope_theta
-> bidirectional attention scaled by 1/sqrt(head_dim) (grouped heads repeated as repeat_interleave)
-> attn_out; then RMSNorm -> ff_out(silu(ff_proj(x)) * up_proj(x)), so ff_proj is the gate. After
the last block ln_f, then the LM head transformer.ff_out (or the embedding, with weight_tying).
Its mask token (config mask_token_id, 126336 in LLaDA-8B) is a row of the vocabulary.

Every config key that changes this computation is checked; a value the DLM cannot reproduce is refused
(clip_qkv, which the llama block never reads, is accepted with a note). One difference is deliberate:
LLaDA's published forward passes no mask to its attention, so padding keys are attended whatever
attention_mask says (ML-GSAI/LLaDA issue #89); the DLM hides those attention_mask marks, so padded
batches differ.
"""

from __future__ import annotations

import re
from typing import Any

from sinkdlm.config import ModelConfig
from sinkdlm.errors import UserError
from sinkdlm.interop.hf_folder import context_length, note

MODEL_TYPE = "llada"
# configuration_llada.ModelConfig's defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "d_model": 768, "n_heads": 12, "n_kv_heads": None, "multi_query_attention": None, "n_layers": 12,
    "mlp_ratio": 4, "mlp_hidden_size": None, "rope_theta": 10000.0, "rms_norm_eps": 1e-5,
    "max_sequence_length": 1024, "vocab_size": 50257, "embedding_size": 50304, "weight_tying": True,
    "include_qkv_bias": False, "block_type": "sequential", "activation_type": "swiglu",
    "layer_norm_type": "default", "layer_norm_with_affine": True, "include_bias": False,
    "bias_for_layer_norm": None, "attention_layer_norm": False, "alibi": False, "rope": False,
    "input_emb_norm": False, "scale_logits": False, "clip_qkv": None, "block_group_size": 1,
}
IGNORED = ("clip_qkv",)  # configuration_llada.ModelConfig keys that LLaDA's llama block never reads
# config key -> the values under which LLaDA computes exactly what the DLM computes
REPRODUCIBLE: dict[str, tuple[Any, ...]] = {
    "block_type": ("llama",),  # separate q/k/v and a gated MLP (ff_proj, up_proj)
    "activation_type": ("silu",),  # act(ff_proj(x)) * up_proj(x) = SwiGLU
    "layer_norm_type": ("rms",),
    "layer_norm_with_affine": (True,),
    "include_bias": (False,),  # biases on attn_out / MLP / norms
    "bias_for_layer_norm": (None, False),
    "attention_layer_norm": (False,),  # QK norm
    "rope": (True,),
    "alibi": (False,),
    "input_emb_norm": (False,),  # embeddings scaled by sqrt(d_model)
    "scale_logits": (False,),
    "block_group_size": (1,),  # groups rename the blocks (transformer.block_groups.*)
}
PREFIX = "model.transformer."
BLOCK_KEY = re.compile(r"blocks\.(\d+)\.(.+)")
# LLaDA name (after `model.transformer.blocks.{i}.`) -> DLM name (after `blocks.{i}.`)
BLOCK_NAMES = {
    "attn_norm.weight": "norm_attn.weight", "ff_norm.weight": "norm_mlp.weight",
    "q_proj.weight": "attn.q.weight", "q_proj.bias": "attn.q.bias",
    "k_proj.weight": "attn.k.weight", "k_proj.bias": "attn.k.bias",
    "v_proj.weight": "attn.v.weight", "v_proj.bias": "attn.v.bias",
    "attn_out.weight": "attn.proj.weight",
    "ff_proj.weight": "mlp.w_gate.weight", "up_proj.weight": "mlp.w_up.weight", "ff_out.weight": "mlp.w_down.weight",
}


def model_config(raw: dict[str, Any], name: str, block_size: int | None) -> ModelConfig:
    """The DLM config of a LLaDA config.json (no sinks); refuses what the DLM would compute differently."""
    c = {**DEFAULTS, **raw}
    for key, allowed in REPRODUCIBLE.items():
        if c[key] not in allowed:
            raise UserError(f"LLaDA config {key}={c[key]!r} is not supported (sinkdlm reproduces "
                            f"{key} in {list(allowed)}); this is not a LLaDA-8B-style model")
    if c.get("mask_token_id") is None:
        raise UserError("the LLaDA config.json has no mask_token_id; add the id the model was trained with "
                        "(126336 for LLaDA-8B)")
    if c["d_model"] % c["n_heads"]:
        raise UserError(f"LLaDA config d_model={c['d_model']} is not divisible by n_heads={c['n_heads']}")
    if c["embedding_size"] is not None and c["embedding_size"] < c["vocab_size"]:
        raise UserError(f"LLaDA config embedding_size={c['embedding_size']} is smaller than vocab_size="
                        f"{c['vocab_size']} (LLaDA's own code refuses this too); set embedding_size to the "
                        f"embedding's row count, at least vocab_size")
    for key in IGNORED:
        if c[key] is not None:
            note(f"LLaDA config {key}={c[key]!r} is ignored, as LLaDA's own llama block never reads it")
    return ModelConfig(
        name=name, vocab_size=c["embedding_size"] or c["vocab_size"],  # logits cover every embedding row
        block_size=context_length(block_size, c["max_sequence_length"]), n_layer=c["n_layers"], n_head=c["n_heads"],
        n_embd=c["d_model"], intermediate_size=c["mlp_hidden_size"] or c["mlp_ratio"] * c["d_model"],
        n_query_groups=_kv_heads(c), rope_base=float(c["rope_theta"]), norm_eps=float(c["rms_norm_eps"]),
        qkv_bias=bool(c["include_qkv_bias"]), tie_embeddings=bool(c["weight_tying"]), causal=False,
        mask_token_id=int(c["mask_token_id"]),
    )


def _kv_heads(c: dict[str, Any]) -> int:
    """LLaDA's effective_n_kv_heads: n_kv_heads, or 1 / n_heads from multi_query_attention."""
    n_kv, mqa = c["n_kv_heads"], c["multi_query_attention"]
    if mqa is None:
        return n_kv or c["n_heads"]
    implied = 1 if mqa else c["n_heads"]
    if n_kv not in (None, implied):
        raise UserError(f"LLaDA config sets multi_query_attention={mqa} and n_kv_heads={n_kv}, which "
                        f"contradict each other; keep one")
    return implied


def dlm_name(key: str, cfg: ModelConfig) -> str | None:
    """The DLM name of a LLaDA weight; None for one the DLM has no place for."""
    if not key.startswith(PREFIX):
        return None
    key = key.removeprefix(PREFIX)
    if key == "wte.weight":
        return "wte.weight"
    if key == "ln_f.weight":
        return "norm.weight"
    if key == "ff_out.weight" and not cfg.tie_embeddings:
        return "lm_head.weight"
    match = BLOCK_KEY.fullmatch(key)
    if match and match.group(2) in BLOCK_NAMES:
        return f"blocks.{match.group(1)}.{BLOCK_NAMES[match.group(2)]}"
    return None
