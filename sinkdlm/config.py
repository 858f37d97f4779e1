"""One typed config tree: model / data / optim / train, named presets, strict YAML + CLI merging.

Unknown keys are errors everywhere. The resolved config is saved beside every checkpoint and
everything downstream (sampling, evaluation, analysis) rebuilds the model from it.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml

from sinkdlm.diffusion import NOISE_FLOOR, TMode
from sinkdlm.errors import UserError
from sinkdlm.fields import (
    HELP,
    Range,
    check_allowed,
    check_choices,
    field_types,
    range_of,
    setting,
    type_name,
    without_none,
)

SMDM_SEQ_LEN = 2048  # the sequence length SMDM's FLOPs budgets assume
FLOPS_UNIT = 1e18  # `--flops F` means F x 1e18 training FLOPs
# metrics.jsonl is always written; these are the extra loggers `train.loggers` may name
LOGGERS = ("csv", "tensorboard", "wandb")
DEFAULT_LOGGERS = ("csv", "tensorboard")  # tensorboard only where installed (the `log` extra)
Strategy = Literal["auto", "ddp", "fsdp"]
FSDP_PRECISIONS = ("32-true", "bf16-mixed")  # what FSDP2's MixedPrecisionPolicy is built from
# data.order: random = windows start anywhere, drawn with replacement; epoch = each pass over the
# data visits every non-overlapping window once, shuffled (SMDM). Both: a function of (seed, step, index)
WindowOrder = Literal["random", "epoch"]
WINDOW_ORDERS = get_args(WindowOrder)


@dataclass
class ModelConfig:
    """A LLaMA-style bidirectional Transformer; every paper variant is a field.

    Every field is architecture (a checkpoint fixes it) except the RUNTIME_FIELDS, which change no
    weights and so may differ between a checkpoint and its use (loading, init_from, adapt, sft).
    Of those, the IMPLEMENTATION_FIELDS compute the same function another way, so even a resumed
    run may change them.
    """

    IMPLEMENTATION_FIELDS: ClassVar[frozenset[str]] = frozenset({"attn_impl"})
    RUNTIME_FIELDS: ClassVar[frozenset[str]] = IMPLEMENTATION_FIELDS | {"logit_shift", "causal"}

    name: str = setting("tiny", "preset name (a label; model.preset=NAME sets the shape)")
    vocab_size: int | None = setting(None, "real vocabulary size", unset="take it from the data", at_least=1)
    # the mask token: None = an extra embedding row after the vocabulary, id vocab_size (sinkdlm's own
    # models); an id inside the vocabulary for imports trained with one (LLaDA 126336, Dream 151666),
    # whose extra row is then a copy of that id's row that no input uses
    mask_token_id: int | None = setting(None, "mask token id inside the vocabulary (imports)",
                                        unset="an extra row, id vocab_size", at_least=0)
    block_size: int = setting(64, "longest content sequence (sinks not counted)", at_least=1)
    n_layer: int = setting(2, "Transformer blocks", at_least=1)
    n_head: int = setting(2, "attention heads", at_least=1)
    n_embd: int = setting(32, "model width", at_least=1)
    intermediate_size: int = setting(64, "SwiGLU MLP width", at_least=1)
    n_query_groups: int | None = setting(None, "key/value heads (grouped-query attention, imports)",
                                         unset="n_head", at_least=1)
    head_dim: int | None = setting(None, "width of one head", unset="n_embd // n_head", at_least=1)
    rope_base: float = setting(10000.0, "RoPE base frequency", above=0)
    norm_eps: float = setting(1e-5, "RMSNorm epsilon", above=0)
    qkv_bias: bool = setting(False, "biases on q/k/v (Qwen2)")
    tie_embeddings: bool = setting(False, "the LM head shares the embedding's weights")
    causal: bool = setting(False, "causal attention (AR parity checks only)")
    logit_shift: bool = setting(False, "position i predicts token i+1 (Dream/DiffuLLaMA adaptation)")
    # --- the sink (0 tokens = the plain model) ---
    sink_tokens: int = setting(0, "sink tokens; 0 = the plain model", at_least=0)
    sink_position: Literal["front", "end"] = setting("front", "where the sinks sit")
    sink_init: Literal["learned", "zero"] = setting("learned", "sink init: random normal or zeros; trained either way")
    sink_zero_value: bool = setting(False, "force the sink's value vectors to zero")
    sink_self_only: bool = setting(True, "the sink attends to itself only (False = ablation: to everything)")
    # --- gated attention baseline (Qiu et al. 2025) ---
    attn_gate: Literal["none", "elementwise", "headwise"] = setting("none", "sigmoid gate on the attention output")
    attn_impl: Literal["fast", "reference", "eager"] = setting(
        "fast", "fast: mask-free sink; reference: dense mask; eager: keeps the probabilities")

    def __post_init__(self) -> None:
        check_choices(self, "model.")
        if self.n_head % self.kv_heads:
            raise UserError(f"model.n_query_groups={self.kv_heads} must divide n_head={self.n_head}")
        if self.head_dim is None and self.n_embd % self.n_head:
            raise UserError(f"model.n_embd={self.n_embd} must be divisible by n_head={self.n_head}")
        if self.mask_token_id is not None and self.vocab_size is not None and \
                not 0 <= self.mask_token_id < self.vocab_size:
            raise UserError(f"model.mask_token_id={self.mask_token_id} must be a vocabulary id in "
                            f"0..{self.vocab_size - 1} (or null: the mask is the extra row {self.vocab_size})")

    def differences(self, other: ModelConfig, free: frozenset[str]) -> list[str]:
        """Fields outside `free` whose values differ from `other`'s."""
        return [f.name for f in dataclasses.fields(self)
                if f.name not in free and getattr(self, f.name) != getattr(other, f.name)]

    def require_architecture_of(self, checkpoint: ModelConfig, where: str) -> None:
        """A UserError unless only RUNTIME_FIELDS differ from the checkpoint's model (they change no weights)."""
        differing = self.differences(checkpoint, self.RUNTIME_FIELDS)
        if differing:
            key = differing[0]
            raise UserError(f"model.{key}={getattr(self, key)!r} but the checkpoint {where} has "
                            f"{getattr(checkpoint, key)!r}; the architecture comes from the checkpoint: drop the "
                            f"key, or convert again (e.g. --sink-tokens); only {sorted(self.RUNTIME_FIELDS)} "
                            f"may differ")

    def runtime(self) -> dict[str, Any]:
        return {key: getattr(self, key) for key in sorted(self.RUNTIME_FIELDS)}

    def with_runtime(self, **values: Any) -> ModelConfig:
        """A copy with runtime fields changed, each checked as a YAML value would be."""
        types_ = field_types(ModelConfig)
        for key in values:
            if key not in self.RUNTIME_FIELDS:
                raise UserError(f"model.{key} is fixed by the checkpoint's weights; only "
                                f"{sorted(self.RUNTIME_FIELDS)} may be changed when loading it")
        checked = {key: _coerce(value, types_[key], f"model.{key}") for key, value in values.items()}
        return dataclasses.replace(self, **checked)

    def variant(self) -> str:
        """A short label of the paper variant: 'plain', 'sink x2 (end, zero value), gate elementwise'."""
        parts = []
        if self.sink_tokens:
            details = [self.sink_position] + (["zero value"] if self.sink_zero_value else []) + \
                ([] if self.sink_self_only else ["sees all"])
            parts.append(f"sink x{self.sink_tokens} ({', '.join(details)})")
        if self.attn_gate != "none":
            parts.append(f"gate {self.attn_gate}")
        return ", ".join(parts) or "plain"

    @property
    def kv_heads(self) -> int:
        """Key/value heads: n_query_groups, or one per query head when unset."""
        return self.n_query_groups or self.n_head

    @property
    def head_size(self) -> int:
        """The width of one head: head_dim, or n_embd // n_head when unset."""
        return self.head_dim or self.n_embd // self.n_head

    @property
    def mask_id(self) -> int:
        vocab = self.require_vocab()
        return vocab if self.mask_token_id is None else self.mask_token_id

    def require_vocab(self) -> int:
        if self.vocab_size is None:
            raise UserError("model.vocab_size is unset; set it or train on prepared data, which sets it")
        return self.vocab_size

    def non_embedding_params(self) -> int:
        """SMDM's N: every parameter but the embedding, LM head, sinks and gate (the ungated size)."""
        e, hd = self.n_embd, self.head_size
        attn = e * hd * (self.n_head + 2 * self.kv_heads) + self.n_head * hd * e
        if self.qkv_bias:
            attn += hd * (self.n_head + 2 * self.kv_heads)
        mlp = 3 * e * self.intermediate_size
        return self.n_layer * (attn + mlp + 2 * e) + e


