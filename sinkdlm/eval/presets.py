"""Per-task evaluation settings: `default` (MC ELBO, no guidance) and `paper` (the released scripts').

The paper's scripts (docs/paper-fidelity.md), as estimator and classifier-free guidance weight:
arc_easy mc 0.6; race mc 0.7; hellaswag mc 0.7; social_iqa mc 0.6; piqa chain_rule 0.6; openbookqa
and boolq chain_rule 1.6; lambada (the paper's is `lambada_standard`) chain_rule 1.1 with the greedy
check (our estimators always report the greedy check: lm-eval's `acc` on LAMBADA reads it).
arc_challenge (and winogrande) are unspecified there: they get plain MC without guidance. The paper
also scores with no noise floor (eps = 0) and lets its tokenizer put a BOS before every context.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

from sinkdlm.errors import UserError
from sinkdlm.eval.likelihood import LikelihoodConfig

DEFAULT_MC_NUM = 128  # LLaDA's and Dream's choice; fast enough for CPU runs
PAPER_MC_NUM = 1024  # SMDM's
PAPER_EPS = 0.0  # SMDM's evaluate_diff.py: p = t, no floor (training keeps eps = 1e-3)

# task -> (estimator, classifier-free guidance weight)
PAPER_TASKS: dict[str, tuple[str, float]] = {
    "arc_easy": ("mc", 0.6),
    "race": ("mc", 0.7),
    "hellaswag": ("mc", 0.7),
    "social_iqa": ("mc", 0.6),
    "piqa": ("chain_rule", 0.6),
    "openbookqa": ("chain_rule", 1.6),
    "boolq": ("chain_rule", 1.6),
    "lambada_openai": ("chain_rule", 1.1),
    "lambada_standard": ("chain_rule", 1.1),
}


@dataclass(frozen=True)
class Preset:
    mc_num: int
    eps: float  # the MC estimator's noise floor: p = (1 - eps) t + eps
    add_bos: bool  # put the tokenizer's leading special tokens (Llama's BOS) before every context
    tasks: dict[str, tuple[str, float]]  # task -> (estimator, guidance); others: plain MC


LIKELIHOOD_PRESETS: dict[str, Preset] = {
    "default": Preset(DEFAULT_MC_NUM, LikelihoodConfig.eps, add_bos=False, tasks={}),
    "paper": Preset(PAPER_MC_NUM, PAPER_EPS, add_bos=True, tasks=PAPER_TASKS),
}


def check_preset(name: str) -> Preset:
    if name not in LIKELIHOOD_PRESETS:
        raise UserError(f"unknown evaluation preset {name!r}; choose one of {list(LIKELIHOOD_PRESETS)}")
    return LIKELIHOOD_PRESETS[name]


def task_settings(preset: str, task: str, **overrides: Any) -> LikelihoodConfig:
    """The preset's settings for `task`; overrides that are not None win (e.g. mc_num=128)."""
    chosen = check_preset(preset)
    estimator, guidance = chosen.tasks.get(task, ("mc", 0.0))
    values = {"estimator": estimator, "guidance": guidance, "mc_num": chosen.mc_num, "eps": chosen.eps}
    values.update({k: v for k, v in overrides.items() if v is not None})
    known = {f.name for f in dataclasses.fields(LikelihoodConfig)}
    unknown = set(values) - known
    if unknown:
        raise UserError(f"unknown estimator setting(s) {sorted(unknown)}; valid: {sorted(known)}")
    return LikelihoodConfig(**values)
