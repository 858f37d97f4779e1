"""The lm-evaluation-harness model class `sinkdlm`: any checkpoint, MC ELBO or chain-rule likelihoods,
and generation by the diffusion sampler.

Importing this module registers the class with lm-eval, so Python users can write
`lm_eval.simple_evaluate(model="sinkdlm", model_args="pretrained=runs/demo", tasks=[...])`.
The variant (plain, gated, sink), tokenizer and mask id all come from the checkpoint.
lm-eval is an optional extra: `sinkdlm.eval.run.import_harness()` checks it first (sinkdlm.optional).

Generation (`generate_until`, docs/lm-eval.md): every SampleConfig field may be given in model_args
(steps=64,temperature=0.1,...); the task's `max_gen_toks` sets gen_length unless model_args does,
steps default to gen_length (one token per step), the context is cut on the left to
max_length - gen_length tokens (lm-eval's HFLM convention) and the text is cut at the first stop string.

Data parallel: under torchrun (WORLD_SIZE > 1) the class joins a torch.distributed group (gloo on
CPU, nccl on GPU) and reports `rank`/`world_size`; lm-eval's evaluator then gives each rank every
world_size-th document and gathers the metrics on rank 0 through `all_gather`/`gather_object`.
Every random draw is keyed by (task, document, request), so the numbers do not depend on the split;
a request without a document id is keyed by its own arguments (`request_key`). The exceptions are
the sampler's batch-level settings (flattened_batch ranking; left padding with front sinks), which
make a row depend on its batch mates and so on the split: refused when world_size > 1.
"""

from __future__ import annotations

import difflib
import inspect
import logging
import os
from collections import Counter, defaultdict
from typing import Any

import torch
from lm_eval.api import registry as lm_eval_registry
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from sinkdlm.checkpoint import load_meta, load_model, load_tokenizer, resolve
from sinkdlm.data.tokenizer import eos_id as tokenizer_eos
from sinkdlm.errors import UserError
from sinkdlm.eval import presets
from sinkdlm.eval.likelihood import (
    Estimate,
    ForwardStats,
    LikelihoodConfig,
    Pair,
    rolling_pairs,
    score_groups,
    stable_key,
)
from sinkdlm.fields import check_allowed, field_types, without_none
from sinkdlm.sample import SAMPLING_FIELDS, SampleConfig, generate