@dataclass
class DataConfig:
    path: str = setting("", "a folder made by `sinkdlm prepare` (meta.json + token shards)")
    seq_len: int | None = setting(None, "training window", unset="model.block_size", at_least=1)
    val_windows: int = setting(64, "fixed held-out windows for the validation ELBO", at_least=1)
    val_seed: int = setting(1234, "seeds the fixed validation masks, so runs are comparable", at_least=0)
    sft_path: str = setting("", "SFT data: JSONL {prompt, response} or SMDM's GSM8K train.txt; "
                                "empty = the pretraining data above")
    order: WindowOrder = setting("random", "training windows: random = start anywhere, with replacement; "
                                           "epoch = each pass visits every window once, shuffled (SMDM)")

    def __post_init__(self) -> None:
        check_choices(self, "data.")


@dataclass
class OptimConfig:
    lr: float = setting(2e-4, "peak learning rate (AdamW)", above=0)
    min_lr: float = setting(2e-5, "learning rate at the end of the cosine decay, <= lr", at_least=0)
    beta1: float = setting(0.9, "AdamW beta1", at_least=0, below=1)
    beta2: float = setting(0.95, "AdamW beta2", at_least=0, below=1)
    weight_decay: float = setting(0.1, "AdamW weight decay", at_least=0)
    grad_clip: float = setting(1.0, "gradient norm clip; 0 = off", at_least=0)
    warmup_frac: float = setting(0.01, "warmup share: linear warmup over max(warmup_frac x steps, "
                                         "warmup_min_steps) steps", at_least=0, at_most=1)
    warmup_min_steps: int = setting(100, "warmup steps at least (see warmup_frac)", at_least=0)

    def __post_init__(self) -> None:
        check_choices(self, "optim.")
        if self.min_lr > self.lr:
            raise UserError(f"optim.min_lr={self.min_lr} is above optim.lr={self.lr}; the cosine decays from lr "
                            f"to min_lr: lower min_lr (SMDM: lr / 10)")


