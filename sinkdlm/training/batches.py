"""Where a run's batches come from: pretraining windows or SFT examples behind the same two calls,
and the model fitted to that data (vocabulary, tokenizer, length)."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from sinkdlm import checkpoint as ckpt
from sinkdlm.config import Config
from sinkdlm.errors import UserError

SFT_VAL_SHARE = 10  # SFT holds out at most 1 in this many examples (and at most data.val_windows)


@dataclass
class Source:
    """Where batches come from. `response` masks are None for pretraining (every token maskable)."""

    vocab_size: int
    eos_id: int
    tokenizer_path: Path | None
    identity: dict[str, Any]  # what a resumed run must find unchanged (saved in each checkpoint's meta)
    batch: Any  # (step, indices) -> (ids (n, L), response mask (n, L) | None)
    val: tuple[Tensor, Tensor | None]  # fixed held-out examples


def pretrain_source(cfg: Config) -> Source:
    from sinkdlm.data.shards import PackedData, fixed_windows, window_sampler

    data = PackedData(cfg.data.path)
    seq = cfg.seq_len
    windows = window_sampler(cfg.data.order, data.tokens("train"), seq, cfg.train.seed, cfg.train.global_batch)
    val = fixed_windows(data.tokens("val"), seq, cfg.data.val_windows)
    identity = {**data.meta, "order": cfg.data.order}  # another window order is another trajectory
    return Source(data.vocab_size, data.eos_id, Path(cfg.data.path) / data.meta["tokenizer_file"], identity,
                  lambda step, idx: (windows(step, idx), None), (val, None))


def sft_source(cfg: Config) -> Source:
    from sinkdlm.data.sft import SFTData, sft_indices

    if not cfg.train.init_from:
        raise UserError("SFT needs train.init_from=<pretrained checkpoint> (its tokenizer defines the data)")
    tok_path = ckpt.resolve(cfg.train.init_from) / ckpt.TOKENIZER
    eos = ckpt.load_meta(cfg.train.init_from).get("eos_id")
    if eos is None:
        raise UserError(f"checkpoint {cfg.train.init_from} records no eos_id; SFT pads responses with EOS")
    data = SFTData(cfg.data.sft_path, ckpt.load_tokenizer(cfg.train.init_from), cfg.seq_len, eos)
    # the last examples are held out for validation, and never trained on
    n_val = min(cfg.data.val_windows, len(data) // SFT_VAL_SHARE)
    if n_val < 1:
        raise UserError(f"{cfg.data.sft_path} has {len(data)} examples; SFT needs at least {SFT_VAL_SHARE} "
                        f"to hold some out for validation")
    n_train = len(data) - n_val

    def batch(step: int, idx: list[int]) -> tuple[Tensor, Tensor]:
        return data.batch(sft_indices(cfg.train.seed, step, idx, n_train))

    identity = {"sft_data_sha256": hashlib.sha256(Path(cfg.data.sft_path).read_bytes()).hexdigest()}
    return Source(cfg.model.require_vocab(), eos, tok_path, identity, batch,
                  data.batch(list(range(n_train, len(data)))))


def resolve_model(cfg: Config, source: Source) -> Config:
    """Fill the vocabulary from the data, and with init_from the architecture from the checkpoint
    (the config's runtime fields stay, see ModelConfig); reject mismatches."""
    if cfg.train.init_from:
        init_model = ckpt.load_config_of(cfg.train.init_from).model
        cfg.model = init_model.with_runtime(**cfg.model.runtime())
    if cfg.model.vocab_size is None:
        cfg.model.vocab_size = source.vocab_size
    # imported models may pad their embedding past the tokenizer (Qwen2.5: 151,936 rows, 151,665 tokens)
    too_small = cfg.model.vocab_size < source.vocab_size
    if too_small or (not cfg.train.init_from and cfg.model.vocab_size != source.vocab_size):
        raise UserError(f"model.vocab_size={cfg.model.vocab_size} but the data's tokenizer has "
                        f"{source.vocab_size} tokens; re-prepare the data with the model's tokenizer")
    if cfg.train.init_from and source.tokenizer_path:
        check_same_tokenizer(ckpt.resolve(cfg.train.init_from) / ckpt.TOKENIZER, source.tokenizer_path)
    if cfg.seq_len > cfg.model.block_size:
        raise UserError(f"data.seq_len={cfg.seq_len} exceeds model.block_size={cfg.model.block_size}; "
                        f"lower data.seq_len or raise model.block_size")
    return cfg


def check_same_tokenizer(model_tok: Path, data_tok: Path) -> None:
    """Data tokenized with another vocabulary would train the model on foreign ids."""
    from tokenizers import Tokenizer

    if not model_tok.is_file() or model_tok.resolve() == data_tok.resolve():
        return
    if Tokenizer.from_file(str(model_tok)).get_vocab() != Tokenizer.from_file(str(data_tok)).get_vocab():
        raise UserError(f"the data's tokenizer ({data_tok}) differs from train.init_from's ({model_tok}); "
                        f"prepare the data with --tokenizer {model_tok}")
