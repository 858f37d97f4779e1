"""Experiments built from the pipeline's parts.

- `demo`: the README's demo job (Shakespeare -> BPE -> shards -> a small sink DLM) and what it prints
- `study`: the paper's ablation in one command (train, evaluate, analyse variants x seeds, resumable)
- `study_report`: the study's tables with paired intervals, its figures and study.md / study.json
"""