@dataclass
class TrainConfig:
    out_dir: str = setting("runs/default", "run folder: checkpoints, metrics, logs")
    global_batch: int = setting(8, "sequences per optimizer step, over all devices", at_least=1)
    micro_batch: int = setting(8, "sequences per forward on one device (accumulation follows); divides "
                                  "global_batch", at_least=1)
    max_steps: int = setting(100, "optimizer steps; ignored when flops > 0", at_least=1)
    flops: float = setting(0.0, "budget in 1e18 FLOPs (SMDM): steps = F*1e18 / (6 N B L); 0 = max_steps", at_least=0)
    seed: int = setting(42, "seeds the initialisation, the windows and the masks", at_least=0)
    # diffusion objective
    eps: float = setting(NOISE_FLOOR, "noise floor eps of p = (1 - eps) t + eps", at_least=0, below=1)
    t_sampling: TMode = setting("uniform", "how the noise levels t are drawn over the global batch")
    random_length_prob: float = setting(0.0, "probability that a step's batch is cut to a random length (SMDM)",
                                        at_least=0, at_most=1)
    objective: Literal["pretrain", "sft"] = setting("pretrain", "pretrain: every token; sft: response tokens only")
    init_from: str = setting("", "checkpoint to start from (SFT, adaptation); empty = random initialisation")
    mask_anneal_steps: int = setting(0, "DiffuLLaMA: attention goes from causal to full over these steps", at_least=0)
    # hardware (Lightning Fabric)
    accelerator: str = setting("auto", "Lightning accelerator: auto, cpu, cuda, ...")
    devices: int | str = setting(1, "Lightning devices per node: a count, -1 or auto")
    num_nodes: int = setting(1, "machines", at_least=1)
    strategy: Strategy = setting("auto", "fsdp = FSDP2 (fully_shard per Block, then the root), see parallelize.py")
    precision: str = setting("32-true", f"Lightning precision, e.g. bf16-mixed on GPUs; with fsdp one of "
                                         f"{', '.join(FSDP_PRECISIONS)}")
    compile: bool = setting(False, "torch.compile each Block (before FSDP shards it)")
    activation_checkpointing: bool = setting(False, "recompute each Block's activations in backward")
    # bookkeeping
    log_every: int = setting(10, "log the training loss every N steps", at_least=1)
    val_every: int = setting(100, "validation ELBO every N steps (and at the end)", at_least=1)
    save_every: int = setting(100, "checkpoint every N steps (and at the end)", at_least=1)
    keep_last: int = setting(2, "checkpoints kept; 0 = all", at_least=0)
    sink_monitor_every: int = setting(50, "sink metrics every N steps; 0 = off", at_least=0)
    loggers: list[str] = setting(list(DEFAULT_LOGGERS), f"loggers beside metrics.jsonl (always written): any of "
                                                       f"{', '.join(LOGGERS)}")
    resume: bool = setting(False, "continue the run in out_dir")
    overwrite: bool = setting(False, "replace the run in out_dir")
    progress: bool = setting(True, "a progress bar")
    checkpoint_on_signal: bool = setting(False, "on SIGTERM or Ctrl-C, write a checkpoint at the next step "
                                                "boundary before stopping (a second Ctrl-C stops at once)")

    def __post_init__(self) -> None:
        check_choices(self, "train.")
        if self.strategy == "fsdp" and self.precision not in FSDP_PRECISIONS:
            raise UserError(f"train.precision={self.precision!r} is not supported with train.strategy=fsdp; "
                            f"choose one of {list(FSDP_PRECISIONS)}")
        if self.global_batch % self.micro_batch:
            raise UserError(f"train.global_batch={self.global_batch} is not a multiple of "
                            f"train.micro_batch={self.micro_batch}; change one of them")
        unknown = [name for name in self.loggers if name not in LOGGERS]
        if unknown:
            raise UserError(f"train.loggers has {unknown}; choose from {list(LOGGERS)}, e.g. train.loggers=[csv]")


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def steps(self) -> int:
        """Optimizer steps: from the FLOPs budget when one is set, else train.max_steps."""
        if self.train.flops <= 0:
            return self.train.max_steps
        n = self.model.non_embedding_params()
        tokens_per_step = self.train.global_batch * self.seq_len
        return max(1, math.floor(self.train.flops * FLOPS_UNIT / (6 * n * tokens_per_step)))

    @property
    def seq_len(self) -> int:
        return self.data.seq_len or self.model.block_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ----------------------------------------------------------------------------------------------
