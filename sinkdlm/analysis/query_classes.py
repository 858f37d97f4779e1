"""Query classes of the synthetic copy task inside the analysis: where active, dormant and visible
queries put their attention (issue 22; the copy-task probes split the same way on fixed masks).

**Active** queries are masked copy targets whose rule inputs (trigger and copy source) are visible,
**dormant** ones every other masked position, **visible** ones the unmasked positions; the
classification is the probes' own (`sinkdlm.data.synthetic.active_sources`). In trajectory mode a step's
classes come from its canvas (masked = not yet decoded: the rule reads the decoded tokens, as the
model does); in masked mode from the true text under that level's mask, as the probes classify.
The recorder sums each layer's attention over the queries of each class (`class_column_sums`), and
`class_metrics` reads those sums with the same `Cells` code as the unsplit tables.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import Tensor

from sinkdlm.analysis.stats import GU_KEYS, POOLING, Cells, Trajectory, to_py

if TYPE_CHECKING:
    from sinkdlm.data.synthetic import CopyRule

QUERY_CLASSES = ("active", "dormant", "visible")
NO_CLASS = -1  # a padding query
# what `class_metrics` reports per class, pooled and per layer
CLASS_KEYS = (*GU_KEYS, "absorption_rate", "absorption_uniform", "absorption_ratio", "mask_absorption",
              "mask_absorption_uniform", "mask_absorption_ratio")
SOURCES = {"canvas": "each step's model input (masked = not yet decoded; the rule reads the decoded tokens)",
           "text": "the true text under each level's mask (as the copy-task probes classify)"}

# (idx (B, T) model input, query_valid (B, T) bool) -> (B, T) index into QUERY_CLASSES, NO_CLASS for padding
QueryClassifier = Callable[[Tensor, Tensor], Tensor]


def data_task(data_path: str | Path) -> CopyRule | None:
    """The copy task of a prepared corpus (its meta.json's `task`); None when the corpus is not
    synthetic or its folder is gone (the analysis then has no query classes)."""
    from sinkdlm.data.synthetic import CopyRule, corpus_task

    task = corpus_task(data_path)  # None too for a converted checkpoint trained on nothing of ours
    return None if task is None else CopyRule.from_meta({"task": task})


def classify(text: Tensor, masked: Tensor, query_valid: Tensor, task: CopyRule) -> Tensor:
    """(B, T) index into QUERY_CLASSES of each query: `text` is what the rule reads at the visible
    positions, `masked` the positions the model must predict."""
    from sinkdlm.data.synthetic import NO_SOURCE, active_sources

    active = active_sources(text.cpu(), masked.cpu(), task) != NO_SOURCE
    classes = torch.where(masked.cpu(), QUERY_CLASSES.index("dormant"), QUERY_CLASSES.index("visible"))
    classes[active] = QUERY_CLASSES.index("active")
    return classes.masked_fill(~query_valid.cpu(), NO_CLASS)


def classifier(task: CopyRule, mask_id: int, text: Tensor | None = None) -> QueryClassifier:
    """Classes from each forward's input (the canvas), or from the true `text` (B, T) it masks."""
    return lambda idx, query_valid: classify(idx if text is None else text, idx == mask_id, query_valid, task)


def class_column_sums(probs: Tensor, classes: Tensor) -> Tensor:
    """probs (B, H, Tq, K), classes (B, Tq) -> incoming attention per key from each class's queries
    (B, H, C, K); padding queries (NO_CLASS) count for none. Summed over C: `stats.column_sums`."""
    member = F.one_hot(classes.clamp(min=0), len(QUERY_CLASSES)) * (classes != NO_CLASS)[..., None]
    return torch.einsum("bhtk,btc->bhck", probs.float(), member.to(probs.device, torch.float32))


def class_view(tr: Trajectory, index: int) -> Trajectory:
    """The recording as seen by the queries of one class: their column sums, and only them as queries."""
    return replace(tr, colsum=tr.class_colsum[..., index, :], query_valid=tr.query_class == index)


def class_metrics(tr: Trajectory, mask_id: int, gu_threshold: float, source: str) -> dict[str, Any]:
    """Per query class: its query count (query-steps) and the CLASS_KEYS, pooled over every cell and
    per layer. A cell's Gu mean is over the class's queries in it; cells without one are left out,
    so a class without queries has None everywhere."""
    out: dict[str, Any] = {"source": source, "classes": {}}
    for index, name in enumerate(QUERY_CLASSES):
        view = class_view(tr, index)
        cells = Cells(view, torch.zeros_like(view.colsum, dtype=torch.bool), mask_id, gu_threshold)
        queries = int(view.query_valid.sum())
        with_queries = int((view.query_valid.sum(-1) > 0).sum())
        out["classes"][name] = {
            "queries": queries, "queries_per_sequence_step": queries / with_queries if with_queries else None,
            "summary": _table(cells, POOLING["summary"][0]), "per_layer": _table(cells, POOLING["per_layer"][0])}
    return to_py(out)


def _table(cells: Cells, dims: tuple[int, ...]) -> dict[str, Tensor]:
    shares = cells.shares(dims)
    if "absorption_rate" in shares:
        shares["absorption_uniform"] = cells.uniform_absorption(dims)
    return {key: shares[key] for key in CLASS_KEYS if key in shares}
