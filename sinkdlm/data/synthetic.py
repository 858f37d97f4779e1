"""Synthetic corpora on which attention sinks form: masked Bigram-Backcopy and its far-copy variant.

After Guo et al. 2024 ("Active-Dormant Attention Heads", arXiv 2410.13835): sequences from a
character bigram model (estimated on the demo corpus, its `vocab` most frequent characters) in which
the `k` most frequent visible characters are triggers (whitespace is not: in Shakespeare a space
follows a space often enough to turn a space trigger into long runs of one symbol). Two rules decide
the token after a trigger:

- `bigram-backcopy`: it copies the token before the trigger (x[i+1] = x[i-1]) unless that is a
  trigger too (then the bigram draws, so no trigger copies itself into a run); a copy head looks two
  positions back and is needed only after triggers.
- `bigram-induction`: it repeats what followed the trigger's previous occurrence in the same
  document; the first occurrence draws from the bigram among non-triggers. The copy source is far
  away, so the copy head is needed only at copy positions and has nothing to do elsewhere.

A document is `length` symbols written as space-separated names, so a word-level tokenizer over the
symbols (`symbol_tokenizer`) encodes it one token per symbol; no BOS (a DLM has none), EOS ends
each document. Everything is a function of the spec: the same `synthetic:NAME:seed=S,...` writes
the same corpus. `task_meta` is what meta.json records: the rule, the trigger ids, and the
Bayes-optimal accuracy at copy positions and the bigram entropy elsewhere.
"""

from __future__ import annotations

import functools
import math
import unicodedata
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from sinkdlm.data.tokenizer import BPE_EOS
from sinkdlm.errors import UserError

PREFIX = "synthetic:"
RULES = ("bigram-backcopy", "bigram-induction")
TOKENIZER_SPEC = "symbols"  # the word-level tokenizer over the task's symbols (the only one it takes)
UNKNOWN = "<unk>"  # never produced: every symbol is in the vocabulary
NO_SOURCE = -1  # a copy target whose rule input lies outside the window (or a position with no rule)


@dataclass(frozen=True)
class SyntheticTask:
    """`synthetic:RULE[:key=value,...]`; the keys are these fields."""

    rule: str
    seed: int = 0  # seeds the sequences
    length: int = 63  # symbols per document (+ its EOS = 64 tokens)
    k: int = 3  # triggers: the k most frequent visible symbols
    vocab: int = 64  # symbols: the demo corpus's most frequent characters
    docs: int = 50_000  # documents written

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise UserError(f"synthetic task {self.rule!r} does not exist; choose from "
                            f"{', '.join(PREFIX + r for r in RULES)}")
        limits = {"seed": 0, "length": 3, "k": 1, "vocab": 2, "docs": 1}
        for name, low in limits.items():
            if getattr(self, name) < low:
                raise UserError(f"synthetic task option {name}={getattr(self, name)} should be >= {low}")
        if self.k >= self.vocab:
            raise UserError(f"synthetic task option k={self.k} should be below vocab={self.vocab} "
                            f"(some symbols must not be triggers)")

    @property
    def spec(self) -> str:
        return f"{PREFIX}{self.rule}:" + ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self)[1:])


def is_synthetic(source: str | None) -> bool:
    return bool(source) and source.startswith(PREFIX)


def parse(source: str) -> SyntheticTask:
    """`synthetic:RULE[:key=value,...]` -> the task (unknown keys and bad values are UserErrors)."""
    rule, _, options = source[len(PREFIX):].partition(":")
    known = {f.name for f in fields(SyntheticTask)} - {"rule"}
    values: dict[str, int] = {}
    for item in filter(None, options.split(",")):
        key, sep, value = item.partition("=")
        if not sep or key not in known or not value.lstrip("-").isdigit():
            raise UserError(f"synthetic option {item!r} in {source!r} should be key=integer with key one of "
                            f"{', '.join(sorted(known))}, e.g. {PREFIX}{RULES[0]}:seed=1,k=3")
        values[key] = int(value)
    return SyntheticTask(rule, **values)


