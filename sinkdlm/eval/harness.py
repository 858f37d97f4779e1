"""The lm-evaluation-harness model class `sinkdlm`: any checkpoint, MC ELBO or chain-rule likelihoods.

Importing this module registers the class with lm-eval, so Python users can write
`lm_eval.simple_evaluate(model="sinkdlm", model_args="pretrained=runs/demo", tasks=[...])`.
The variant (plain, gated, sink), tokenizer and mask id all come from the checkpoint.
lm-eval is an optional extra: `sinkdlm.eval.run.import_harness()` checks it first (sinkdlm.optional).
"""

from __future__ import annotations

from collections import defaultdict
from typing import Any

from lm_eval.api.model import LM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from sinkdlm.checkpoint import load_model, load_tokenizer, resolve
from sinkdlm.errors import UserError
from sinkdlm.eval import presets
from sinkdlm.eval.likelihood import Estimate, ForwardStats, Pair, Settings, rolling_pairs, score_groups, stable_key

MODEL_NAME = "sinkdlm"
GROUPS_PER_CALL = 8  # questions scored together, so short rows of several fill one batch
DEFAULT_BATCH = Settings.batch_size


def _flag(value: Any) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


BOS_PROBE = "a"  # any text: what the tokenizer's template adds around it is what we want


def leading_special_tokens(tokenizer: Any) -> list[int]:
    """The ids the tokenizer's own template puts before a text (Llama's BOS; [] for most BPEs).

    The paper's HF tokenizer adds them to every context and continuation pair; only the leading
    ones are taken, so a template that also appends an EOS cannot shift the context/continuation split.
    """
    plain = tokenizer.encode(BOS_PROBE, add_special_tokens=False).ids
    full = tokenizer.encode(BOS_PROBE, add_special_tokens=True).ids
    return full[: full.index(plain[0])] if plain and plain[0] in full else []


@register_model(MODEL_NAME)
class DiffusionLM(LM):
    """lm-eval LM over a sinkdlm checkpoint. Arguments left None (estimator, guidance, mc_num, eps, add_bos)
    take the preset's value for the task."""

    def __init__(self, pretrained: str, device: str = "cpu", batch_size: int | str = DEFAULT_BATCH,
                 preset: str = "default", estimator: str | None = None, guidance: float | None = None,
                 mc_num: int | None = None, seed: int = Settings.seed, crn: bool | str = True,
                 eps: float | None = None, add_bos: bool | str | None = None, **unused: Any) -> None:
        super().__init__()
        chosen = presets.check_preset(preset)
        ckpt = resolve(pretrained)
        self.model, self.config = load_model(ckpt, device)
        self.tokenizer = load_tokenizer(ckpt)
        self.max_length = self.config.model.block_size
        self.preset = preset
        add_bos = chosen.add_bos if add_bos is None else _flag(add_bos)
        self.bos = leading_special_tokens(self.tokenizer) if add_bos else []
        batch = int(batch_size) if str(batch_size).isdigit() else DEFAULT_BATCH  # lm-eval may pass "auto"
        self.overrides = dict(estimator=estimator, guidance=None if guidance is None else float(guidance),
                              mc_num=None if mc_num is None else int(mc_num), seed=int(seed), crn=_flag(crn),
                              eps=None if eps is None else float(eps), batch_size=batch)
        self.stats = ForwardStats()
        self.estimates: dict[str, list[Estimate]] = defaultdict(list)  # per task, for MC standard errors

    def settings_for(self, task: str) -> Settings:
        return presets.task_settings(self.preset, task, **self.overrides)

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
        for i, req in enumerate(requests):
            doc = getattr(req, "doc_id", None)
            questions[(getattr(req, "task_name", None) or "", doc if doc is not None else f"request-{i}")].append(i)
        pairs = [self.encode_pair(*req.args) for req in requests]
        out: list[Estimate] = [None] * len(requests)  # type: ignore[list-item]
        keys = list(questions)
        with tqdm(total=len(requests), desc="loglikelihood", disable=disable_tqdm) as bar:
            for start in range(0, len(keys), GROUPS_PER_CALL):
                self._score_chunk(keys[start: start + GROUPS_PER_CALL], questions, pairs, out, bar)
        return [(e.loglik, e.greedy) for e in out]

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
        for i, req in enumerate(tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm)):
            task = getattr(req, "task_name", None) or ""
            windows = rolling_pairs(self._encode(req.args[0]), self.max_length)
            seeds = [stable_key(task, getattr(req, "doc_id", i), w) for w in range(len(windows))]
            estimates = score_groups(self.model, [[w] for w in windows], self.settings_for(task), seeds, self.stats)
            out.append(sum(g[0].loglik for g in estimates))
        return out

    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        raise UserError("generation tasks are not supported by the likelihood model `sinkdlm`; "
                        "use `sinkdlm eval-gsm8k` for GSM8K, or pick loglikelihood tasks")
