"""The config.json and weight names of a folder `sinkdlm export` writes, read both ways: written by
interop/export.py, read by checkpoint.py (every command loads an exported folder as a checkpoint).

config.json is a transformers config: model_type "sinkdlm", `auto_map` naming the shipped code, and
every ModelConfig field at the top level, unchanged except `mask_token_id`, which is the mask's id
as transformers expects (ModelConfig's None, "the row after the vocabulary", is written as that id); the rest of the run's Config (data, optim,
train) sits under CONFIG_KEY, so the folder rebuilds the exact Config. With `--llama` it is a plain
Llama config instead and the whole Config, model included, sits under CONFIG_KEY. The weights are
DLM's names under the wrapper's WEIGHT_PREFIX (`model.wte.weight`), or Llama's names.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

from torch import Tensor

from sinkdlm.config import Config, ModelConfig

MODEL_TYPE = "sinkdlm"
MODEL_CLASS = "SinkDLMForMaskedLM"
CONFIG_FILE_CODE, MODELING_FILE_CODE = "configuration_sinkdlm", "modeling_sinkdlm"
# LLaDA and Dream publish their models under AutoModel; a masked diffusion LM is a masked LM, not a causal one
AUTO_MAP = {"AutoConfig": f"{CONFIG_FILE_CODE}.SinkDLMConfig", "AutoModel": f"{MODELING_FILE_CODE}.{MODEL_CLASS}",
            "AutoModelForMaskedLM": f"{MODELING_FILE_CODE}.{MODEL_CLASS}"}
CONFIG_KEY = "sinkdlm_config"  # the Config beyond the top-level model fields (all of it in the Llama form)
WEIGHT_PREFIX = "model."  # the wrapper holds the DLM as `self.model`
# Hugging Face parameter name (after `model.layers.{i}.`) -> DLM name (after `blocks.{i}.`)
LLAMA_LAYER_NAMES = {
    "self_attn.q_proj.weight": "attn.q.weight", "self_attn.q_proj.bias": "attn.q.bias",
    "self_attn.k_proj.weight": "attn.k.weight", "self_attn.k_proj.bias": "attn.k.bias",
    "self_attn.v_proj.weight": "attn.v.weight", "self_attn.v_proj.bias": "attn.v.bias",
    "self_attn.o_proj.weight": "attn.proj.weight",
    "mlp.gate_proj.weight": "mlp.w_gate.weight", "mlp.up_proj.weight": "mlp.w_up.weight",
    "mlp.down_proj.weight": "mlp.w_down.weight",
    "input_layernorm.weight": "norm_attn.weight", "post_attention_layernorm.weight": "norm_mlp.weight",
}
LLAMA_LAYER_KEY = re.compile(r"model\.layers\.(\d+)\.(.+)")


def hf_config(cfg: Config, dtype: str, eos_id: int | None) -> dict[str, Any]:
    """config.json of the transformers-loadable export."""
    rest = {key: value for key, value in cfg.to_dict().items() if key != "model"}
    return {"model_type": MODEL_TYPE, "architectures": [MODEL_CLASS], "auto_map": AUTO_MAP,
            **dataclasses.asdict(cfg.model), "mask_token_id": cfg.model.mask_id, "eos_token_id": eos_id,
            "pad_token_id": eos_id, "tie_word_embeddings": cfg.model.tie_embeddings, "dtype": dtype,
            CONFIG_KEY: rest}


def is_export_config(data: dict[str, Any]) -> bool:
    """Whether a config.json was written by `sinkdlm export` (either form)."""
    return isinstance(data.get(CONFIG_KEY), dict)


def config_sections(data: dict[str, Any]) -> dict[str, Any]:
    """The Config mapping ({model, data, optim, train}) an exported config.json holds."""
    sections = dict(data[CONFIG_KEY])
    if data.get("model_type") == MODEL_TYPE:
        model = {f.name: data[f.name] for f in dataclasses.fields(ModelConfig) if f.name in data}
        if model.get("mask_token_id") == model.get("vocab_size"):  # transformers' mask_token_id: always an id
            model["mask_token_id"] = None  # ModelConfig's: None = the extra row after the vocabulary
        sections["model"] = model
    return sections


def hf_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    return {WEIGHT_PREFIX + name: tensor for name, tensor in weights.items()}


def dlm_weights(weights: dict[str, Tensor]) -> dict[str, Tensor]:
    """DLM names of an export's weights; other weights unchanged (every DLM has a `wte`, and exports
    made before the prefix existed load as they are)."""
    if f"{WEIGHT_PREFIX}wte.weight" in weights:
        return {name.removeprefix(WEIGHT_PREFIX): tensor for name, tensor in weights.items()}
    return weights