# presets

# SMDM sizes, named by millions of non-embedding parameters: (n_layer, n_head, n_embd, intermediate)
SMDM_SIZES: dict[str, tuple[int, int, int, int]] = {
    "6": (6, 4, 256, 1024), "19": (8, 6, 384, 1536), "34": (8, 8, 512, 2048),
    "48": (9, 9, 576, 2304), "66": (10, 10, 640, 2560), "85": (13, 10, 640, 2560),
    "75": (16, 8, 640, 1600), "113": (12, 12, 768, 3072), "142": (15, 12, 768, 3072),
    "170": (18, 12, 768, 3072), "180": (14, 14, 896, 3584), "206": (16, 14, 896, 3584),
    "231": (18, 14, 896, 3584), "268": (16, 16, 1024, 4096), "302": (18, 16, 1024, 4096),
    "336": (20, 16, 1024, 4096), "472": (18, 10, 1280, 5120), "551": (21, 10, 1280, 5120),
    "629": (24, 10, 1280, 5120), "571": (18, 11, 1408, 5632), "666": (21, 11, 1408, 5632),
    "761": (24, 11, 1408, 5632), "717": (19, 12, 1536, 6144), "831": (22, 12, 1536, 6144),
    "944": (25, 12, 1536, 6144), "1028": (20, 14, 1792, 7168), "1233": (24, 14, 1792, 7168),
    "1476": (22, 16, 2048, 8192), "1678": (25, 16, 2048, 8192), "2121": (28, 17, 2176, 8704),
}
SMDM_VOCAB = 32000  # Llama-2 / TinyLlama tokenizer

MODEL_PRESETS: dict[str, dict[str, Any]] = {
    name: dict(name=name, vocab_size=SMDM_VOCAB, block_size=SMDM_SEQ_LEN, n_layer=l, n_head=h,
               n_embd=e, intermediate_size=i)
    for name, (l, h, e, i) in SMDM_SIZES.items()
}
# CPU presets: `tiny` for tests (seconds), `demo` for the default job (minutes on 2 cores)
MODEL_PRESETS["tiny"] = dict(name="tiny", block_size=64, n_layer=2, n_head=2, n_embd=32, intermediate_size=64)
MODEL_PRESETS["demo"] = dict(name="demo", block_size=128, n_layer=4, n_head=4, n_embd=128, intermediate_size=512)


def gate_params(m: ModelConfig) -> int:
    """Parameters the attention gate adds (SMDM's N leaves them out): E x (H x hd) per layer for the
    elementwise gate, E x H for the headwise one."""
    per_layer = {"none": 0, "elementwise": m.n_embd * m.n_head * m.head_size, "headwise": m.n_embd * m.n_head}
    return m.n_layer * per_layer[m.attn_gate]


