"""Sink-pinned windowed attention: what a block of positions may see when older keys are evicted.

Decoding (or scoring) a sequence block by block, the block's attention sees the sink(s) (the model's
own, always), the first `anchors` tokens of the row (StreamingLLM's pseudo-sinks, for a model
without sinks), the last `window` committed tokens before the block, and the block itself; every
other committed key is evicted and positions after the block are not part of the input. So one
forward takes at most anchors + window + block tokens, whatever the length: memory is flat.

The kept tokens are gathered into a small canvas of their own and given the RoPE positions of a
fresh sequence (the first kept token at the first content position), as StreamingLLM re-indexes
positions within its cache: relative distances inside the window are those of the text, and the
sinks stay as close to the content as in training, however long the generation. When nothing is
evicted (window >= everything before the block) the canvas is the row's tokens up to the block end,
exactly what full attention without lookahead computes. `windowed_pairs` turns the same pattern
into likelihood terms, so the held-out ELBO can be compared across windows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass
class WindowCanvas:
    """The kept tokens of each row of a canvas, right-padded: (B, C) each."""

    columns: Tensor  # the canvas column each kept position came from (0 at padding)
    valid: Tensor  # False at padding
    first: Tensor  # (B,) this canvas's column of the block's first position
    end: Tensor  # (B,) one past the block's last position in this canvas

    def gather(self, x: Tensor, pad_id: int) -> Tensor:
        """The kept tokens of x (B, W) -> (B, C), pad_id at padding."""
        return x.gather(1, self.columns).masked_fill(~self.valid, pad_id)

    def scatter(self, x: Tensor, kept: Tensor) -> Tensor:
        """x (B, W) with the kept positions overwritten by kept (B, C)."""
        rows = torch.arange(x.shape[0], device=x.device)[:, None].expand_as(self.columns)
        return x.index_put((rows[self.valid], self.columns[self.valid]), kept[self.valid])


def kept_columns(row_begin: int, first: int, block_end: int, window: int, anchors: int) -> list[int]:
    """Canvas columns one row keeps for the block [first, block_end): its first `anchors` tokens
    (from row_begin), the last `window` before the block, and the block."""
    anchor_end = min(row_begin + anchors, first)
    recent = max(anchor_end, first - window)
    return list(range(row_begin, anchor_end)) + list(range(recent, block_end))


def window_canvas(row_begin: Tensor, first: Tensor, block_end: Tensor, window: int, anchors: int) -> WindowCanvas:
    """The WindowCanvas of blocks [first, block_end) (B,) in rows whose tokens start at row_begin (B,)."""
    rows = [kept_columns(int(b), int(f), int(e), window, anchors)
            for b, f, e in zip(row_begin.tolist(), first.tolist(), block_end.tolist())]
    width = max(len(r) for r in rows)
    columns = torch.zeros(len(rows), width, dtype=torch.long)
    valid = torch.zeros(len(rows), width, dtype=torch.bool)
    for i, r in enumerate(rows):
        columns[i, :len(r)] = torch.tensor(r, dtype=torch.long)
        valid[i, :len(r)] = True
    device = first.device
    end = torch.tensor([len(r) for r in rows], device=device)
    return WindowCanvas(columns.to(device), valid.to(device), end - (block_end - first), end)


def windowed_pairs(tokens: Sequence[int], prompt: int, block: int, window: int, anchors: int = 0
                   ) -> list[tuple[list[int], list[int]]]:
    """(context, block) pairs whose ELBOs sum to a bound on log p(tokens[prompt:] | tokens[:prompt])
    under the windowed attention pattern: the continuation cut into blocks (chain rule over blocks,
    as block-by-block decoding generates it), each conditioned on what its window keeps. Score them
    with sinkdlm.eval.likelihood.score_pairs (the context starts at position 0, as in decoding)."""
    pairs = []
    for lo in range(prompt, len(tokens), block):
        hi = min(lo + block, len(tokens))
        kept = kept_columns(0, lo, hi, window, anchors)
        pairs.append(([tokens[c] for c in kept[:len(kept) - (hi - lo)]], list(tokens[lo:hi])))
    return pairs
