"""One typed config tree: model / data / optim / train, named presets, strict YAML + CLI merging.

Unknown keys are errors everywhere. The resolved config is saved beside every checkpoint and
everything downstream (sampling, evaluation, analysis) rebuilds the model from it.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal, get_args

import yaml

from sinkdlm.diffusion import NOISE_FLOOR, TMode
from sinkdlm.errors import UserError
from sinkdlm.settings import check_allowed, check_choices, field_types, type_name

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

    name: str = "tiny"
    vocab_size: int | None = None  # real vocabulary; None = take it from the data
    # the mask token: None = an extra embedding row after the vocabulary, id vocab_size (sinkdlm's own
    # models); an id inside the vocabulary for imports trained with one (LLaDA 126336, Dream 151666),
    # whose extra row is then a copy of that id's row that no input uses
    mask_token_id: int | None = None
    block_size: int = 64  # longest content sequence (sinks not counted)
    n_layer: int = 2
    n_head: int = 2
    n_embd: int = 32
    intermediate_size: int = 64
    n_query_groups: int | None = None  # grouped-query attention (imports); None = n_head
    head_dim: int | None = None  # None = n_embd // n_head
    rope_base: float = 10000.0
    norm_eps: float = 1e-5
    qkv_bias: bool = False  # Qwen2 has biases on q/k/v
    tie_embeddings: bool = False
    causal: bool = False  # True only for AR parity checks
    logit_shift: bool = False  # Dream/DiffuLLaMA adaptation: position i predicts token i+1
    # --- the sink (0 tokens = the plain model) ---
    sink_tokens: int = 0
    sink_position: Literal["front", "end"] = "front"
    sink_init: Literal["learned", "zero"] = "learned"  # learned = random normal; trained either way
    sink_zero_value: bool = False  # force the sink's value vectors to zero
    sink_self_only: bool = True  # False = ablation: the sink attends to everything
    # --- gated attention baseline (Qiu et al. 2025) ---
    attn_gate: Literal["none", "elementwise", "headwise"] = "none"
    # fast: mask-free sink | reference: dense mask | eager: keeps the probabilities
    attn_impl: Literal["fast", "reference", "eager"] = "fast"

    def __post_init__(self) -> None:
        check_choices(self, "model.")
        if self.sink_tokens < 0:
            raise UserError(f"model.sink_tokens={self.sink_tokens} must be >= 0")
        for key in ("block_size", "n_layer", "n_head", "n_embd", "intermediate_size"):
            if getattr(self, key) < 1:
                raise UserError(f"model.{key}={getattr(self, key)} must be >= 1")
        if self.n_head % self.groups:
            raise UserError(f"model.n_query_groups={self.groups} must divide n_head={self.n_head}")
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
    def groups(self) -> int:
        return self.n_query_groups or self.n_head

    @property
    def hd(self) -> int:
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
        e, hd = self.n_embd, self.hd
        attn = e * hd * (self.n_head + 2 * self.groups) + self.n_head * hd * e
        if self.qkv_bias:
            attn += hd * (self.n_head + 2 * self.groups)
        mlp = 3 * e * self.intermediate_size
        return self.n_layer * (attn + mlp + 2 * e) + e


@dataclass
class DataConfig:
    path: str = ""  # a folder made by `sinkdlm prepare` (meta.json + token shards)
    seq_len: int | None = None  # training window; None = model.block_size
    val_windows: int = 64  # fixed held-out windows for the validation ELBO
    val_seed: int = 1234  # seeds the fixed validation masks, so runs are comparable
    # SFT: JSONL {prompt, response} or SMDM's GSM8K train.txt; empty = pretraining data above
    sft_path: str = ""
    order: WindowOrder = "random"  # training windows

    def __post_init__(self) -> None:
        check_choices(self, "data.")


@dataclass
class OptimConfig:
    lr: float = 2e-4
    min_lr: float = 2e-5
    beta1: float = 0.9
    beta2: float = 0.95
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    warmup_frac: float = 0.01
    warmup_min_steps: int = 100


@dataclass
class TrainConfig:
    out_dir: str = "runs/default"
    global_batch: int = 8  # sequences per optimizer step, over all devices
    micro_batch: int = 8  # sequences per forward on one device; accumulation follows
    max_steps: int = 100  # ignored when flops > 0
    flops: float = 0.0  # budget in units of 1e18 FLOPs (SMDM): steps = F*1e18 / (6 N B L); 0 = max_steps
    seed: int = 42
    # diffusion objective
    eps: float = NOISE_FLOOR  # p = (1 - eps) t + eps
    t_sampling: TMode = "uniform"  # over the global batch
    random_length_prob: float = 0.0  # SMDM's stochastic sequence length
    objective: Literal["pretrain", "sft"] = "pretrain"
    init_from: str = ""  # checkpoint to start from (SFT, adaptation)
    mask_anneal_steps: int = 0  # DiffuLLaMA: attention goes from causal to full over these steps
    # hardware (Lightning Fabric)
    accelerator: str = "auto"
    devices: int | str = 1
    num_nodes: int = 1
    strategy: Strategy = "auto"  # fsdp = FSDP2 (fully_shard per Block, then the root), see parallelize.py
    precision: str = "32-true"  # e.g. bf16-mixed on GPUs; with fsdp one of FSDP_PRECISIONS
    compile: bool = False  # torch.compile each Block (before FSDP shards it)
    activation_checkpointing: bool = False  # recompute each Block's activations in backward
    # bookkeeping
    log_every: int = 10
    val_every: int = 100
    save_every: int = 100
    keep_last: int = 2
    sink_monitor_every: int = 50
    # beside metrics.jsonl (always written): any of LOGGERS; a missing package is named at start-up
    loggers: list[str] = field(default_factory=lambda: list(DEFAULT_LOGGERS))
    resume: bool = False
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        check_choices(self, "train.")
        if self.strategy == "fsdp" and self.precision not in FSDP_PRECISIONS:
            raise UserError(f"train.precision={self.precision!r} is not supported with train.strategy=fsdp; "
                            f"choose one of {list(FSDP_PRECISIONS)}")
        for key in ("global_batch", "micro_batch", "max_steps"):
            if getattr(self, key) < 1:
                raise UserError(f"train.{key}={getattr(self, key)} must be >= 1")
        if not (math.isfinite(self.flops) and self.flops >= 0):
            raise UserError(f"train.flops={self.flops} must be a finite budget >= 0 (0 = train train.max_steps)")
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
    per_layer = {"none": 0, "elementwise": m.n_embd * m.n_head * m.hd, "headwise": m.n_embd * m.n_head}
    return m.n_layer * per_layer[m.attn_gate]


def gate_matched_intermediate_size(m: ModelConfig) -> int:
    """The MLP width at which an elementwise-gated copy of `m` has m's non-embedding parameters, gate
    counted (within one MLP unit, 3 E, per layer): the gate adds E x (H x hd), SwiGLU 3 E per unit."""
    width = m.intermediate_size - round(m.n_head * m.hd / 3)
    if width < 1:
        raise UserError(f"model.intermediate_size={m.intermediate_size} is too small to give the gate's "
                        f"{m.n_embd * m.n_head * m.hd} parameters per layer back; use a wider MLP")
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
    """Return cfg with `updates` ({section: {key: value}}) applied; unknown keys are errors."""
    sections = {f.name: f.type for f in dataclasses.fields(Config)}
    out = {}
    for section_name in sections:
        section = getattr(cfg, section_name)
        raw = updates.get(section_name) or {}
        if not isinstance(raw, dict):
            raise UserError(f"{source}: section {section_name!r} should be a mapping of keys to values")
        new = dict(raw)
        if section_name == "model" and "preset" in new:
            # a preset sets the shape only: sink/gate fields chosen elsewhere survive it
            shape = MODEL_PRESETS[model_preset(str(new.pop("preset"))).name]
            section = dataclasses.replace(section, n_query_groups=None, head_dim=None, **shape)
        types_ = field_types(type(section))
        values = dataclasses.asdict(section)
        for key, value in new.items():
            if key not in types_:
                raise UserError(f"{source}: unknown key {section_name}.{key}; valid keys: {', '.join(types_)}")
            values[key] = _coerce(value, types_[key], f"{section_name}.{key}")
        out[section_name] = type(section)(**values)
    unknown = set(updates) - set(sections)
    if unknown:
        raise UserError(f"{source}: unknown section(s) {sorted(unknown)}; valid: {list(sections)}")
    return Config(**out)


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
            raise UserError(f"config file {p} is not valid YAML: {str(e).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {p} should hold a mapping with sections model/data/optim/train")
        cfg = merge(cfg, data, str(p))
    if overrides:
        cfg = merge(cfg, parse_overrides(overrides), "command line")
    return cfg


def config_from_dict(data: dict[str, Any], source: str = "config") -> Config:
    return merge(Config(), data, source)


def describe_keys(cfg: Config) -> list[str]:
    """One line per `section.key`: its type and its value in `cfg`, aligned in columns."""
    rows = [(f"{section.name}.{key}", type_name(hint), repr(getattr(getattr(cfg, section.name), key)))
            for section in dataclasses.fields(Config)
            for key, hint in field_types(type(getattr(cfg, section.name))).items()]
    widths = [max(len(row[i]) for row in rows) for i in range(2)]
    return [f"{key:{widths[0]}}  {kind:{widths[1]}}  {value}" for key, kind, value in rows]


def save_config(cfg: Config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