MODEL_NAME = "sinkdlm"
GROUPS_PER_CALL = 8  # questions scored together, so short rows of several fill one batch
DEFAULT_BATCH = LikelihoodConfig.batch_size
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's HFLM default, for tasks that set no max_gen_toks
# arguments lm-eval's simple_evaluate adds to every model's; meaningless here
LM_EVAL_EXTRAS = ("max_batch_size",)
# generation_kwargs of lm-eval tasks that are not SampleConfig fields: read, or ignored with a reason
UNTIL, MAX_GEN_TOKS, DO_SAMPLE = "until", "max_gen_toks", "do_sample"
HF_SAMPLING_TEMPERATURE = 1.0  # transformers' default temperature when do_sample is on
BOOL_WORDS = {"true": True, "false": False, "1": True, "0": False, "yes": True, "no": False}
AUTO_BATCH = "auto"  # lm-eval's batch_size=auto (or auto:N): we take DEFAULT_BATCH
BOS_PROBE = "a"  # any text: what the tokenizer's template adds around it is what we want


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's own template puts before a text (Llama's BOS; [] for most BPEs).

    The paper's HF tokenizer adds them to every context and continuation pair; only the leading
    ones are taken, so a template that also appends an EOS cannot shift the context/continuation split.
    """
    plain = tokenizer.encode(BOS_PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(BOS_PROBE, add_special_tokens=True).ids
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


# ---- sampler settings from model_args / generation_kwargs ------------------------------------------


def typed(name: str, value: Any, base: type, where: str) -> Any:
    """`value` as lm-eval hands it over (already typed, or a string from Python callers) converted to
    bool (one of BOOL_WORDS), int or float; anything else about it is a UserError naming the setting."""
    try:
        if base is bool:
            if str(value).lower() not in BOOL_WORDS:
                raise ValueError
            return BOOL_WORDS[str(value).lower()]
        if base in (int, float):
            if isinstance(value, bool) or (base is int and isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return base(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {name}={value!r} is not a {base.__name__}") from None
    return value


def sampling_value(name: str, value: Any, where: str) -> Any:
    """A SampleConfig field's value, converted to the field's type and checked against its declared choices."""
    hint = field_types(SampleConfig)[name]
    base = without_none(hint)
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        if base is hint:
            raise UserError(f"{where}: {name}=None is not allowed; give a {base.__name__}")
        return None
    value = typed(name, value, base, where)
    check_allowed(value, hint, f"{where}: {name}")
    return value


def batch_size_value(value: Any) -> int:
    """model_args' batch_size: a whole number >= 1, or lm-eval's "auto"/"auto:N" (DEFAULT_BATCH here)."""
    if str(value).startswith(AUTO_BATCH):
        return DEFAULT_BATCH
    size = typed("batch_size", value, int, "model_args")
    if size < 1:
        raise UserError(f"model_args: batch_size={value!r} must be >= 1 (or {AUTO_BATCH})")
    return size


def split_model_args(given: dict[str, Any]) -> dict[str, Any]:
    """The sampler settings among model_args that DiffusionLM.__init__ does not name itself; an
    unknown key is a UserError naming the closest known one (lm-eval would otherwise drop it)."""
    sampling = {}
    named = [p for p in inspect.signature(DiffusionLM.__init__).parameters if p not in ("self", "sampling")]
    known = list(dict.fromkeys(named + list(SAMPLING_FIELDS)))
    for key, value in given.items():
        if key in LM_EVAL_EXTRAS:
            continue
        if key not in SAMPLING_FIELDS:
            close = difflib.get_close_matches(key, known, n=1)
            raise UserError(f"unknown model_args key {key!r} for model {MODEL_NAME!r}"
                            + (f"; did you mean {close[0]!r}?" if close else f"; known: {', '.join(known)}"))
        sampling[key] = sampling_value(key, value, "model_args")
    return sampling


def _request_sampling(gen_kwargs: dict[str, Any], task: str) -> dict[str, Any]:
    """The SampleConfig fields a request's generation_kwargs set (temperature, top_p, ...); do_sample
    off means argmax, as in transformers. A key the sampler has no setting for is a UserError."""
    values = {}
    for key, value in gen_kwargs.items():
        if key in (UNTIL, MAX_GEN_TOKS, DO_SAMPLE):
            continue
        if key not in SAMPLING_FIELDS:
            raise UserError(f"task {task!r} asks for generation setting {key}={value!r}, which the diffusion "
                            f"sampler does not have; its settings: {', '.join(SAMPLING_FIELDS)}")
        values[key] = sampling_value(key, value, f"task {task!r} generation_kwargs")
    if DO_SAMPLE in gen_kwargs:
        if typed(DO_SAMPLE, gen_kwargs[DO_SAMPLE], bool, f"task {task!r} generation_kwargs"):
            values.setdefault("temperature", HF_SAMPLING_TEMPERATURE)
        else:
            values["temperature"] = 0.0
    return values


def request_key(req: Any) -> int | tuple[str, int]:
    """What keys a request's random draws besides its task: its document id, else its own arguments
    (the same on every rank and in every order, unlike its index in a rank's list)."""
    doc = getattr(req, "doc_id", None)
    return doc if doc is not None else ("request", stable_key(*req.args))


def refuse_split_dependence(cfg: SampleConfig, model: Any, world_size: int, task: str) -> None:
    """The sampler settings under which a row's output depends on its batch mates (sinkdlm.sample)
    would make data-parallel numbers depend on how the documents are split: refused there."""
    front_sinks = model.sink_tokens > 0 and model.sink_position == "front"
    setting = ("batch_ranking=flattened_batch" if cfg.batch_ranking == "flattened_batch" else
               "padding=left with front sinks" if cfg.padding == "left" and front_sinks else None)
    if world_size > 1 and setting:
        raise UserError(f"task {task!r}: {setting} makes a row depend on its batch mates, so results would depend "
                        f"on the split over {world_size} processes; run it in one process or drop the setting")


def stop_at(text: str, until: list[str]) -> str:
    """The text up to the first occurrence of any stop string (lm-eval's convention)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


# ---- data parallel -------------------------------------------------------------------------------


def init_distributed(device: str) -> tuple[int, int, str]:
    """(rank, world_size, device) of this process: under torchrun (WORLD_SIZE > 1) join the default
    process group (gloo on CPU, nccl on GPU; one GPU per local rank), else (0, 1, device)."""
    if device.startswith("cuda") and not torch.cuda.is_available():  # lm-eval's CLI defaults to cuda:0
        logging.getLogger(__name__).warning("device %s is not available (no CUDA): running on the CPU", device)
        device = "cpu"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, device
    import torch.distributed as dist

    on_gpu = device.startswith("cuda")
    if on_gpu:
        device = f"cuda:{int(os.environ.get('LOCAL_RANK', '0'))}"
        torch.cuda.set_device(device)  # nccl's object collectives (gather_object) use the current device
    if not dist.is_initialized():
        dist.init_process_group("nccl" if on_gpu else "gloo")
    return dist.get_rank(), dist.get_world_size(), device


def forget_earlier_import(alias: str, class_name: str) -> None:
    """Drop `alias` from lm-eval's model registry when it holds this module's class from an earlier import
    of it (importlib.reload, or a test that re-imports sinkdlm modules): lm-eval refuses a second class
    under one alias, and the new class is the same code. Registries: `model_registry._objs` (lm-eval
    0.4.9+), the MODEL_REGISTRY dict before."""
    registry = getattr(lm_eval_registry, "model_registry", None)
    entries = getattr(registry, "_objs", None)
    if entries is None:
        entries = getattr(lm_eval_registry, "MODEL_REGISTRY", None)
    current = entries.get(alias) if isinstance(entries, dict) else None
    if isinstance(current, type) and (current.__module__, current.__qualname__) == (__name__, class_name):
        del entries[alias]


forget_earlier_import(MODEL_NAME, "DiffusionLM")


@register_model(MODEL_NAME)
class DiffusionLM(LM):
    """lm-eval LM over a sinkdlm checkpoint. Arguments left None (estimator, guidance, mc_num, eps, add_bos)
    take the preset's value for the task; `guidance` and `seed` serve scoring and sampling alike; the
    other SampleConfig fields (**sampling) set the sampler for generation tasks."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = DEFAULT_BATCH,
                 preset: str = "default", estimator: str | None = None, guidance: float | None = None,
                 mc_num: int | None = None, seed: int | None = None, crn: bool | str = True,
                 eps: float | None = None, add_bos: bool | str | None = None,
                 max_gen_toks: int = DEFAULT_MAX_GEN_TOKS, **sampling: Any) -> None:
        super().__init__()
        chosen = presets.check_preset(preset)
        self.sampling = split_model_args(sampling)
        self.sampling.update({k: sampling_value(k, v, "model_args") for k, v in
                              (("guidance", guidance), ("seed", seed)) if v is not None})
        self._rank, self._world_size, device = init_distributed(device)
        self._device = torch.device(device)
        ckpt = resolve(pretrained)
        self.model, self.config = load_model(ckpt, device)
        self.tokenizer = load_tokenizer(ckpt)
        eos = load_meta(ckpt).get("eos_id")  # what training recorded, as sample.load_for_sampling reads it
        self.eos_id = int(eos) if eos is not None else tokenizer_eos(self.tokenizer)
        self.max_length = self.config.model.block_size
        self.max_gen_toks = typed(MAX_GEN_TOKS, max_gen_toks, int, "model_args")
        if self.max_gen_toks < 1:
            raise UserError(f"model_args: {MAX_GEN_TOKS}={max_gen_toks!r} must be >= 1")
        self.preset = preset
        add_bos = chosen.add_bos if add_bos is None else typed("add_bos", add_bos, bool, "model_args")
        self.bos = leading_special_tokens(self.tokenizer) if add_bos else []
        self.batch_size = batch_size_value(batch_size)
        given = dict(guidance=(guidance, float), mc_num=(mc_num, int), eps=(eps, float),
                     seed=(LikelihoodConfig.seed if seed is None else seed, int))
        self.overrides = {k: None if v is None else typed(k, v, kind, "model_args") for k, (v, kind) in given.items()}
        self.overrides.update(estimator=estimator, crn=typed("crn", crn, bool, "model_args"),
                              batch_size=self.batch_size)
        self.settings_for("")  # mc_num, eps, estimator out of range: now, not at the first request
        self.stats = ForwardStats()
        self.estimates: dict[str, list[Estimate]] = defaultdict(list)  # per task, for MC standard errors

    def settings_for(self, task: str) -> LikelihoodConfig:
        return presets.task_settings(self.preset, task, **self.overrides)

    # ---- data parallel (lm-eval's evaluator calls these when world_size > 1) ----

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        """Every rank's tensor, concatenated (scalars stacked), as accelerate's gather returns them."""
        if self.world_size <= 1:
            return tensor
        import torch.distributed as dist

        parts = [torch.zeros_like(tensor) for _ in range(self.world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj: Any, dst: int = 0) -> list[Any] | None:
        if self.world_size <= 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.world_size if self.rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            import torch.distributed as dist

            dist.barrier()

    # ---- tokens ----

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_pair(self, context: str, continuation: str) -> Pair:
        """lm-eval's convention (trailing spaces move to the continuation), the BOS (if any) before the
        context, and the context cut on the left to fit."""
        spaces = len(context) - len(context.rstrip())
        if spaces:
            context, continuation = context[:-spaces], context[-spaces:] + continuation
        whole, ctx = self._encode(context + continuation), self._encode(context)
        ctx_ids, cont_ids = self.bos + whole[: len(ctx)], whole[len(ctx):]
        cont_ids = cont_ids[-self.max_length:]
        room = self.max_length - len(cont_ids)
        return (ctx_ids[-room:] if room else []), cont_ids
    # ---- lm-eval API ----

    def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        questions: dict[tuple[str, Any], list[int]] = defaultdict(list)
        first: dict[int, int] = {}  # lm-eval repeats a request object (its `repeats`, data-parallel padding)
        for i, req in enumerate(requests):
            if first.setdefault(id(req), i) == i:  # scored (and counted in the MC stderr) once
                questions[(getattr(req, "task_name", None) or "", request_key(req))].append(i)
        pairs = [self.encode_pair(*req.args) for req in requests]
        out: list[Estimate] = [None] * len(requests)  # type: ignore[list-item]
        keys = list(questions)
        with tqdm(total=len(first), desc="loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(keys), GROUPS_PER_CALL):
                self._score_chunk(keys[start: start + GROUPS_PER_CALL], questions, pairs, out, bar)
        return [(out[first[id(req)]].loglik, out[first[id(req)]].greedy) for req in requests]

    def _score_chunk(self, keys: list[tuple[str, Any]], questions: dict, pairs: list[Pair],
                     out: list[Estimate], bar: tqdm) -> None:
        by_task: dict[str, list[tuple[str, Any]]] = defaultdict(list)
        for key in keys:
            by_task[key[0]].append(key)
        for task, task_keys in by_task.items():
            groups = [[pairs[i] for i in questions[k]] for k in task_keys]
            seeds = [stable_key(*k) for k in task_keys]
            estimates = score_groups(self.model, groups, self.settings_for(task), seeds, self.stats)
            for k, group in zip(task_keys, estimates):
                for i, e in zip(questions[k], group):
                    out[i] = e
                    self.estimates[task].append(e)
                bar.update(len(group))

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        """Sum of window ELBOs (a lower bound on log p(text)) over disjoint windows (no BOS: the
        paper's scripts have no rolling likelihood, and a BOS would be scored as text here)."""
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            task = getattr(req, "task_name", None) or ""
            windows = rolling_pairs(self._encode(req.args[0]), self.max_length)
            seeds = [stable_key(task, request_key(req), w) for w in range(len(windows))]
            estimates = score_groups(self.model, [[w] for w in windows], self.settings_for(task), seeds, self.stats)
            out.append(sum(g[0].loglik for g in estimates))
        return out


    # ---- generation ----

    def sample_config(self, gen_kwargs: dict[str, Any], task: str) -> tuple[SampleConfig, int]:
        """One request's sampler settings and the most new tokens its answer keeps.

        model_args win over the task's generation_kwargs. gen_length: model_args' (which then is also
        the limit), else the task's max_gen_toks rounded up to whole blocks (the answer is cut back to
        max_gen_toks); steps default to gen_length (one token per step).
        """
        values = {**_request_sampling(gen_kwargs, task), **self.sampling}
        limit = int(gen_kwargs.get(MAX_GEN_TOKS, self.max_gen_toks))
        if "gen_length" in values:
            limit = values["gen_length"]
        else:
            block = values.get("block_length")
            values["gen_length"] = -(-limit // block) * block if block else limit
        values.setdefault("steps", values["gen_length"])
        try:
            cfg = SampleConfig(**values)
        except UserError as e:
            raise UserError(f"task {task!r}: {e} (sampler settings come from --model_args)") from None
        refuse_split_dependence(cfg, self.config.model, self.world_size, task)
        return cfg, limit

    def prompt_ids(self, context: str, cfg: SampleConfig, task: str) -> list[int]:
        """The context's tokens (after the BOS, if any) cut on the left to leave room for the
        generation (lm-eval's HFLM: max_length - max_gen_toks); an empty context becomes the EOS."""
        window = min(cfg.gen_length, self.max_length) if cfg.length_includes_prompt else self.max_length
        room = window - (1 if cfg.length_includes_prompt else cfg.gen_length)
        if room < 1:
            raise UserError(f"task {task!r}: generating {cfg.gen_length} tokens leaves no room for a context in "
                            f"the model's {self.max_length}-token window; pass a smaller gen_length in "
                            f"--model_args (e.g. gen_length={self.max_length // 2})")
        ids = (self.bos + self._encode(context))[-room:]
        return ids or [self.eos_id]

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        """Sample each request's continuation with the diffusion sampler; its noise is keyed by
        (seed, task, document, request index), so it depends neither on the batch nor on the rank
        (except under the batch-level settings, which refuse_split_dependence refuses on several ranks)."""
        jobs: dict[str, list[tuple[int, list[int], int, int]]] = defaultdict(list)  # per sampler settings
        configs: dict[str, SampleConfig] = {}
        until: list[list[str]] = []
        seen: Counter = Counter()
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            task = getattr(req, "task_name", None) or ""
            cfg, limit = self.sample_config(dict(gen_kwargs), task)
            stops = gen_kwargs.get(UNTIL) or []
            until.append([stops] if isinstance(stops, str) else list(stops))
            name = (task, request_key(req), getattr(req, "idx", 0))
            seen[name] += 1  # lm-eval repeats a request object for `repeats` samples
            configs[repr(cfg)] = cfg
            jobs[repr(cfg)].append((i, self.prompt_ids(context, cfg, task), limit, stable_key(*name, seen[name])))
        out: list[str] = [""] * len(requests)
        with tqdm(total=len(requests), desc="generate_until", disable=disable_tqdm) as bar:
            for key, items in jobs.items():
                items.sort(key=lambda job: -len(job[1]))  # similar lengths together: less padding
                for start in range(0, len(items), self.batch_size):
                    self._generate_chunk(items[start: start + self.batch_size], configs[key], until, out)
                    bar.update(len(items[start: start + self.batch_size]))
        for req, text in zip(requests, out):
            self.cache_hook.add_partial("generate_until", req.args, text)
        return out

    def _generate_chunk(self, items: list[tuple[int, list[int], int, int]], cfg: SampleConfig,
                        until: list[list[str]], out: list[str]) -> None:
        prompts = [prompt for _, prompt, _, _ in items]
        tokens = generate(self.model, prompts, cfg, self.model.mask_id, self.eos_id,
                          indices=[noise for *_, noise in items])
        for (i, _, limit, _), new in zip(items, tokens):
            out[i] = stop_at(self.tokenizer.decode(new[:limit], skip_special_tokens=True), until[i])
