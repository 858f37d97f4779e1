"""The rows an import adds to a model's embedding: the mask token's and the sinks'.

Every importer (a causal LM through transformers, LLaDA, Dream, SMDM's lit_gpt files) ends here. Both
start from the mean of the real tokens' embeddings by default, a vector of the scale and direction
the first layer already expects, so the imported model's activations stay in range.
"""

from __future__ import annotations

import torch
from torch import Tensor

from sinkdlm.config import ModelConfig
from sinkdlm.errors import UserError

SINK_INITS = ("mean", "bos", "zero", "random")
MASK_INIT = "mean of the real tokens' input embeddings"


def sink_kind(sink_init: str) -> str:
    """ModelConfig.sink_init for a SINK_INITS choice: zero sinks stay "zero", every other start is a
    vector the model learns from ("learned")."""
    return "zero" if sink_init == "zero" else "learned"


def add_mask_and_sinks(weights: dict[str, Tensor], cfg: ModelConfig, sink_init: str = "mean",
                       n_real_tokens: int | None = None, bos_id: int | None = None,
                       seed: int = 0) -> dict[str, Tensor]:
    """The DLM's extra embedding row (id vocab_size) and the sinks, added to imported weights. The
    extra row is the mask: the mean real embedding; for a model with its own mask id in the
    vocabulary, a copy of that row (no input uses it)."""
    wte = weights.get("wte.weight")
    if wte is None or wte.shape[0] != cfg.vocab_size:
        raise UserError(f"the token embedding is missing or does not have vocab_size={cfg.vocab_size} rows; "
                        f"the checkpoint is incomplete")
    real = wte[: n_real_tokens or cfg.vocab_size].float()  # statistics in float32 whatever the weights' dtype
    extra = real.mean(0, keepdim=True) if cfg.mask_token_id is None else wte[cfg.mask_id : cfg.mask_id + 1]
    weights["wte.weight"] = torch.cat([wte, extra.to(wte.dtype)])
    if cfg.sink_tokens:
        weights["sink"] = sink_vectors(real, cfg.sink_tokens, sink_init, bos_id, seed).to(wte.dtype)
    return weights


def sink_vectors(embeddings: Tensor, n: int, init: str, bos_id: int | None, seed: int) -> Tensor:
    """(n, E) initial sinks: mean embedding | the BOS embedding | zeros | normal at the embeddings' std."""
    if init == "mean":
        return embeddings.mean(0, keepdim=True).repeat(n, 1)
    if init == "bos":
        if bos_id is None:
            raise UserError("--sink-init bos needs a model with bos_token_id; use --sink-init mean")
        return embeddings[bos_id : bos_id + 1].repeat(n, 1)
    if init == "zero":
        return torch.zeros(n, embeddings.shape[1])
    if init == "random":
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(n, embeddings.shape[1], generator=gen) * embeddings.std()
    raise UserError(f"sink init {init!r} is not one of {list(SINK_INITS)}")