# ---- the bigram model ----------------------------------------------------------------------------


def symbol_name(char: str) -> str:
    """A character as one whitespace-free word: itself when visible, else <U+XXXX>."""
    visible = not char.isspace() and unicodedata.category(char)[0] not in "CZ"
    return char if visible else f"<U+{ord(char):04X}>"


def demo_text() -> str:
    """The demo corpus as one text (the bigram's source; tests replace it with a small one)."""
    from sinkdlm.data.shakespeare import demo_corpus_texts

    return "".join(demo_corpus_texts())


@functools.lru_cache(maxsize=4)
def bigram_model(vocab: int) -> tuple[tuple[str, ...], np.ndarray, np.ndarray]:
    """(symbol names by frequency, unigram (V,), bigram rows P(next | current) (V, V)) of the demo
    corpus restricted to its `vocab` most frequent characters (the others are dropped from the text)."""
    text = demo_text()
    chars, counts = np.unique(np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32), return_counts=True)
    if len(chars) < vocab:
        raise UserError(f"synthetic option vocab={vocab} exceeds the demo corpus's {len(chars)} characters")
    keep = chars[np.argsort(-counts, kind="stable")[:vocab]]
    index = np.full(int(chars.max()) + 1, -1, dtype=np.int64)
    index[keep] = np.arange(vocab)
    ids = index[np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)]
    ids = ids[ids >= 0]
    pairs = np.zeros((vocab, vocab))
    np.add.at(pairs, (ids[:-1], ids[1:]), 1.0)
    pairs += pairs.sum(1, keepdims=True) == 0  # a symbol never followed by a kept one: uniform row
    unigram = np.bincount(ids, minlength=vocab) / len(ids)
    return tuple(symbol_name(chr(c)) for c in keep), unigram, pairs / pairs.sum(1, keepdims=True)


def trigger_ids(task: SyntheticTask) -> np.ndarray:
    """The k most frequent symbols that are not whitespace (ids are ranks by frequency)."""
    names = bigram_model(task.vocab)[0]
    visible = [i for i, name in enumerate(names) if not name.startswith("<U+")]
    if len(visible) < task.k + 1:
        raise UserError(f"synthetic option k={task.k} leaves no visible non-trigger symbol among "
                        f"vocab={task.vocab}; lower k or raise vocab")
    return np.array(visible[:task.k])


def _draw(cdf: np.ndarray, u: np.ndarray) -> np.ndarray:
    """Inverse-CDF draws: row i's category for uniform u[i] from cdf[i] (n, V)."""
    return np.minimum((cdf < u[:, None]).sum(1), cdf.shape[1] - 1)


def sequences(task: SyntheticTask, start: int = 0, stop: int | None = None) -> np.ndarray:
    """Documents start..stop (default: all) as (n, length) symbol ids. Document d depends only on
    (seed, d): it draws from its own generator, so any slice equals the same rows of the whole."""
    stop = task.docs if stop is None else stop
    _, unigram, bigram = bigram_model(task.vocab)
    n, length = stop - start, task.length
    u = np.stack([np.random.default_rng([task.seed, d]).random(length) for d in range(start, stop)]) \
        if n else np.zeros((0, length))
    triggers = trigger_ids(task)
    slot = np.full(task.vocab, NO_SOURCE)
    slot[triggers] = np.arange(task.k)  # a trigger's column in `followed`
    outputs = bigram.copy()
    outputs[:, triggers] = 0.0  # an induction association never names a trigger
    outputs[outputs.sum(1) == 0] = slot == NO_SOURCE  # a row with only triggers: uniform over the rest
    cdf, out_cdf = np.cumsum(bigram, 1), np.cumsum(outputs / outputs.sum(1, keepdims=True), 1)
    x = np.zeros((n, length), dtype=np.int64)
    x[:, 0] = _draw(np.broadcast_to(np.cumsum(unigram), (n, task.vocab)), u[:, 0])
    followed = np.full((n, task.k), NO_SOURCE)  # induction: what follows each trigger in this document
    rows = np.arange(n)
    for i in range(1, length):
        prev = x[:, i - 1]
        after_trigger = slot[prev] != NO_SOURCE
        if task.rule == "bigram-backcopy":
            copy = after_trigger & (i >= 2) & (slot[x[:, i - 2 if i >= 2 else 0]] == NO_SOURCE)
            x[:, i] = np.where(copy, x[:, max(i - 2, 0)], _draw(cdf[prev], u[:, i]))
            continue
        seen = followed[rows, np.maximum(slot[prev], 0)]
        copy = after_trigger & (seen != NO_SOURCE)
        x[:, i] = np.where(copy, seen, np.where(after_trigger, _draw(out_cdf[prev], u[:, i]),
                                                 _draw(cdf[prev], u[:, i])))
        first = after_trigger & ~copy
        followed[rows[first], slot[prev[first]]] = x[first, i]
    return x


