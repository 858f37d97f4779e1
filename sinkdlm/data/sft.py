"""Supervised fine-tuning data: (prompt, response) pairs as fixed-length token rows.

Every row is prompt + response + EOS padding up to seq_len. The response *and its EOS padding* are
in the loss (`response_mask`), the prompt never is: SFT masks with
`diffusion.mask_tokens(..., maskable=response_mask)` and weighs with `diffusion.sft_weights`.

Two file formats:
- JSONL, one {"prompt": ..., "response": ...} object per line;
- SMDM's GSM8K `train.txt`: "question||chain-of-thought #### answer" per line. Each line gives two
  examples, as SMDM's preprocessing does: "Question: q" -> "Answer: cot", and
  "Question: q" + "Answer: cot" -> "####answer" (the second prompt is the first example's prompt and
  response tokens, so two-stage generation sees at stage 2 exactly what it was trained on).
Pieces are tokenized separately and concatenated, as SMDM does. A line whose examples do not fit in
seq_len (with at least one EOS after the answer) is skipped, as in SMDM.
"""

from __future__ import annotations

import operator
import random
from pathlib import Path

import numpy as np
import torch
from tokenizers import Tokenizer
from torch import Tensor

from sinkdlm.errors import UserError
from sinkdlm.jsonl import is_jsonl, read_jsonl

QUESTION_PREFIX = "Question: "
ANSWER_PREFIX = "Answer: "
FINAL_MARK = "####"
FIELD_SEP = "||"
SFT_STREAM = 3  # the sft_indices RNG stream, apart from diffusion's t (no suffix) and masks (1)
# a held-out synthetic problem, for the `generate` that sft prints and README shows (seed 42's model answers it
# right, "Answer: 61 + 4 = 65"; it gets ~13% of the held-out problems wrong)
EXAMPLE_QUESTION = "What is 61 + 4?"
# stage 1 of eval-gsm8k's `synthetic` preset: room for "Answer: 61 + 4 = 65" and its EOS
EXAMPLE_GEN_LENGTH = 24


def gsm8k_prompt(question: str) -> str:
    """The stage-1 prompt, identical in SFT data and GSM8K evaluation."""
    return QUESTION_PREFIX + question.strip()


def example_generate(run: str | Path) -> str:
    """A `generate` that prompts an SFT model as it was trained: "Question: " + the question (stage 1;
    the model writes "Answer: ..." itself)."""
    return (f'sinkdlm generate --checkpoint {run} --prompt "{gsm8k_prompt(EXAMPLE_QUESTION)}" '
            f"--gen-length {EXAMPLE_GEN_LENGTH} --steps {EXAMPLE_GEN_LENGTH}")


def template_help(run: str | Path) -> str:
    """The SFT prompt template, as `sinkdlm sft --help` states it."""
    return (f"Prompt template (GSM8K format): a train.txt line 'question{FIELD_SEP}reasoning {FINAL_MARK} answer' "
            f"gives two examples, prompt '{QUESTION_PREFIX}question' -> response '{ANSWER_PREFIX}reasoning', and "
            f"prompt '{QUESTION_PREFIX}question{ANSWER_PREFIX}reasoning' -> response '{FINAL_MARK} answer' (each "
            f"piece tokenized on its own); a JSONL row's prompt and response are used as they are. Prompt the "
            f"fine-tuned model the same way: {example_generate(run)} prints 'Answer: 61 + 4 = N'; "
            f"`sinkdlm eval-gsm8k` adds the second stage ('{FINAL_MARK} N') itself.")


def next_steps(run: str | Path, synthetic: bool, data: str | Path | None = None) -> str:
    """sft's last lines: how to score the run, and a `generate` that prompts it with the SFT template."""
    if synthetic:
        steps = [f"sinkdlm eval-gsm8k --checkpoint {run} --data synthetic   # the 198 held-out problems",
                 example_generate(run)]
    elif data is not None and is_jsonl(Path(data)):
        steps = [f"sinkdlm generate --checkpoint {run} --prompt PROMPT   # PROMPT written as the prompts of {data}"]
    else:
        steps = [f"sinkdlm eval-gsm8k --checkpoint {run}   # the GSM8K test",
                 f'sinkdlm generate --checkpoint {run} --prompt "{gsm8k_prompt("QUESTION")}"   # the SFT template']
    return "next:\n" + "\n".join(f"  {s}" for s in steps)


def parse_gsm8k_line(line: str) -> tuple[str, str, str] | None:
    """'question||cot #### answer' -> (question, cot, answer), or None when malformed (SMDM skips)."""
    parts = line.rstrip("\n").split(FIELD_SEP)
    if len(parts) != 2 or len(parts[1].split(FINAL_MARK)) != 2:
        return None
    cot, answer = parts[1].split(FINAL_MARK)
    return parts[0], cot, answer


def _encode(tok: Tokenizer, text: str, first: bool) -> list[int]:
    return tok.encode(text, add_special_tokens=first).ids


def gsm8k_examples(line: str, tok: Tokenizer, eos_id: int) -> list[tuple[list[int], list[int]]]:
    """The two (prompt, response) token pairs of one train.txt line; [] when malformed."""
    parsed = parse_gsm8k_line(line)
    if parsed is None:
        return []
    question, cot, answer = parsed
    q = _encode(tok, gsm8k_prompt(question), True)
    thought = _encode(tok, ANSWER_PREFIX + cot, False)
    final = _encode(tok, FINAL_MARK + answer, False) + [eos_id]
    return [(q, thought), (q + thought, final)]