def gate_matched_intermediate_size(m: ModelConfig) -> int:
    """The MLP width at which an elementwise-gated copy of `m` has m's non-embedding parameters, gate
    counted (within one MLP unit, 3 E, per layer): the gate adds E x (H x hd), SwiGLU 3 E per unit."""
    width = m.intermediate_size - round(m.n_head * m.head_size / 3)
    if width < 1:
        raise UserError(f"model.intermediate_size={m.intermediate_size} is too small to give the gate's "
                        f"{m.n_embd * m.n_head * m.head_size} parameters per layer back; use a wider MLP")
    return width


def model_preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise UserError(f"unknown model preset {name!r}; choose one of {sorted(MODEL_PRESETS, key=_preset_order)}")
    return ModelConfig(**{**MODEL_PRESETS[name], **overrides})


def _preset_order(name: str) -> tuple[int, str]:
    return (int(name), "") if name.isdigit() else (-1, name)


# ----------------------------------------------------------------------------------------------
# strict merging of YAML files and `section.key=value` overrides


def _coerce(value: Any, hint: Any, where: str) -> Any:
    """Check (and gently convert) a YAML value against a field's type hint."""
    check_allowed(value, hint, where)
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in typing.get_args(hint):
            return None
        errors = []
        for arg in typing.get_args(hint):
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except UserError as e:
                errors.append(str(e))
        raise UserError(errors[0] if errors else f"{where}: bad value {value!r}")
    if origin is list:
        if not isinstance(value, list):
            raise UserError(f"{where}={value!r} should be a list, e.g. {where}=[a,b]")
        (item,) = typing.get_args(hint)
        return [_coerce(v, item, f"{where}[{i}]") for i, v in enumerate(value)]
    if hint is float and isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    if hint in (int, str, bool, float) and not (isinstance(value, hint) and not (hint is int and isinstance(value, bool))):
        raise UserError(f"{where}={value!r} should be {hint.__name__}")
    return value


def merge(cfg: Config, updates: dict[str, Any], source: str) -> Config:
    """Return cfg with `updates` ({section: {key: value}}) applied; unknown keys are errors, each
    naming `source` (a file, "command line")."""
    sections = [f.name for f in dataclasses.fields(Config)]
    unknown = [name for name in updates if name not in sections]
    if unknown:
        raise UserError(f"{source}: unknown section {unknown[0]!r}{_did_you_mean(unknown[0], sections)}; "
                        f"the sections are {', '.join(sections)}")
    try:
        return Config(**{name: _merge_section(getattr(cfg, name), updates.get(name), name) for name in sections})
    except UserError as e:
        raise UserError(f"{source}: {e}") from None


def _merge_section(section: Any, raw: Any, name: str) -> Any:
    """`section` (a ModelConfig, ...) with the `raw` {key: value} of a YAML file or the command line."""
    if raw is None:
        return section
    if not isinstance(raw, dict):
        first = dataclasses.fields(section)[0]
        raise UserError(f"section {name!r} should be a mapping of keys to values, e.g. "
                        f"`{name}: {{{first.name}: {getattr(section, first.name)!r}}}`")
    new = dict(raw)
    if name == "model" and "preset" in new:
        # a preset sets the shape only: sink/gate fields chosen elsewhere survive it
        shape = MODEL_PRESETS[model_preset(str(new.pop("preset"))).name]
        section = dataclasses.replace(section, n_query_groups=None, head_dim=None, **shape)
    types_ = field_types(type(section))
    values = dataclasses.asdict(section)
    for key, value in new.items():
        if key not in types_:
            raise UserError(f"unknown key {name}.{key}{_did_you_mean(key, list(types_), f'{name}.')}; "
                            f"`sinkdlm config` lists every key")
        values[key] = _coerce(value, types_[key], f"{name}.{key}")
    return type(section)(**values)


def _did_you_mean(wrong: Any, known: list[str], prefix: str = "") -> str:
    close = difflib.get_close_matches(str(wrong), known, n=1)
    return f" (did you mean {prefix}{close[0]}?)" if close else ""


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """['model.n_layer=4', 'train.seed=1'] -> {'model': {'n_layer': 4}, 'train': {'seed': 1}}."""
    out: dict[str, dict[str, Any]] = {}
    for item in items:
        key, sep, raw = item.partition("=")
        section, dot, name = key.partition(".")
        if not sep or not dot or not name:
            raise UserError(f"override {item!r} should look like section.key=value, e.g. train.max_steps=10")
        out.setdefault(section, {})[name] = yaml.safe_load(raw) if raw != "" else ""
    return out