def documents(source: str) -> Iterator[str]:
    """The corpus of `source` as texts, one per document (space-separated symbol names)."""
    task = parse(source)
    names = np.array(bigram_model(task.vocab)[0], dtype=object)
    chunk = 4096
    for start in range(0, task.docs, chunk):
        for row in sequences(task, start, min(task.docs, start + chunk)):
            yield " ".join(names[row])


def symbol_tokenizer(source: str) -> Tokenizer:
    """Word-level over the task's symbols (ids 0..V-1 by frequency, as the generator numbers them),
    then EOS; whitespace separates symbols; no BOS or other added tokens."""
    names = bigram_model(parse(source).vocab)[0]
    vocab = {name: i for i, name in enumerate(names)}
    vocab[BPE_EOS] = len(vocab)
    vocab[UNKNOWN] = len(vocab)  # WordLevel needs one; the corpus never uses it
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNKNOWN))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens([BPE_EOS])
    return tok


# ---- the rule and its statistics -------------------------------------------------------------------


def copy_sources(tokens: np.ndarray, rule: str, triggers: list[int], eos: int,
                 visible: np.ndarray | None = None) -> np.ndarray:
    """For each position of each row (n, T), the position whose token the rule copies there, or
    NO_SOURCE. A rule never reaches across an EOS (the documents were generated apart) nor out of the
    window, and reads only `visible` positions (default: all). bigram-backcopy: t copies t-2 when
    t-1 is a trigger and t-2 is not. bigram-induction: t (after trigger tau at t-1) copies s+1 for
    another occurrence s of tau in the same document, the nearest one (earlier or later: a
    bidirectional model may read either)."""
    tokens = np.asarray(tokens)
    n, length = tokens.shape
    seen = np.ones((n, length), dtype=bool) if visible is None else np.asarray(visible, dtype=bool)
    out = np.full((n, length), NO_SOURCE, dtype=np.int64)
    segment = np.cumsum(tokens == eos, axis=1) - (tokens == eos)  # EOS belongs to the document it ends
    is_trigger = np.isin(tokens, triggers)
    usable = is_trigger & seen  # a visible trigger
    for r, t in zip(*np.nonzero(usable[:, :-1])):
        t = int(t) + 1  # the target follows the trigger
        if tokens[r, t] == eos:
            continue
        if rule == "bigram-backcopy":
            s = t - 2
            if s >= 0 and seen[r, s] and segment[r, s] == segment[r, t] and tokens[r, s] != eos \
                    and not is_trigger[r, s]:
                out[r, t] = s
            continue
        pairs = np.nonzero(usable[r, :-1] & seen[r, 1:] & (tokens[r, :-1] == tokens[r, t - 1])
                           & (segment[r, :-1] == segment[r, t]) & (segment[r, 1:] == segment[r, t])
                           & (tokens[r, 1:] != eos))[0]
        pairs = pairs[pairs != t - 1]
        if len(pairs):
            out[r, t] = int(pairs[np.argmin(np.abs(pairs - (t - 1)) * 2 + (pairs > t - 1))]) + 1
    return out


