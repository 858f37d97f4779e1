"""The synthetic copy tasks (sinkdlm.data.synthetic): the rules by hand, determinism, and prepare."""

import json

import numpy as np
import pytest

from sinkdlm.data import synthetic
from sinkdlm.data.synthetic import NO_SOURCE, copy_sources, parse, sequences
from sinkdlm.errors import UserError

# 9 distinct characters, e most frequent, then a, then t: the bigram of a small text replaces the demo corpus
TEXT = "the eat tea ate at a tee. " * 40 + "hen seat\n" * 5


@pytest.fixture(autouse=True)
def small_corpus(monkeypatch):
    monkeypatch.setattr(synthetic, "demo_text", lambda: TEXT)
    synthetic.bigram_model.cache_clear()
    yield
    synthetic.bigram_model.cache_clear()


def test_backcopy_by_hand():
    # trigger 1, EOS 9: t copies t-2 after a trigger, unless t-2 is a trigger or across EOS / the window start
    tokens = np.array([[1, 5, 1, 5, 2, 1, 1, 3, 4, 1, 9, 1, 6]])
    expected = [NO_SOURCE, NO_SOURCE, NO_SOURCE, 1, NO_SOURCE, NO_SOURCE, 4, NO_SOURCE,
                NO_SOURCE, NO_SOURCE, NO_SOURCE, NO_SOURCE, NO_SOURCE]
    assert copy_sources(tokens, "bigram-backcopy", [1], eos=9).tolist() == [expected]
    hidden = np.ones_like(tokens, dtype=bool)
    hidden[0, 4] = False  # the source of position 6 is masked: no rule input
    assert copy_sources(tokens, "bigram-backcopy", [1], eos=9, visible=hidden)[0, 6] == NO_SOURCE
    hidden[0, 4], hidden[0, 5] = True, False  # the trigger itself is masked
    assert copy_sources(tokens, "bigram-backcopy", [1], eos=9, visible=hidden)[0, 6] == NO_SOURCE


def test_induction_by_hand():
    # trigger 1 at 0, 3 (one document) and 6 (the next): 1 and 4 copy each other; 7 has no other occurrence
    tokens = np.array([[1, 4, 2, 1, 4, 9, 1, 3]])
    assert copy_sources(tokens, "bigram-induction", [1], eos=9).tolist() == [
        [NO_SOURCE, 4, NO_SOURCE, NO_SOURCE, 1, NO_SOURCE, NO_SOURCE, NO_SOURCE]]
    visible = np.ones_like(tokens, dtype=bool)
    visible[0, 4] = False
    out = copy_sources(tokens, "bigram-induction", [1], eos=9, visible=visible)
    assert out[0, 1] == NO_SOURCE and out[0, 4] == 1  # 4's own value is hidden, its source is not
    # the nearest other occurrence wins, the earlier one on a tie
    tokens = np.array([[1, 5, 1, 5, 1, 5]])
    assert copy_sources(tokens, "bigram-induction", [1], eos=9)[0].tolist() == [NO_SOURCE, 3, NO_SOURCE, 1,
                                                                                    NO_SOURCE, 3]


@pytest.mark.parametrize("rule", synthetic.RULES)
def test_sequences_follow_their_rule_and_are_deterministic(rule):
    task = parse(f"synthetic:{rule}:seed=3,length=40,k=2,vocab=8,docs=30")
    x = sequences(task)
    assert x.shape == (30, 40) and x.min() >= 0 and x.max() < 8
    assert (sequences(task, 10, 20) == x[10:20]).all()  # a document depends only on (seed, index)
    assert not (sequences(parse(f"synthetic:{rule}:seed=4,length=40,k=2,vocab=8,docs=30")) == x).all()
    triggers = synthetic.trigger_ids(task).tolist()
    sources = copy_sources(x, rule, triggers, eos=8)
    copies = sources != NO_SOURCE
    assert copies.mean() > 0.05
    assert (np.take_along_axis(x, np.maximum(sources, 0), 1)[copies] == x[copies]).all()


def test_triggers_are_the_most_frequent_visible_symbols():
    names = synthetic.bigram_model(8)[0]
    task = parse("synthetic:bigram-backcopy:k=3,vocab=8")
    assert [names[i] for i in synthetic.trigger_ids(task)] == ["e", "t", "a"]  # space (most frequent) is not one
    assert names[0] == "<U+0020>"


def test_task_meta_reports_rule_statistics():
    meta = synthetic.task_meta("synthetic:bigram-backcopy:length=30,k=2,vocab=8,docs=200")
    assert meta["bayes_copy_accuracy"] == 1.0
    assert 0 < meta["copy_share"] < 1 and 0 < meta["bigram_entropy_nats"] < np.log(8)
    assert meta["triggers"] == synthetic.trigger_ids(parse(meta["spec"])).tolist() and meta["eos"] == 8


def test_bad_specs_are_one_line_errors():
    for spec, words in [("synthetic:nope", "does not exist"), ("synthetic:bigram-backcopy:k=x", "key=integer"),
                        ("synthetic:bigram-backcopy:colour=1", "key=integer"),
                        ("synthetic:bigram-backcopy:k=8,vocab=8", "below vocab")]:
        with pytest.raises(UserError, match=words):
            parse(spec)


def test_prepare_writes_symbol_tokens_without_bos(tmp_path):
    from sinkdlm.data.prepare import prepare
    from sinkdlm.data.shards import PackedData

    source = "synthetic:bigram-induction:length=15,k=2,vocab=8,docs=40"
    out = prepare(source, tmp_path / "syn", val_fraction=0.1, progress=False)
    data = PackedData(out)
    assert data.meta["task"]["rule"] == "bigram-induction" and data.meta["settings"]["tokenizer"] == "symbols"
    tokens = np.concatenate([np.asarray(data.tokens(s)[:]) for s in ("train", "val")])
    assert len(tokens) == 40 * 16 and data.eos_id == 8 and data.vocab_size == 10  # 8 symbols, EOS, unknown
    docs = tokens.reshape(40, 16)
    assert (docs[:, -1] == 8).all() and (docs[:, :-1] < 8).all()  # EOS ends each document; no BOS
    assert sorted(map(tuple, docs[:, :-1])) == sorted(map(tuple, sequences(parse(source))))
    assert json.loads((out / "meta.json").read_text())["task"]["bayes_copy_accuracy"] == 1.0
    with pytest.raises(UserError, match="own word-level tokenizer"):
        prepare(source, tmp_path / "other", "bpe:300", progress=False)
    with pytest.raises(UserError, match="only for --source synthetic"):
        prepare("demo", tmp_path / "other", "symbols", progress=False)
