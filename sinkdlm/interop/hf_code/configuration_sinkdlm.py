"""The configuration of a sinkdlm model exported for transformers (shipped by `sinkdlm export`).

Its keys are sinkdlm's ModelConfig fields, under the same names and with the same meanings; sinkdlm
validated them when it exported the model. The properties below are the ModelConfig properties the
model code reads (sinkdlm's tests check that they agree). Depends on transformers only.
"""

from transformers import PretrainedConfig


class SinkDLMConfig(PretrainedConfig):
    model_type = "sinkdlm"

    @property
    def kv_heads(self) -> int:
        """Key/value heads (grouped-query attention); n_query_groups None means one per head."""
        return self.n_query_groups or self.n_head

    @property
    def head_size(self) -> int:
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mask_id(self) -> int:
        return self.vocab_size if self.mask_token_id is None else self.mask_token_id

    def require_vocab(self) -> int:
        return self.vocab_size

