"""Import SMDM's lit_gpt checkpoints (and the sink paper's, a fork of SMDM) as sinkdlm checkpoints.

SMDM (github.com/ML-GSAI/SMDM) trains `lit_gpt.diffmodel.TransEncoder`: a Llama-style bidirectional
Transformer whose weights are named `transformer.wte`, `transformer.h.{i}.norm_1 / attn.attn /
attn.proj / norm_2 / mlp.swiglu.w1, w2, w3`, `transformer.ln_f` and `lm_head`. Its embedding has one
row more than the head (the mask token, id = head size = 32,000); the sink paper's model adds one more
row, the sink (id 32,001, RoPE position 0, attending only to itself), and its gated-attention baseline
an extra sigmoid gate from the normed input. Every piece maps one to one onto `sinkdlm.model.DLM`.

A checkpoint is Fabric's `.pth` (a pickle, `{"model": state_dict, "optimizer": ..., "iter_num": ...}`
or a bare state dict), read with `torch.load(weights_only=True)` only, or the `.safetensors` state
dict SMDM publishes. What the tensors cannot tell (rope base, norm eps) is SMDM's, the same for all
of its 30 model sizes; the head count comes from SMDM's size table by (width, MLP width), else from
`n_head`. See docs/import-smdm.md.
"""

from __future__ import annotations

import dataclasses
import pickle  # only for its exception type: loading is weights_only
import re
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import Tensor

from sinkdlm.checkpoint import NEEDED_CLASS, check_state_shapes, save_checkpoint
from sinkdlm.config import SMDM_SEQ_LEN, SMDM_SIZES, Config, ModelConfig
from sinkdlm.errors import UserError
from sinkdlm.interop.added_rows import sink_kind, sink_vectors
from sinkdlm.interop.hf_folder import first_line

SUFFIXES = (".pth", ".pt", ".safetensors")  # a single file: Fabric's checkpoint or a state dict
# the tokenizer every SMDM script loads (the Llama-2 SentencePiece vocabulary of 32,000 tokens)
DEFAULT_TOKENIZER = "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T"
BOS = "<s>"  # Llama-2's, for --sink-init bos
ROPE_BASE = 10000.0  # lit_gpt's build_rope_cache default; SMDM's configs never change it
NORM_EPS = 1e-5  # every Diff_LLaMA config
WRAPPER_PREFIXES = ("_forward_module.", "_orig_mod.", "module.")  # Fabric / torch.compile / DDP wrappers
SMDM_LAYER_KEY = re.compile(r"transformer\.h\.(\d+)\.(.+)")
# the gate of the paper's gated-attention baseline: its name in the fork is not public (docs/import-smdm.md)
GATE_NAMES = ("attn.gate.weight", "attn.gate_proj.weight", "attn.g_proj.weight")
# lit_gpt name (after `transformer.h.{i}.`) -> DLM name (after `blocks.{i}.`); attn.attn and w12 are split
SMDM_LAYER_NAMES = {
    "norm_1.weight": "norm_attn.weight", "norm_2.weight": "norm_mlp.weight",
    "attn.proj.weight": "attn.proj.weight",
    "mlp.swiglu.w1.weight": "mlp.w_gate.weight", "mlp.swiglu.w2.weight": "mlp.w_up.weight",
    "mlp.swiglu.w3.weight": "mlp.w_down.weight",
    # upstream lit_gpt's LLaMAMLP (SMDM replaced it by xformers' SwiGLU)
    "mlp.fc_1.weight": "mlp.w_gate.weight", "mlp.fc_2.weight": "mlp.w_up.weight",
    "mlp.proj.weight": "mlp.w_down.weight",
}
GATE_UP_NAMES = ("mlp.swiglu.w1.weight", "mlp.fc_1.weight", "mlp.swiglu.w12.weight")


def is_smdm_file(source: str | Path) -> bool:
    return Path(source).suffix in SUFFIXES


# ----------------------------------------------------------------------------------------------
# reading the file


