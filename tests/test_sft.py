import json
import math

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from sinkdlm.data.sft import (
    SFTData,
    arithmetic_problems,
    arithmetic_split,
    parse_gsm8k_line,
    sft_indices,
    synthetic_gsm8k,
    synthetic_gsm8k_test,
    write_synthetic_gsm8k,
)
from sinkdlm.diffusion import draw_uniforms, elbo_loss, mask_tokens, sft_weights
from sinkdlm.errors import UserError

EOS = 0


@pytest.fixture
def tok() -> Tokenizer:
    words = ["<|endoftext|>", "[UNK]", "Question:", "Answer:", "####", "q1", "q2", "c1", "c2", "a1", "p", "r"]
    t = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    t.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return t


def test_gsm8k_line_gives_smdms_two_examples(tok, tmp_path):
    (tmp_path / "train.txt").write_text("q1 q2||c1 c2 #### a1\nmalformed line without separators\n")
    data = SFTData(tmp_path / "train.txt", tok, seq_len=12, eos_id=EOS)
    ids, resp = data.batch([0, 1])
    #  "Question: q1 q2" -> "Answer: c1 c2" + EOS padding
    assert ids[0].tolist() == [2, 5, 6, 3, 7, 8] + [EOS] * 6
    assert resp[0].tolist() == [False] * 3 + [True] * 9
    #  "Question: q1 q2 Answer: c1 c2" -> "#### a1" EOS + padding
    assert ids[1].tolist() == [2, 5, 6, 3, 7, 8, 4, 9] + [EOS] * 4
    assert resp[1].tolist() == [False] * 6 + [True] * 6
    assert len(data) == 2


def test_lines_that_do_not_fit_are_skipped(tok, tmp_path):
    (tmp_path / "train.txt").write_text("q1||c1 #### a1\nq1 q1 q1 q1||c1 c1 c1 #### a1\n")
    data = SFTData(tmp_path / "train.txt", tok, seq_len=8, eos_id=EOS)
    assert len(data) == 2 and data.skipped_lines == 1


def test_jsonl_and_its_errors_name_file_and_line(tok, tmp_path):
    good = tmp_path / "d.jsonl"
    good.write_text(json.dumps({"prompt": "p p", "response": "r"}) + "\n\n")
    ids, resp = SFTData(good, tok, seq_len=5, eos_id=EOS).batch([0])
    assert ids.tolist() == [[10, 10, 11, EOS, EOS]] and resp.tolist() == [[False, False, True, True, True]]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"prompt": "p", "response": "r"}) + "\n{oops\n")
    with pytest.raises(UserError, match=r"bad.jsonl:2"):
        SFTData(bad, tok, seq_len=5, eos_id=EOS)
    bad.write_text(json.dumps({"prompt": "p"}) + "\n")
    with pytest.raises(UserError, match=r"bad.jsonl:1"):
        SFTData(bad, tok, seq_len=5, eos_id=EOS)


def test_sft_never_masks_the_prompt_and_loss_matches_hand_computation():
    ids = torch.tensor([[5, 6, 7, 8, 0, 0], [5, 6, 7, 8, 9, 0]])
    response = torch.tensor([[0, 0, 1, 1, 1, 1], [0, 0, 0, 0, 1, 1]], dtype=torch.bool)
    p = torch.tensor([1.0, 1.0], dtype=torch.float64)  # p = 1: every maskable token is masked
    noisy, masked = mask_tokens(ids, p, draw_uniforms(1, 0, [0, 1], 6), mask_id=10, maskable=response)
    assert torch.equal(masked, response) and (noisy[~response] == ids[~response]).all()
    for step in range(20):  # random levels: prompt positions are never masked
        pr = torch.rand(2, dtype=torch.float64)
        _, m = mask_tokens(ids, pr, draw_uniforms(1, step, [0, 1], 6), 10, maskable=response)
        assert not (m & ~response).any()
    # uniform logits: CE = log V everywhere; p = 0.5
    vocab = 10
    logits = torch.zeros(2, 6, vocab)
    half = torch.tensor([0.5, 0.5], dtype=torch.float64)
    loss = elbo_loss(logits, ids, masked, half, sft_weights(response))
    # per sequence: sum over its masked response tokens of (log V / 0.5) / n_response, then batch mean
    hand = ((4 * math.log(vocab) / 0.5) / 4 + (2 * math.log(vocab) / 0.5) / 2) / 2
    assert loss.item() == pytest.approx(hand, rel=1e-6)