@dataclass(frozen=True)
class CopyRule:
    """A prepared corpus's copy rule, as its meta.json `task` records it: what the probes, the query
    classes of `analyze` and eval-generation's rule compliance need."""

    rule: str
    triggers: list[int]
    eos: int

    @classmethod
    def from_meta(cls, meta: dict[str, Any]) -> CopyRule:
        task = meta["task"]
        return cls(task["rule"], list(task["triggers"]), int(task["eos"]))


def corpus_task(data_path: str | Path | None) -> dict[str, Any] | None:
    """meta.json's `task` of a prepared corpus; None when the corpus is not synthetic, or its folder is
    unset or gone (a checkpoint whose training data is not at hand)."""
    from sinkdlm.data.shards import PackedData

    if not data_path:
        return None
    try:
        return PackedData(data_path).meta.get("task")
    except (UserError, OSError):
        return None


def active_sources(windows: torch.Tensor, masked: torch.Tensor, rule: CopyRule) -> torch.Tensor:
    """(n, T) source position of each active query (a masked copy target whose rule inputs are
    visible), else NO_SOURCE."""
    visible = ~masked.numpy()
    sources = copy_sources(windows.numpy(), rule.rule, rule.triggers, rule.eos, visible=visible)
    return torch.from_numpy(np.where(masked.numpy(), sources, NO_SOURCE))


def task_meta(source: str, sample_docs: int = 2000) -> dict[str, Any]:
    """meta.json's `task`: the rule, trigger ids, and measured on the first `sample_docs` documents:
    the share of copy positions, the Bayes-optimal accuracy there (the rule is deterministic given
    its inputs), what the bigram alone gets there, and the bigram's entropy and best accuracy at the
    other positions (left context only: a causal predictor's optimum)."""
    task = parse(source)
    names, _, bigram = bigram_model(task.vocab)
    x = sequences(task, 0, min(sample_docs, task.docs))
    triggers = trigger_ids(task)
    sources = copy_sources(x, task.rule, triggers.tolist(), eos=task.vocab)
    copy = sources != NO_SOURCE
    prev, cur = x[:, :-1], x[:, 1:]
    at_copy, elsewhere = copy[:, 1:], ~copy[:, 1:]
    entropy = -(bigram * np.log(np.where(bigram > 0, bigram, 1.0))).sum(1)
    copied = np.take_along_axis(x, np.maximum(sources, 0), 1)
    return {"rule": task.rule, "spec": task.spec, "options": asdict(task), "triggers": triggers.tolist(),
            "trigger_symbols": [names[i] for i in triggers], "eos": task.vocab, "measured_on_docs": int(len(x)),
            "copy_share": float(copy.mean()),
            "bayes_copy_accuracy": float((copied[copy] == x[copy]).mean()) if copy.any() else math.nan,
            "bigram_copy_accuracy": float((bigram[prev].argmax(-1) == cur)[at_copy].mean()) if copy.any() else math.nan,
            "bigram_entropy_nats": float(entropy[prev][elsewhere].mean()),
            "bigram_accuracy_elsewhere": float(bigram[prev].max(-1)[elsewhere].mean())}


def describe(source: str) -> str:
    task = parse(source)
    return (f"synthetic {task.rule}: {task.docs:,} documents of {task.length} symbols from the demo corpus's "
            f"character bigram ({task.vocab} symbols, {task.k} triggers), seed {task.seed}")


def summary_line(meta: dict[str, Any]) -> str:
    return (f"task {meta['rule']}: triggers {' '.join(meta['trigger_symbols'])}; copy positions "
            f"{meta['copy_share']:.1%}; Bayes-optimal accuracy there {meta['bayes_copy_accuracy']:.3f} (bigram alone "
            f"{meta['bigram_copy_accuracy']:.3f}); elsewhere bigram entropy {meta['bigram_entropy_nats']:.3f} nats, "
            f"best causal accuracy {meta['bigram_accuracy_elsewhere']:.3f}")
