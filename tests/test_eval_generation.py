"""eval-generation: each metric against a hand-computed case, the judge's NLLs against its own logits,
and the command end to end on a tiny checkpoint and a tiny random Llama judge (resume, batch size, refusals)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.cli import main
from sinkdlm.config import Config
from sinkdlm.eval import generation
from sinkdlm.model import DLM
from tests.conftest import tiny

transformers = pytest.importorskip("transformers")
pytest.importorskip("sacrebleu")

TEXT = ("the cat sat on the mat and the dog ran to the barn while seven kings sang of night and day "
        "under the stars of the old town by the sea ") * 30
BPE_VOCAB = 300
FLOAT_TOL = 1e-6  # float64 log-softmax of the same float32 logits, one row or a padded batch of rows
BATCH_TOL = 1e-4  # float32 logits of a row computed alone vs inside a right-padded batch


def bpe(texts: list[str]) -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    return tok


@pytest.fixture(scope="module")
def judge_folder(tmp_path_factory) -> Path:
    """A tiny random Llama with a byte-level BPE: any text tokenizes."""
    folder = tmp_path_factory.mktemp("judge")
    tok = transformers.PreTrainedTokenizerFast(tokenizer_object=bpe([TEXT]), bos_token="<|endoftext|>",
                                               eos_token="<|endoftext|>")
    config = transformers.LlamaConfig(hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                                      num_key_value_heads=1, intermediate_size=32, vocab_size=len(tok),
                                      max_position_embeddings=256, bos_token_id=0, eos_token_id=0)
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("dlm")
    tok = bpe([TEXT])
    tok.save(str(root / "tokenizer.json"))
    cfg = Config(model=tiny(vocab_size=tok.get_vocab_size(), sink_tokens=1))
    torch.manual_seed(0)
    return save_checkpoint(root / "run", 1, DLM(cfg.model).state_dict(), cfg, {"eos_id": 0},
                           tokenizer=root / "tokenizer.json")


# ---- metrics against hand-computed cases ------------------------------------------------------------


def test_distinct_n_by_hand():
    words = "a b a b".split()
    assert generation.distinct_n(words, 1) == 2 / 4  # {a, b} of 4
    assert generation.distinct_n(words, 2) == 2 / 3  # ab, ba, ab
    assert generation.distinct_n(words, 3) == 1.0  # aba, bab
    assert generation.distinct_n(words, 5) is None  # no 5-gram: left out of the mean, not counted as 0


def test_entropy_of_known_strings():
    assert generation.unigram_entropy(list("aaaa")) == 0.0
    assert generation.unigram_entropy(list("aabb")) == pytest.approx(math.log(2), abs=1e-12)
    assert generation.unigram_entropy(list("abcd")) == pytest.approx(math.log(4), abs=1e-12)
    p = np.array([3, 1]) / 4  # "aaab"
    assert generation.unigram_entropy(list("aaab")) == pytest.approx(float(-(p * np.log(p)).sum()), abs=1e-12)
    assert generation.unigram_entropy([]) is None


def test_self_bleu_identical_vs_disjoint():
    same = ["the cat sat on the mat today"] * 3
    assert generation.self_bleu(same) == pytest.approx([100.0] * 3)
    disjoint = ["alpha beta gamma delta", "one two three four", "red green blue yellow"]
    assert generation.self_bleu(disjoint) == [0.0] * 3


def test_gen_ppl_pools_tokens_and_its_interval_brackets_it():
    nlls = [np.array([1.0, 1.0]), np.array([3.0]), np.array([])]  # the empty sample is left out
    summary = generation.gen_ppl(nlls)
    assert summary["mean"] == pytest.approx(math.exp(5 / 3)) and summary["n"] == 2
    assert summary["lo"] <= summary["mean"] <= summary["hi"]
    flat = generation.gen_ppl([np.array([2.0, 2.0])] * 5)  # every resample is the same: no spread
    assert flat["lo"] == pytest.approx(math.exp(2)) and flat["hi"] == pytest.approx(math.exp(2))


def test_mean_interval_by_hand():
    m = generation.mean_interval([1.0, 2.0, 3.0, None])
    half = 4.302653 * 1.0 / math.sqrt(3)  # t(0.975, 2) x sd / sqrt(n)
    assert m["mean"] == 2.0 and m["n"] == 3
    assert m["lo"] == pytest.approx(2 - half, abs=1e-5) and m["hi"] == pytest.approx(2 + half, abs=1e-5)
    share = generation.mean_interval([1.0, 1.0, 0.5], 0.0, 1.0)  # t interval reaches past 1: cut at the range
    assert share["hi"] == 1.0 and share["lo"] < share["mean"] < 1.0


def test_nll_histogram_bins():
    hist = generation.nll_histogram([np.array([0.1, 0.6, 0.7]), np.array([100.0])])
    assert hist["counts"][0] == 1 and hist["counts"][1] == 2 and hist["counts"][-1] == 1
    assert sum(hist["counts"]) == 4


# ---- the judge -------------------------------------------------------------------------------------


def test_judge_nlls_are_its_own_log_probabilities_whatever_the_batch(judge_folder):
    judge = generation.load_judge(str(judge_folder))
    texts = ["the cat sat on the mat", "seven kings", "the dog ran to the barn under the stars"]
    nlls, feats = generation.judge_scores(judge, texts, batch_size=3, features=True)
    for text, got in zip(texts, nlls):
        ids = torch.tensor([[judge.start_id] + judge.tokenizer(text, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = judge.model(input_ids=ids).logits[0].double().log_softmax(-1)
        expected = -logp[:-1].gather(-1, ids[0, 1:, None])[:, 0].numpy()
        np.testing.assert_allclose(got, expected, rtol=0, atol=BATCH_TOL)
    one_by_one, feats1 = generation.judge_scores(judge, texts, batch_size=1, features=True)
    for a, b in zip(nlls, one_by_one):
        np.testing.assert_allclose(a, b, rtol=0, atol=BATCH_TOL)
    np.testing.assert_allclose(feats, feats1, rtol=0, atol=BATCH_TOL)
    ppl = generation.gen_ppl(nlls)["mean"]
    assert ppl == pytest.approx(math.exp(np.concatenate(nlls).mean()), rel=FLOAT_TOL)


def test_mauve_is_one_for_the_same_features_and_low_for_far_ones():
    pytest.importorskip("mauve")
    rng = np.random.default_rng(0)
    p = rng.normal(size=(40, 8))
    assert generation.mauve_score(p, p.copy()) == pytest.approx(1.0, abs=1e-6)
    assert generation.mauve_score(p, rng.normal(size=(40, 8)) + 50.0) < 0.1


# ---- the command -----------------------------------------------------------------------------------


def run(tmp_path, checkpoint, judge_folder, out, *extra):
    text = tmp_path / "held_out.txt"
    text.write_text(TEXT)
    return main(["eval-generation", "--checkpoint", str(checkpoint), "--out", str(out), "--text", str(text),
                 "--judge", str(judge_folder), "--gen-length", "8", "--steps", "4", "--temperature", "1.0",
                 "--no-progress", "--mauve", "off", *extra])


def samples(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / generation.SAMPLES_FILE).read_text().splitlines()]


def test_command_writes_results_resumes_and_is_batch_invariant(tmp_path, checkpoint, judge_folder, capsys):
    out = tmp_path / "gen"
    assert run(tmp_path, checkpoint, judge_folder, out, "--limit", "3", "--batch-size", "2") == 0
    first = samples(out)
    assert run(tmp_path, checkpoint, judge_folder, out, "--limit", "5", "--batch-size", "2") == 0  # continues
    resumed = samples(out)
    assert resumed[:3] == first and len(resumed) == 5
    fresh = tmp_path / "fresh"
    assert run(tmp_path, checkpoint, judge_folder, fresh, "--limit", "5", "--batch-size", "5") == 0
    assert samples(fresh) == resumed  # neither the batch size nor a resume changes a sample
    result = json.loads((out / generation.RESULTS_JSON).read_text())
    assert result["samples"] == 5 and result["mauve"] is None
    assert result["metrics"]["self_bleu"]["n"] == 5
    held_out = result["reference"]["metrics"]  # the windows the samples stand beside, scored the same way
    assert held_out["tokens"]["mean"] == 8 and held_out["gen_ppl"]["n"] == 5
    for name in (generation.RESULTS_MD, generation.FIGURE, generation.HISTOGRAM):
        assert (out / name).is_file()
    assert "Gen-PPL" in capsys.readouterr().out


def test_command_refuses_other_settings_in_the_same_folder(tmp_path, checkpoint, judge_folder, capsys):
    out = tmp_path / "gen"
    assert run(tmp_path, checkpoint, judge_folder, out, "--limit", "2") == 0
    capsys.readouterr()
    assert run(tmp_path, checkpoint, judge_folder, out, "--limit", "2", "--seed", "1") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "sampling differ" in err[0] and "--overwrite" in err[0]
    assert run(tmp_path, checkpoint, judge_folder, out, "--limit", "2", "--seed", "1", "--overwrite") == 0


def test_too_few_windows_is_one_line(tmp_path, checkpoint, judge_folder, capsys):
    assert run(tmp_path, checkpoint, judge_folder, tmp_path / "gen", "--limit", "100000") == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "fewer than --limit 100000" in err[0]
    assert not (tmp_path / "gen").exists()  # refused before writing


def test_compare_tables_and_figure(tmp_path, checkpoint, judge_folder):
    a, b = tmp_path / "a", tmp_path / "b"
    assert run(tmp_path, checkpoint, judge_folder, a, "--limit", "2") == 0
    assert run(tmp_path, checkpoint, judge_folder, b, "--limit", "2", "--temperature", "0.5") == 0
    assert main(["eval-generation", "--compare", str(a), str(b), "--labels", "T1,T0.5", "--out",
                 str(tmp_path / "cmp")]) == 0
    table = (tmp_path / "cmp" / generation.COMPARE_MD).read_text()
    assert "| T1 |" in table and "| T0.5 |" in table and (tmp_path / "cmp" / generation.FIGURE).is_file()


def test_prompted_completions_continue_their_window(tmp_path, checkpoint, judge_folder):
    """--prompt-tokens K: the prompt is the window's first K tokens and the reference the rest."""
    out = tmp_path / "gen"
    assert run(tmp_path, checkpoint, judge_folder, out, "--limit", "2", "--prompt-tokens", "4") == 0
    tok = Tokenizer.from_file(str(checkpoint / "tokenizer.json"))
    ids = tok.encode(TEXT).ids
    for i, row in enumerate(samples(out)):
        window = ids[i * 12:(i + 1) * 12]  # 4 prompt + 8 generated tokens per window
        assert row["prompt"] == tok.decode(window[:4]) and row["reference"] == tok.decode(window[4:])
        assert len(row["tokens"]) <= 8  # cut at an EOS, if one is drawn