def _jsonl_examples(path: Path, tok: Tokenizer, eos_id: int) -> list[list[tuple[list[int], list[int]]]]:
    groups = []
    for number, row in read_jsonl(path, ["prompt", "response"]):
        if not row["prompt"]:
            raise UserError(f"{path}:{number}: empty prompt; every example needs a prompt")
        response = _encode(tok, row["response"], False) + [eos_id]
        groups.append([(_encode(tok, row["prompt"], True), response)])
    return groups


def read_examples(path: str | Path, tok: Tokenizer, eos_id: int) -> list[list[tuple[list[int], list[int]]]]:
    """Examples grouped by source line (a GSM8K line gives two; JSONL one)."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"SFT data {p} does not exist; pass a JSONL or a GSM8K train.txt file")
    if is_jsonl(p):
        return _jsonl_examples(p, tok, eos_id)
    return [ex for ex in (gsm8k_examples(line, tok, eos_id) for line in p.read_text().splitlines()) if ex]


class SFTData:
    """Fixed-length SFT rows: `batch(indices) -> (ids (n, seq_len), response_mask (n, seq_len))`."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, seq_len: int, eos_id: int) -> None:
        groups = read_examples(path, tokenizer, eos_id)
        fits = [g for g in groups if all(len(p) + len(r) <= seq_len for p, r in g)]
        self.skipped_lines = len(groups) - len(fits)
        examples = [ex for g in fits for ex in g]
        if not examples:
            raise UserError(f"SFT data {path}: no example fits in seq_len={seq_len} "
                            f"({len(groups)} read); raise data.seq_len or shorten the examples")
        self.seq_len = seq_len
        self.ids = torch.full((len(examples), seq_len), eos_id, dtype=torch.long)
        self.response_mask = torch.zeros(len(examples), seq_len, dtype=torch.bool)
        self.prompt_lengths = []
        for i, (prompt, response) in enumerate(examples):
            tokens = prompt + response
            self.ids[i, : len(tokens)] = torch.tensor(tokens)
            self.response_mask[i, len(prompt):] = True  # the EOS padding is part of the response
            self.prompt_lengths.append(len(prompt))

    def __len__(self) -> int:
        return self.ids.shape[0]

    def batch(self, indices: list[int]) -> tuple[Tensor, Tensor]:
        index = torch.as_tensor(indices, dtype=torch.long)
        return self.ids[index], self.response_mask[index]


def sft_indices(seed: int, step: int, sample_indices: list[int], n_examples: int) -> list[int]:
    """Which example each global sample index of a step trains on: a pure function of its arguments.

    Drawn independently per (seed, step, sample) with replacement, so any world size, micro-batch or
    resume point sees the same examples (like diffusion.draw_t).
    """
    return [int(np.random.default_rng([seed, step, i, SFT_STREAM]).integers(n_examples))
            for i in sample_indices]


# ---------------------------------------------------------------------------------------------
# a SYNTHETIC stand-in for GSM8K (the real train file is not obtainable offline): one-step
# arithmetic in GSM8K's train.txt format, "What is 23 + 4?||23 + 4 = 27 #### 27", through the same
# examples and template as real data. Two-digit numbers plus or minus one digit, without carrying or
# borrowing: the answer copies the tens digit and applies one of 110 one-digit facts, which the
# demo's 1M-parameter model learns in minutes. One problem in five is held out (never written to a
# training file), so the held-out score measures more than recall of trained questions.

OPERATIONS = {"+": operator.add, "-": operator.sub}
FIRST_OPERANDS = range(10, 100)
SECOND_OPERANDS = range(10)
HELD_OUT_SHARE = 5  # 1 in this many problems is held out
HELD_OUT_SEED = "held-out test"


def _no_carry(a: int, op: str, b: int) -> bool:
    units = OPERATIONS[op](a % 10, b)
    return 0 <= units <= 9


def arithmetic_problems() -> list[tuple[int, str, int]]:
    """Every (a, op, b) of the synthetic task (990 problems)."""
    return [(a, op, b) for op in OPERATIONS for a in FIRST_OPERANDS for b in SECOND_OPERANDS if _no_carry(a, op, b)]


def arithmetic_split() -> tuple[list[tuple[int, str, int]], list[tuple[int, str, int]]]:
    """(train problems, held-out problems): a fixed partition, the held-out ones in a fixed random order."""
    problems = arithmetic_problems()
    held_out = random.Random(HELD_OUT_SEED).sample(problems, len(problems) // HELD_OUT_SHARE)
    chosen = set(held_out)
    return [p for p in problems if p not in chosen], held_out


def synthetic_gsm8k_line(a: int, op: str, b: int) -> str:
    """One problem in train.txt format: 'question||cot #### answer'."""
    result = OPERATIONS[op](a, b)
    return f"What is {a} {op} {b}?{FIELD_SEP}{a} {op} {b} = {result} {FINAL_MARK} {result}"


def synthetic_gsm8k(n: int, seed: int | str = 0) -> list[str]:
    """n training lines drawn with replacement from the problems not held out (NOT GSM8K)."""
    train, _ = arithmetic_split()
    rng = random.Random(seed)
    return [synthetic_gsm8k_line(*rng.choice(train)) for _ in range(n)]


def synthetic_gsm8k_test(n: int | None = None) -> list[dict[str, str]]:
    """The first n (default all 198) held-out problems as GSM8K test rows {"question", "answer": "cot #### N"}.

    For checking that SFT + template + decoding work end to end offline; it says nothing about GSM8K.
    """
    rows = []
    for problem in arithmetic_split()[1][:n]:
        question, cot, answer = parse_gsm8k_line(synthetic_gsm8k_line(*problem))
        rows.append({"question": question, "answer": f"{cot.strip()} {FINAL_MARK} {answer.strip()}"})
    return rows


def write_synthetic_gsm8k(path: str | Path, n: int = 2000, seed: int = 0) -> Path:
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text("\n".join(synthetic_gsm8k(n, seed)) + "\n")
    return p
