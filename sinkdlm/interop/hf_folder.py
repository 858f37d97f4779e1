"""A published model folder read without running any of its code: config.json as JSON, the weights
from *.safetensors (one file or shards listed in model.safetensors.index.json) with the safetensors
library, the tokenizer from its files. Nothing is unpickled and no `trust_remote_code` is needed."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from safetensors import SafetensorError, safe_open
from torch import Tensor

from sinkdlm.errors import UserError
from sinkdlm.optional import require

CONFIG = "config.json"
SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
# what a Hub snapshot needs: config, weights and tokenizer files (never *.py code or pickled *.bin)
HUB_FILES = ["*.json", "*.safetensors", "*.txt"]


def first_line(e: BaseException) -> str:
    """An exception's first line, for a one-line UserError (or its type when it has no message)."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0]


def context_length(requested: int | None, own: int) -> int:
    """The block_size an import records: the model's own context unless a shorter one is requested.
    (block_size allocates nothing, RoPE is computed per forward; it bounds prompts and lm-eval's
    max_length, and is training's default data.seq_len.)"""
    return own if requested is None else min(requested, own)


def note(message: str) -> None:
    """One line on stderr for a config value an import accepts although it ignores it, as the
    model's own code does."""
    print(f"note: {message}", file=sys.stderr)


def plain_rope_theta(config: dict[str, Any], default: float, who: str) -> float:
    """The RoPE base of a config written by transformers 4 (rope_theta, rope_scaling) or by 5, which
    moves both into rope_parameters; refuses any RoPE scaling (sinkdlm.model.rope_cache computes
    plain RoPE only). As in transformers, a base inside the mapping wins over rope_theta."""
    mappings = []
    for key in ("rope_scaling", "rope_parameters"):
        rope = config.get(key) or {}
        if not isinstance(rope, dict) or any(isinstance(value, dict) for value in rope.values()):
            raise UserError(f"{who} {key}={rope!r} is not one flat RoPE mapping, the only form sinkdlm "
                            f"reads (e.g. {{'rope_type': 'default', 'rope_theta': 10000.0}}); fix config.json")
        kind = rope.get("rope_type", rope.get("type", "default"))
        if kind != "default":
            raise UserError(f"{who} {key} asks for RoPE scaling {kind!r}, which sinkdlm does not compute (only "
                            f"plain RoPE); convert a model without RoPE scaling or extend sinkdlm.model.rope_cache")
        mappings.append(rope)
    thetas = [rope.get("rope_theta") for rope in mappings] + [config.get("rope_theta"), default]
    return float(next(theta for theta in thetas if theta is not None))


def read_config(folder: Path) -> dict[str, Any]:
    path = folder / CONFIG
    try:
        raw = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise UserError(f"{path} is not a readable JSON config ({type(e).__name__}); pass a model folder "
                        f"with its config.json") from None
    if not isinstance(raw, dict):
        raise UserError(f"{path} does not hold a JSON object; the folder is damaged")
    return raw


def model_type(folder: Path) -> str | None:
    """config.json's model_type, lower case (Dream writes "Dream"), or None without a config.json."""
    if not (folder / CONFIG).is_file():
        return None
    kind = read_config(folder).get("model_type")
    return str(kind).lower() if kind is not None else None


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a folder: the shards its index names, or model.safetensors."""
    if (folder / INDEX).is_file():
        try:
            shards = sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
        except (json.JSONDecodeError, KeyError, AttributeError) as e:
            raise UserError(f"{folder / INDEX} has no readable weight_map ({type(e).__name__}); fetch the model "
                            f"again") from None
        files = [folder / name for name in shards]
    else:
        files = [folder / SINGLE]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        pickled = sorted(p.name for p in folder.glob("*.bin"))
        hint = (f"it holds only pickled weights ({pickled[0]}...), which sinkdlm never loads: fetch the "
                f"*.safetensors files" if pickled else "the download is incomplete, fetch the model again")
        raise UserError(f"{folder} lacks {missing[0]}; {hint}")
    return files


def read_weights(folder: Path, rename: Callable[[str], str | None]) -> dict[str, Tensor]:
    """Every tensor of the folder under its sinkdlm name, in its published dtype (bf16 for LLaDA-8B and
    Dream-7B: half the memory and disk of float32; loading casts to the model's dtype). `rename` gives
    the name, '' to drop a tensor on purpose, None for a tensor sinkdlm has no place for: all names are
    checked before any tensor is read, so an unsupported checkpoint is refused at once."""
    files = weight_files(folder)
    names = {f: _keys(f) for f in files}
    unknown = [key for keys in names.values() for key in keys if rename(key) is None]
    if unknown:
        raise UserError(f"{folder} has weights sinkdlm has no place for ({unknown[:3]}); this checkpoint's "
                        f"architecture is not the one its config.json names, or a variant sinkdlm does not import")
    out: dict[str, Tensor] = {}
    for f, keys in names.items():
        with safe_open(str(f), framework="pt") as reader:
            for key in keys:
                name = rename(key)
                if name:
                    out[name] = reader.get_tensor(key)
    return out


def _keys(path: Path) -> list[str]:
    try:
        with safe_open(str(path), framework="pt") as reader:
            return list(reader.keys())
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path} is not a readable safetensors file ({first_line(e)}); fetch it "
                        f"again") from None


def read_tokenizer(folder: Path, slow_bpe_class: str | None = None) -> Any:
    """The folder's fast tokenizer: from tokenizer.json, or built from vocab.json + merges.txt by
    transformers' `slow_bpe_class` (a model whose own tokenizer class is remote code, e.g. Dream's)."""
    transformers = require("transformers", "reading a model folder's tokenizer")
    if (folder / "tokenizer.json").is_file():
        cls = transformers.PreTrainedTokenizerFast
    elif slow_bpe_class and (folder / "vocab.json").is_file() and (folder / "merges.txt").is_file():
        cls = getattr(transformers, slow_bpe_class)
    else:
        wanted = "tokenizer.json" + (" (or vocab.json + merges.txt)" if slow_bpe_class else "")
        raise UserError(f"{folder} has no {wanted}; fetch the model's tokenizer files too")
    try:
        return cls.from_pretrained(str(folder))
    except (OSError, ValueError) as e:
        raise UserError(f"could not read the tokenizer in {folder} ({type(e).__name__}: "
                        f"{first_line(e)}); fetch the model's tokenizer files again") from None


def hub_snapshot(name: str) -> Path:
    """A Hub model's config, safetensors and tokenizer files, downloaded (or found in the HF cache)."""
    hub = require("huggingface_hub", "downloading a model from the Hugging Face Hub")
    try:
        return Path(hub.snapshot_download(name, allow_patterns=HUB_FILES))
    except Exception as e:  # the Hub client raises many types (HTTP, auth, not found)
        raise UserError(f"could not download {name} from the Hub ({type(e).__name__}); check the name and "
                        f"the network, or pass a local folder") from None


def hub_model_type(name: str) -> str | None:
    """The model_type of a Hub model's config.json (one small file), or None when it cannot be read."""
    hub = require("huggingface_hub", "reading a model's config from the Hugging Face Hub")
    try:
        return model_type(Path(hub.hf_hub_download(name, CONFIG)).parent)
    except Exception:  # left to transformers, whose loader words its own errors
        return None
