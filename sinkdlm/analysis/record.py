"""Record per-head attention statistics while a model runs: a sampling trajectory or masked text.

The recorder wraps the model from outside: a forward pre-hook injects the model's `observer` (which
switches attention to the eager path and hands over each layer's probabilities, keys and values)
and notes each forward's input. Each layer's (B, H, T, S+T) probabilities are reduced at once to
per-key column sums; full maps are kept only for the few steps chosen for figures. One forward is
one step: the sampler runs one forward per denoising step (no guidance, no approximate cache).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor
from tqdm.auto import tqdm

from sinkdlm import diffusion
from sinkdlm.analysis.query_classes import QueryClassifier, class_column_sums
from sinkdlm.analysis.stats import Trajectory, column_sums, l2_norms
from sinkdlm.errors import UserError
from sinkdlm.model import DLM

# before(step, idx, attention_mask (B, T) bool | None) -> attention_mask: hides keys for this forward
BeforeForward = Callable[[int, Tensor, Tensor | None], Tensor | None]


@dataclass
class RecordSettings:
    layers: Sequence[int] | None = None  # None = every layer
    map_steps: Sequence[int] = ()  # steps whose attention maps (batch item 0) are kept
    map_layers: Sequence[int] | None = None  # layers whose maps are kept; None = every recorded layer
    query_classes: QueryClassifier | None = None  # splits the column sums by query class; None = no split


@dataclass
class _Step:
    tokens: Tensor
    query_valid: Tensor
    key_valid: Tensor
    colsum: dict[int, Tensor] = field(default_factory=dict)
    value_norm: dict[int, Tensor] = field(default_factory=dict)
    key_norm: dict[int, Tensor] = field(default_factory=dict)
    maps: dict[int, Tensor] = field(default_factory=dict)
    query_class: Tensor | None = None
    class_colsum: dict[int, Tensor] = field(default_factory=dict)


class Recorder:
    """Attach to a model; every forward while attached becomes one recorded step."""

    def __init__(self, model: DLM, settings: RecordSettings | None = None,
                 before: BeforeForward | None = None) -> None:
        self.model, self.settings, self.before = model, settings or RecordSettings(), before
        n_layer = model.cfg.n_layer
        self.layers = sorted(self.settings.layers) if self.settings.layers is not None else list(range(n_layer))
        bad = [i for i in self.layers if not 0 <= i < n_layer]
        if bad:
            raise UserError(f"layers {bad} do not exist; the model has layers 0..{n_layer - 1}")
        self.steps: list[_Step] = []

    @contextlib.contextmanager
    def attached(self) -> Iterator[Recorder]:
        handle = self.model.register_forward_pre_hook(self._pre_forward, with_kwargs=True)
        try:
            yield self
        finally:
            handle.remove()

    def _pre_forward(self, module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        idx = args[0] if args else kwargs.pop("idx")
        mask = args[1] if len(args) > 1 else kwargs.get("attention_mask")
        b, t = idx.shape
        query_valid = torch.ones(b, t, dtype=torch.bool, device=idx.device) if mask is None else mask.bool()
        if self.before is not None:
            mask = self.before(len(self.steps), idx, mask)
        key_content = query_valid if mask is None else mask.bool()
        sinks = torch.ones(b, self.model.cfg.sink_tokens, dtype=torch.bool, device=idx.device)
        self.steps.append(_Step(idx.detach().cpu(), query_valid.cpu(), torch.cat([sinks, key_content], 1).cpu()))
        if self.settings.query_classes is not None:
            self.steps[-1].query_class = self.settings.query_classes(idx.detach().cpu(), query_valid.cpu())
        return (idx,), {**kwargs, "attention_mask": mask, "observer": self._observe}

    def _observe(self, layer: int, probs: Tensor, keys: Tensor, values: Tensor, n_sink: int) -> None:
        if layer not in self.layers:
            return
        step, index = self.steps[-1], len(self.steps) - 1
        step.colsum[layer] = column_sums(probs, step.query_valid.to(probs.device)).cpu()
        step.value_norm[layer] = l2_norms(values).cpu()
        step.key_norm[layer] = l2_norms(keys).cpu()  # RoPE rotates pairs: norms as before it
        if step.query_class is not None:
            step.class_colsum[layer] = class_column_sums(probs, step.query_class).cpu()
        map_layers = self.settings.map_layers
        if index in self.settings.map_steps and (map_layers is None or layer in map_layers):
            step.maps[layer] = probs[0].float().cpu()

    def trajectory(self, outputs: list[list[int]] | None = None) -> Trajectory:
        if not self.steps:
            raise UserError("nothing was recorded: the model ran no forward pass while attached")

        def stack(name: str) -> Tensor:
            return torch.stack([torch.stack([getattr(s, name)[i] for i in self.layers]) for s in self.steps])

        maps = {i: torch.stack([s.maps[l] for l in sorted(s.maps)]) for i, s in enumerate(self.steps) if s.maps}
        split = self.settings.query_classes is not None
        return Trajectory(
            layers=self.layers, n_sink=self.model.cfg.sink_tokens,
            tokens=torch.stack([s.tokens for s in self.steps]),
            key_valid=torch.stack([s.key_valid for s in self.steps]),
            query_valid=torch.stack([s.query_valid for s in self.steps]),
            colsum=stack("colsum"), value_norm=stack("value_norm"), key_norm=stack("key_norm"),
            maps=maps, outputs=outputs,
            query_class=torch.stack([s.query_class for s in self.steps]) if split else None,
            class_colsum=stack("class_colsum") if split else None)


# ---- the two modes ------------------------------------------------------------------------------


def record_trajectory(model: DLM, prompts: list[list[int]], sample_cfg, eos_id: int,
                      settings: RecordSettings | None = None, before: BeforeForward | None = None,
                      progress: bool = True) -> Trajectory:
    """Generate with the sampler and record every denoising step (step s = the s-th forward)."""
    from sinkdlm.sample import generate

    if sample_cfg.cache != "none" or sample_cfg.guidance > 0:
        raise UserError("trajectory analysis needs one forward per step: use cache=none and guidance=0")
    recorder = Recorder(model, settings, before)
    with recorder.attached(), tqdm(total=sample_cfg.steps, desc="denoising steps", disable=not progress) as bar:
        outputs = generate(model, prompts, sample_cfg, model.mask_id, eos_id, on_step=lambda s, x: bar.update())
    return recorder.trajectory(outputs)


def masked_inputs(windows: Tensor, level: float, index: int, seed: int, mask_id: int) -> Tensor:
    """Mask every token of each window independently with probability `level` (seeded per level)."""
    n, length = windows.shape
    uniforms = diffusion.draw_uniforms(seed, index, range(n), length)
    noisy, _ = diffusion.mask_tokens(windows, torch.full((n,), float(level)), uniforms, mask_id)
    return noisy


def record_masked(model: DLM, windows: Tensor, levels: Sequence[float], seed: int = 0,
                  settings: RecordSettings | None = None, progress: bool = True) -> Trajectory:
    """Fixed text under random masking: step s = masking level levels[s]."""
    inputs = [masked_inputs(windows, level, i, seed, model.mask_id) for i, level in enumerate(levels)]
    return record_inputs(model, inputs, settings, progress, "masking levels")


@torch.no_grad()
def record_inputs(model: DLM, inputs: Sequence[Tensor], settings: RecordSettings | None = None,
                  progress: bool = True, desc: str = "inputs") -> Trajectory:
    """One forward per given (B, T) input: step s = inputs[s]."""
    device = next(model.parameters()).device
    recorder = Recorder(model, settings)
    with recorder.attached(), model.sink_cache():
        for tokens in tqdm(inputs, desc=desc, disable=not progress):
            model(tokens.to(device))
    return recorder.trajectory()
