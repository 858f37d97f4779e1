"""Dream (Dream-org/Dream-v0-Base-7B, -Instruct): Qwen2 weights under Qwen2's names, trained as a
diffusion LM, read from its HF folder without its own code.

Dream's layer is Qwen2's (q/k/v with biases, no o_proj bias, SwiGLU MLP, rotate-halves RoPE over
hidden_size / num_attention_heads, grouped key/value heads) with bidirectional attention. It keeps
the AR habit: the hidden state at position i predicts token i + 1; its sampler shifts the logits
right by one (the first position repeats), which is the DLM's `logit_shift`. Its mask token
(config mask_token_id, 151666) is a row of the vocabulary; its tokenizer is Qwen2's byte-level BPE,
shipped as vocab.json + merges.txt for a tokenizer class of its own (built here as Qwen2's).
The RoPE base is rope_theta, or the one inside rope_parameters of a config transformers 5 re-saved;
RoPE scaling in either is refused. use_sliding_window=true is accepted with a note: Dream's own
attention has no sliding window (nor has the DLM's).
"""

from __future__ import annotations

from typing import Any

from sinkdlm.config import ModelConfig
from sinkdlm.errors import UserError
from sinkdlm.interop.hf_folder import context_length, note, plain_rope_theta

MODEL_TYPE = "dream"
TOKENIZER_CLASS = "Qwen2TokenizerFast"  # what Dream's DreamTokenizer is, without its remote code
# configuration_dream.DreamConfig's defaults, for keys a config.json leaves out
DEFAULTS: dict[str, Any] = {
    "vocab_size": 151936, "hidden_size": 4096, "intermediate_size": 22016, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 32, "hidden_act": "silu", "max_position_embeddings": 32768,
    "rms_norm_eps": 1e-6, "tie_word_embeddings": False, "rope_theta": 10000.0, "rope_scaling": None,
    "use_sliding_window": False, "mask_token_id": 151666,
}


def model_config(raw: dict[str, Any], name: str, block_size: int | None) -> ModelConfig:
    """The DLM config of a Dream config.json (no sinks); refuses what the DLM would compute differently."""
    c = {**DEFAULTS, **raw}
    if c["hidden_act"] != "silu":
        raise UserError(f"Dream config hidden_act={c['hidden_act']!r} is not supported (the DLM's MLP is SwiGLU)")
    if c["use_sliding_window"]:
        note("Dream config use_sliding_window=true is ignored, as Dream's own code ignores it (its attention "
             "has no sliding window, at most a warning): both attend over the whole sequence")
    rope_base = plain_rope_theta(c, DEFAULTS["rope_theta"], "Dream config")
    n_head = c["num_attention_heads"]
    if c["hidden_size"] % n_head:
        raise UserError(f"Dream config hidden_size={c['hidden_size']} is not divisible by num_attention_heads={n_head}")
    if c.get("head_dim") not in (None, c["hidden_size"] // n_head):
        raise UserError(f"Dream config head_dim={c['head_dim']} disagrees with hidden_size / num_attention_heads = "
                        f"{c['hidden_size'] // n_head}, Dream's head size (Dream's own code sizes its RoPE by "
                        f"head_dim and fails); remove head_dim from config.json or correct it")
    return ModelConfig(
        name=name, vocab_size=c["vocab_size"], block_size=context_length(block_size, c["max_position_embeddings"]),
        n_layer=c["num_hidden_layers"], n_head=n_head, n_embd=c["hidden_size"],
        intermediate_size=c["intermediate_size"], n_query_groups=c["num_key_value_heads"] or n_head,
        rope_base=rope_base, norm_eps=float(c["rms_norm_eps"]), qkv_bias=True,
        tie_embeddings=bool(c["tie_word_embeddings"]), causal=False, logit_shift=True,
        mask_token_id=int(c["mask_token_id"]),
    )