def test_window_flags_reach_the_sampler(tmp_path, checkpoint, judge_folder):
    """--window/--window-anchors are the sampler's: the samples are those sinkdlm.sample.generate draws
    with the same windowed SampleConfig, and the window is part of the folder's settings."""
    from sinkdlm.sample import SampleConfig, generate, load_for_sampling

    args = ("--limit", "3", "--gen-length", "12", "--block-length", "4", "--steps", "6")
    out = tmp_path / "win"
    assert run(tmp_path, checkpoint, judge_folder, out, *args, "--window", "2", "--window-anchors", "1") == 0
    model, _, eos = load_for_sampling(checkpoint, "cpu")
    cfg = SampleConfig(gen_length=12, block_length=4, steps=6, temperature=1.0, window=2, window_anchors=1)
    direct = generate(model, [[eos]] * 3, cfg, model.mask_id, eos, indices=range(3))
    assert [r["tokens"] for r in samples(out)] == [list(t) for t in direct]
    settings = json.loads((out / generation.SETTINGS_FILE).read_text())["sampling"]
    assert settings["window"] == 2 and settings["window_anchors"] == 1
    full = generate(model, [[eos]] * 3, SampleConfig(gen_length=12, block_length=4, steps=6, temperature=1.0),
                    model.mask_id, eos, indices=range(3))
    assert [list(t) for t in full] != [list(t) for t in direct]  # the window changed what was drawn