def load_config(path: str | Path | None = None, overrides: list[str] | None = None,
                base: Config | None = None) -> Config:
    cfg = base or Config()
    if path:
        p = Path(path)
        if not p.is_file():
            raise UserError(f"config file {p} does not exist; pass a YAML file from configs/")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as e:
            raise UserError(f"config file {p} is not valid YAML: {yaml_problem(e)}; fix the YAML there") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"config file {p} cannot be read ({e}); pass a YAML text file") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {p} holds a {type(data).__name__}, not a mapping of sections; "
                            f"write it as sections {', '.join(f.name for f in dataclasses.fields(Config))}, "
                            f"e.g. `train: {{max_steps: 10}}`")
        cfg = merge(cfg, data, str(p))
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides), "command line")
    return cfg


def yaml_problem(e: yaml.YAMLError) -> str:
    """A YAML error in one line: 'line 3, column 2: expected <block end>, but found '<block mapping
    start>' (while parsing a block mapping)' (yaml's own message spans several lines)."""
    mark = getattr(e, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    problem = getattr(e, "problem", None) or str(e).splitlines()[0]
    context, start = getattr(e, "context", None), getattr(e, "context_mark", None)
    if context and start is not None and mark is not None and start.line != mark.line:
        context += f" from line {start.line + 1}, column {start.column + 1}"
    return where + problem + (f" ({context})" if context else "")


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    return merge(Config(), data, source)


def describe_keys(cfg: Config) -> list[str]:
    """One line per `section.key`: its type (and range), its value in `cfg` and its help, in columns."""
    rows = []
    for section in dataclasses.fields(Config):
        settings = getattr(cfg, section.name)
        hints = field_types(type(settings))
        for f in dataclasses.fields(settings):
            rows.append((f"{section.name}.{f.name}", kind_of(hints[f.name], range_of(f)),
                         repr(getattr(settings, f.name)), f.metadata[HELP]))
    widths = [max(len(row[i]) for row in rows) for i in range(3)]
    return [f"{key:{widths[0]}}  {kind:{widths[1]}}  {value:{widths[2]}}  # {help_}"
            for key, kind, value, help_ in rows]


def kind_of(hint: Any, bounds: Range | None) -> str:
    """A field's type as `sinkdlm config` shows it: 'int', 'float in [0, 1)', 'int >= 1 | None'."""
    if bounds is None:
        return type_name(hint)
    optional = " | None" if without_none(hint) is not hint else ""
    return f"{type_name(without_none(hint))} {bounds}{optional}"


def save_config(cfg: Config, path: str | Path) -> None:
    """Write cfg as YAML, its data paths absolute: analyze and eval read the run's training data from
    whatever folder they are started in."""
    data = dataclasses.replace(cfg.data, path=_absolute(cfg.data.path), sft_path=_absolute(cfg.data.sft_path))
    Path(path).write_text(yaml.safe_dump(dataclasses.replace(cfg, data=data).to_dict(), sort_keys=False))


def _absolute(path: str) -> str:
    return os.path.abspath(os.path.expanduser(path)) if path else path


def with_run_data_paths(cfg: Config, folder: str | Path) -> Config:
    """cfg, loaded from checkpoint `folder`, with a relative data.path or data.sft_path (saved by an older
    sinkdlm) made absolute: against the current folder where it exists there, else against the folder
    training ran in (the run folder less train.out_dir), where it exists there."""
    bases = [Path.cwd()] + [base for base in [_training_folder(Path(folder), cfg.train.out_dir)] if base]
    found = {}
    for key in ("path", "sft_path"):
        value = getattr(cfg.data, key)
        if value and not Path(value).expanduser().is_absolute():
            found[key] = next((str(base / value) for base in bases if (base / value).exists()), value)
    return dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, **found)) if found else cfg


def _training_folder(checkpoint: Path, out_dir: str) -> Path | None:
    """The folder a run was trained from: the run folder (the checkpoint's, or the one holding it) with the
    relative train.out_dir it was given cut off its end; None when out_dir is absolute or does not fit."""
    parts = Path(out_dir).parts
    if not parts or Path(out_dir).is_absolute():
        return None
    checkpoint = Path(os.path.abspath(checkpoint))
    for run in (checkpoint, checkpoint.parent):
        if run.parts[-len(parts):] == parts:
            return Path(*run.parts[:-len(parts)])
    return None