def test_sft_indices_are_a_pure_function():
    a = sft_indices(1, 5, [0, 1, 2, 3], 100)
    assert a == sft_indices(1, 5, [0, 1, 2, 3], 100)
    assert sft_indices(1, 5, [2, 3], 100) == a[2:]  # a rank's share agrees with the whole batch
    assert a != sft_indices(1, 6, [0, 1, 2, 3], 100)
    assert all(0 <= i < 100 for i in a)


def test_synthetic_gsm8k_is_well_formed_and_correct(tmp_path):
    lines = synthetic_gsm8k(50, seed=3)
    assert lines == synthetic_gsm8k(50, seed=3)
    for line in lines:
        question, cot, answer = parse_gsm8k_line(line)
        last_equation = cot.split("=")[-1]
        assert int(answer) == int("".join(ch for ch in last_equation if ch.isdigit()))
    path = write_synthetic_gsm8k(tmp_path / "synthetic.txt", n=10)
    assert len(path.read_text().splitlines()) == 10


def test_synthetic_test_problems_are_held_out_and_scorable():
    from sinkdlm.eval.gsm8k import equivalent, extract_flexible, extract_strict, gold_answer

    rows = synthetic_gsm8k_test(200)
    assert rows == synthetic_gsm8k_test(200)
    for row in rows:
        cot, answer = row["answer"].split(" #### ")
        assert extract_strict(row["answer"]) == gold_answer(row["answer"]) == answer
        assert equivalent(extract_flexible(cot), answer)  # the cot ends on the answer
    train = {parse_gsm8k_line(line)[0] for seed in range(3) for line in synthetic_gsm8k(2000, seed)}
    overlap = sum(r["question"] in train for r in rows) / len(rows)
    assert overlap == 0  # a fixed partition: no training file ever holds a held-out problem
    assert synthetic_gsm8k_test(3) == rows[:3] and len(synthetic_gsm8k_test()) == len(arithmetic_split()[1])


def test_synthetic_task_is_one_step_arithmetic_without_carrying():
    train, held_out = arithmetic_split()
    assert len(held_out) == len(arithmetic_problems()) // 5 and not set(train) & set(held_out)
    for line in synthetic_gsm8k(300, seed=1):
        question, cot, answer = parse_gsm8k_line(line)
        a, op, b = question.removeprefix("What is ").removesuffix("?").split()
        expected = int(a) + int(b) if op == "+" else int(a) - int(b)
        assert 10 <= int(a) <= 99 and 0 <= int(b) <= 9 and int(answer) == expected
        assert int(answer) // 10 == int(a) // 10  # no carry, no borrow: the tens digit is copied
        assert cot.strip() == f"{a} {op} {b} = {expected}"


@pytest.mark.slow
def test_sft_command_trains_from_a_checkpoint_with_held_out_validation(tiny_data, tmp_path):
    """`sinkdlm sft` through the one trainer: synthetic data, prompt never masked, last examples held out."""
    import json
    import subprocess
    import sys
    from pathlib import Path

    from sinkdlm.training.trainer import train
    from tests.conftest import tiny_train_config

    cfg = tiny_train_config(tiny_data, tmp_path / "base", steps=1)
    cfg.model.block_size = 256  # room for the synthetic problems in a BPE trained on other words
    base = train(cfg)
    root = Path(__file__).resolve().parents[1]
    cmd = [sys.executable, "-m", "sinkdlm", "sft", "--config", str(root / "configs" / "sft_demo.yaml"),
           "--init-from", str(base["checkpoint"]), "--out", str(tmp_path / "sft"), "data.seq_len=256",
           "train.max_steps=2", "train.global_batch=4", "train.micro_batch=4", "train.progress=false",
           "train.val_every=1", "train.sink_monitor_every=1"]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=root, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "SYNTHETIC" in done.stderr
    records = [json.loads(x) for x in (tmp_path / "sft" / "metrics.jsonl").read_text().splitlines()]
    assert any("sink_monitor" in r for r in records) and records[-1]["val_loss"] > 0