# ---- the synthetic copy task: copy-rule compliance of the samples -----------------------------------


def test_rule_compliance_by_hand():
    from sinkdlm.data.synthetic import CopyRule

    back = CopyRule("bigram-backcopy", [1], 9)
    # trigger 1 at positions 1 and 4: position 2 must copy position 0 (5 = 5), position 5 position 3 (3 != 7)
    assert generation.rule_compliance([5, 1, 5, 7, 1, 3], 0, back) == 0.5
    assert generation.rule_compliance([5, 1, 5, 7, 1, 3], 3, back) == 0.0  # only the completion's copy position
    assert generation.rule_compliance([5, 1, 5, 7, 1, 3], 6, back) is None  # none in the completion
    induction = CopyRule("bigram-induction", [1], 9)
    # trigger 1 at 1 and 5: each follower must repeat the other occurrence's follower
    assert generation.rule_compliance([4, 1, 6, 2, 4, 1, 6], 0, induction) == 1.0
    assert generation.rule_compliance([4, 1, 6, 2, 4, 1, 8], 0, induction) == 0.0
    # an EOS ends the document: the occurrence before it is not a source for the one after it
    assert generation.rule_compliance([4, 1, 6, 9, 4, 1, 8], 4, induction) is None


def test_rule_compliance_is_reported_on_a_synthetic_checkpoint(tmp_path, judge_folder, monkeypatch):
    """On a checkpoint trained on a synthetic copy task, eval-generation reports the samples' compliance
    with the rule, and the held-out text (which the rule generated) complies exactly."""
    from sinkdlm.data.shards import PackedData
    from sinkdlm.data.synthetic import CopyRule
    from tests.conftest import small_synthetic_corpus

    def synthetic_task_of(folder: Path) -> CopyRule:
        return CopyRule.from_meta(PackedData(folder).meta)

    data = small_synthetic_corpus(tmp_path, monkeypatch)
    vocab = json.loads((data / "meta.json").read_text())["vocab_size"]
    cfg = Config(model=tiny(vocab_size=vocab, sink_tokens=1))
    cfg.data.path = str(data)
    torch.manual_seed(0)
    ckpt = save_checkpoint(tmp_path / "run", 1, DLM(cfg.model).state_dict(), cfg,
                           {"eos_id": json.loads((data / "meta.json").read_text())["eos_id"]},
                           tokenizer=data / "tokenizer.json")
    out = tmp_path / "gen"
    assert main(["eval-generation", "--checkpoint", str(ckpt), "--out", str(out), "--judge", str(judge_folder),
                 "--gen-length", "16", "--steps", "8", "--prompt-tokens", "16", "--limit", "6", "--no-progress",
                 "--mauve", "off", "--temperature", "1.0", "--min-length", "16"]) == 0
    result = json.loads((out / generation.RESULTS_JSON).read_text())
    assert result["task"]["rule"] == "bigram-backcopy"
    reference = result["reference"]["metrics"]["rule_compliance"]
    assert reference["n"] > 0 and reference["mean"] == 1.0
    task = synthetic_task_of(data)
    val = PackedData(data).tokens("val")
    by_hand = [generation.rule_compliance([int(t) for t in val[i * 32:i * 32 + 16]] + row["tokens"], 16, task)
               for i, row in enumerate(samples(out))]
    kept = [v for v in by_hand if v is not None]
    assert kept and result["metrics"]["rule_compliance"]["n"] == len(kept)
    assert result["metrics"]["rule_compliance"]["mean"] == pytest.approx(sum(kept) / len(kept), abs=1e-12)
    assert "copy-rule compliance" in (out / generation.RESULTS_MD).read_text()