def load_state(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(state dict with wrapper prefixes removed, the rest of a Fabric checkpoint) of an SMDM file."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise UserError(f"checkpoint file {path} does not exist; pass an SMDM .pth or .safetensors file")
    loaded = _safetensors(path) if path.suffix == ".safetensors" else _pickle(path)
    extra: dict[str, Any] = {}
    if isinstance(loaded, dict) and isinstance(loaded.get("model"), dict):
        extra = {k: v for k, v in loaded.items() if isinstance(v, (int, float, str))}
        loaded = loaded["model"]
    if not isinstance(loaded, dict) or not loaded or \
            not all(isinstance(k, str) and isinstance(v, Tensor) for k, v in loaded.items()):
        raise UserError(f"{path} holds neither a state dict nor Fabric's {{'model': state_dict, ...}}; "
                        f"pass a checkpoint saved by SMDM's scripts")
    return {_unwrapped(k): v for k, v in loaded.items()}, extra


def _safetensors(path: Path) -> dict[str, Tensor]:
    try:
        return load_file(str(path))
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({first_line(e)}); download it again") from None


def _pickle(path: Path) -> Any:
    try:
        # mmap: the optimizer state beside the model (twice its size) is never read into memory. Only
        # torch's zip format can be memory-mapped; a file of torch < 1.6's format is read whole.
        return torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except pickle.UnpicklingError as e:
        needed = NEEDED_CLASS.search(str(e))
        what = f"the class {needed.group(1)}" if needed else "objects other than tensors and plain data"
        raise UserError(f"{path} holds {what}, which only pickle code execution could load and sinkdlm never "
                        f"runs code from a file; save the model's state_dict() alone (or as safetensors)") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise UserError(f"{path} is not a readable torch checkpoint ({first_line(e)}); download it again") from None


def _unwrapped(key: str) -> str:
    for prefix in WRAPPER_PREFIXES:
        key = key.removeprefix(prefix)
    return key


# ----------------------------------------------------------------------------------------------
# the config the tensors imply


@dataclass(frozen=True)
class Layout:
    """What the tensors say beyond ModelConfig: sinks stored in the embedding, the gate's name."""

    n_sink_rows: int  # embedding rows after the mask row: the paper's sinks
    gate_name: str | None


def infer_config(state: dict[str, Tensor], n_head: int | None = None, sink_position: str = "front",
                 block_size: int | None = None) -> tuple[ModelConfig, Layout]:
    """The DLM config of a lit_gpt TransEncoder state dict; refuses what DLM cannot reproduce.
    block_size None: SMDM's own context, SMDM_SEQ_LEN (every Diff_LLaMA config's)."""
    head, wte = _required(state, "lm_head.weight"), _required(state, "transformer.wte.weight")
    vocab, n_embd = head.shape
    n_sink = wte.shape[0] - vocab - 1
    if n_sink < 0 or wte.shape[1] != n_embd:
        raise UserError(f"transformer.wte.weight has shape {tuple(wte.shape)}, but SMDM's embedding has the "
                        f"head's {vocab} rows + the mask row (+ sink rows) of width {n_embd}; not an SMDM checkpoint")
    n_layer = _layer_count(state)
    first = _layer(state, 0)
    gate_up = next((first[n] for n in GATE_UP_NAMES if n in first), None)
    if gate_up is None:
        raise UserError(f"layer 0 has no SwiGLU weights ({' / '.join(GATE_UP_NAMES)}); not an SMDM checkpoint")
    intermediate = gate_up.shape[0] // (2 if "mlp.swiglu.w12.weight" in first else 1)
    if n_head is not None and n_head < 1:
        raise UserError(f"--n-head {n_head} must be >= 1")
    heads = n_head or _heads_from_table(n_embd, intermediate)
    if n_embd % heads:
        raise UserError(f"n_head={heads} does not divide the width {n_embd}; pass the model's --n-head")
    head_dim = n_embd // heads
    groups = _query_groups(_required(state, "transformer.h.0.attn.attn.weight"), heads, head_dim)
    gate_name = next((n for n in GATE_NAMES if n in first), None)
    gate = "none" if gate_name is None else _gate_kind(first[gate_name], heads, head_dim)
    size = next((s for s, shape in SMDM_SIZES.items() if shape == (n_layer, heads, n_embd, intermediate)), None)
    cfg = ModelConfig(
        name=f"Diff_LLaMA_{size}M" if size else "smdm", vocab_size=vocab, block_size=block_size or SMDM_SEQ_LEN,
        n_layer=n_layer, n_head=heads, n_embd=n_embd, intermediate_size=intermediate,
        n_query_groups=groups, rope_base=ROPE_BASE, norm_eps=NORM_EPS,
        sink_tokens=n_sink, sink_position=sink_position, attn_gate=gate)
    return cfg, Layout(n_sink, gate_name)


def _required(state: dict[str, Tensor], key: str) -> Tensor:
    if key not in state:
        raise UserError(f"the checkpoint has no {key}; it is not an SMDM (lit_gpt TransEncoder) state dict")
    return state[key]


def _layer(state: dict[str, Tensor], i: int) -> dict[str, Tensor]:
    prefix = f"transformer.h.{i}."
    return {k.removeprefix(prefix): v for k, v in state.items() if k.startswith(prefix)}


def _layer_count(state: dict[str, Tensor]) -> int:
    found = {int(m.group(1)) for m in map(SMDM_LAYER_KEY.fullmatch, state) if m}
    if not found or found != set(range(len(found))):
        raise UserError(f"the checkpoint's layers are {sorted(found)[:5]}..., not 0..n-1; it is incomplete")
    return len(found)


def _heads_from_table(n_embd: int, intermediate: int) -> int:
    """SMDM's head count for this (width, MLP width): unique in its size table, when listed there."""
    heads = {h for _, h, e, i in SMDM_SIZES.values() if (e, i) == (n_embd, intermediate)}
    if len(heads) != 1:
        raise UserError(f"width {n_embd} with MLP {intermediate} is none of SMDM's sizes, so the number of "
                        f"attention heads cannot be read from the tensors; pass --n-head")
    return heads.pop()


def _query_groups(qkv: Tensor, n_head: int, head_dim: int) -> int:
    """lit_gpt's fused qkv has (n_head + 2 n_query_groups) x head_dim rows."""
    rows = qkv.shape[0]
    groups, rest = divmod(rows // head_dim - n_head, 2)
    if rows % head_dim or rest or groups < 1 or n_head % groups:
        raise UserError(f"attn.attn.weight has {rows} rows, which no grouping of {n_head} heads of size "
                        f"{head_dim} gives; the head count is wrong, pass the model's --n-head")
    return groups


def _gate_kind(gate: Tensor, n_head: int, head_dim: int) -> str:
    """An elementwise gate has a row per attention output channel, a headwise one a row per head."""
    kinds = {n_head * head_dim: "elementwise", n_head: "headwise"}
    if gate.shape[0] not in kinds:
        raise UserError(f"the attention gate has {gate.shape[0]} rows, neither {n_head * head_dim} "
                        f"(elementwise) nor {n_head} (headwise); it cannot be imported")
    return kinds[gate.shape[0]]


# ----------------------------------------------------------------------------------------------
# the weights


def convert_state(state: dict[str, Tensor], cfg: ModelConfig, layout: Layout) -> dict[str, Tensor]:
    """lit_gpt weights -> DLM weights; every tensor must find its place."""
    wte = state["transformer.wte.weight"].float()
    vocab = cfg.require_vocab()
    out = {"wte.weight": wte[: vocab + 1].clone(), "lm_head.weight": state["lm_head.weight"].float().clone(),
           "norm.weight": _required(state, "transformer.ln_f.weight").float().clone()}
    if layout.n_sink_rows:
        out["sink"] = wte[vocab + 1:].clone()
    for i in range(cfg.n_layer):
        out.update(_convert_layer(_layer(state, i), i, cfg, layout))
    known = {"transformer.wte.weight", "lm_head.weight", "transformer.ln_f.weight"}
    unused = [k for k in state if k not in known and not SMDM_LAYER_KEY.fullmatch(k)]
    if unused:
        raise UserError(f"weights {unused[:3]} have no place in sinkdlm's model; this is not a plain SMDM "
                        f"TransEncoder checkpoint")
    return out


def _convert_layer(layer: dict[str, Tensor], i: int, cfg: ModelConfig, layout: Layout) -> dict[str, Tensor]:
    out, pre = {}, f"blocks.{i}."
    for name, value in layer.items():
        value = value.detach().float()
        if name == "attn.attn.weight":
            q, k, v = split_qkv(value, cfg.n_head, cfg.kv_heads, cfg.head_size)
            out.update({pre + "attn.q.weight": q, pre + "attn.k.weight": k, pre + "attn.v.weight": v})
        elif name == "mlp.swiglu.w12.weight":  # xformers packs w1 (silu'd) above w2
            gate, up = value.chunk(2, dim=0)
            out.update({pre + "mlp.w_gate.weight": gate.clone(), pre + "mlp.w_up.weight": up.clone()})
        elif name == layout.gate_name:
            out[pre + "attn.gate.weight"] = value.clone()
        elif name in SMDM_LAYER_NAMES:
            out[pre + SMDM_LAYER_NAMES[name]] = value.clone()
        else:
            raise UserError(f"transformer.h.{i}.{name} has no place in sinkdlm's model (biases, LayerNorm and "
                            f"other MLPs are not SMDM's); it cannot be imported")
    return out


def split_qkv(weight: Tensor, n_head: int, groups: int, head_dim: int) -> tuple[Tensor, Tensor, Tensor]:
    """lit_gpt's fused qkv rows are grouped: per KV group its n_head/groups query heads, then its key,
    then its value. Query head h belongs to group h // (n_head / groups), as in DLM's repeat_interleave."""
    per_group = n_head // groups
    rows = weight.view(groups, per_group + 2, head_dim, -1)
    q, k, v = rows.split((per_group, 1, 1), dim=1)
    return tuple(t.reshape(-1, weight.shape[1]).clone() for t in (q, k, v))  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------------
# the command


def convert_smdm(source: str | Path, out_dir: str | Path, tokenizer: str | None = None,
                 n_head: int | None = None, sink_tokens: int = 0, sink_init: str = "mean",
                 sink_position: str = "front", block_size: int | None = None) -> Path:
    """`sinkdlm convert --from file.pth`: an SMDM checkpoint -> a step-0 sinkdlm checkpoint in out_dir.

    sink_tokens adds new sinks (initialised by sink_init) to a checkpoint that has none; a checkpoint
    of the sink paper brings its own."""
    from sinkdlm.data.tokenizer import eos_id, load_tokenizer

    state, extra = load_state(source)  # memory-mapped: cheap before the tokenizer's download
    cfg, layout = infer_config(state, n_head, sink_position, block_size)
    if sink_tokens and layout.n_sink_rows:
        raise UserError(f"{source} already has {layout.n_sink_rows} sink token(s) (embedding rows after the "
                        f"mask row); drop --sink-tokens")
    tok = load_tokenizer(tokenizer or DEFAULT_TOKENIZER)
    n_tokens = tok.get_vocab_size()
    if n_tokens > cfg.require_vocab():
        raise UserError(f"the tokenizer has {n_tokens} tokens but the checkpoint's head has {cfg.vocab_size}; "
                        f"pass the tokenizer the model was trained with (--tokenizer)")
    weights = convert_state(state, cfg, layout)
    sink_from = "trained (the checkpoint's sink rows)" if layout.n_sink_rows else sink_init
    if sink_tokens:
        weights["sink"] = sink_vectors(weights["wte.weight"][:n_tokens], sink_tokens, sink_init,
                                       tok.token_to_id(BOS), seed=0)
        cfg = dataclasses.replace(cfg, sink_tokens=sink_tokens, sink_init=sink_kind(sink_init))
    check_state_shapes(weights, cfg, f"after mapping, the weights of {source} do not fit one model",
                       "its layers differ from each other, it cannot be imported")
    meta = {"eos_id": eos_id(tok), "converted_from": str(source), "tokenizer_size": n_tokens,
            "mask_init": "trained (the checkpoint's mask row)", "sink_init": sink_from if cfg.sink_tokens else None,
            "tokens": 0, **{f"source_{k}": v for k, v in extra.items()}}
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        tok.save(str(tok_file))
        return save_checkpoint(out_dir, 0, weights, Config(model=cfg), meta, tokenizer=tok_file)
