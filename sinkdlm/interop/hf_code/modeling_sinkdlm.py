"""A sinkdlm masked diffusion LM for transformers (shipped by `sinkdlm export`; needs torch and
transformers only).

The network is sinkdlm's own: sinkdlm_model.py and sinkdlm_attention.py are sinkdlm's model.py and
attention.py, copied at export time with their sinkdlm imports made relative. Attention is
bidirectional; logits cover the real vocabulary (the mask token, id config.mask_token_id, is never
predicted).
"""


import torch
from transformers import PreTrainedModel
from transformers.modeling_outputs import MaskedLMOutput

from .configuration_sinkdlm import SinkDLMConfig

# transformers copies the files a remote module imports only when they are imported as
# `from .name import ...`; sinkdlm_model imports sinkdlm_attention as a module, so it is named here.
from .sinkdlm_attention import sdpa as _  # noqa: F401
from .sinkdlm_model import DLM


class SinkDLMForMaskedLM(PreTrainedModel):
    """forward(input_ids (B, T), attention_mask (B, T), 1 = token, 0 = padding) -> logits (B, T, vocab)."""

    config_class = SinkDLMConfig
    base_model_prefix = "model"
    _no_split_modules = ["Block"]

    def __init__(self, config: SinkDLMConfig) -> None:
        super().__init__(config)
        self.model = DLM(config)
        self.post_init()

    def _init_weights(self, module: torch.nn.Module) -> None:
        """DLM initialises its own parameters when built; a loaded checkpoint replaces every one."""

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                return_dict: bool | None = None) -> MaskedLMOutput:
        logits = self.model(input_ids, attention_mask)
        if return_dict is False:
            return (logits,)
        return MaskedLMOutput(logits=logits)
