"""`sinkdlm serve` through the official `openai` client: one server per module, in a subprocess on a
free loopback port, serving a tiny sharpened checkpoint (weights x3: peaked predictions, so float
noise of another batch shape does not flip an argmax). Every answer is checked against
`sample.generate` run in this process on the same weights: the reference."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.config import Config
from sinkdlm.model import DLM
from sinkdlm.sample import SampleConfig, generate
from sinkdlm.serve.schema import CHOICE_SPACE
from tests.conftest import tiny

openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

pytestmark = pytest.mark.slow
ROOT = Path(__file__).parents[1]
TEXT = ["The cat sat on the mat.", "Sarah ran home fast.", "Question: Which is a planet? Answer: Mars"] * 4
KEY = "test-key"
EOS = 0
TEMPLATE = "{% for m in messages %}<{{ m.role }}>{{ m.content }}\n{% endfor %}{% if add_generation_prompt %}<assistant>{% endif %}"
CONTEXT = 256  # room for the offline gsm8k task's questions
SETTINGS = dict(max_tokens=8, extra_body={"steps": 8, "block_length": 4})  # two blocks


def make_checkpoint(root: Path) -> Path:
    root.mkdir(parents=True)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    tok.save(str(root / "tokenizer.json"))
    cfg = Config(model=tiny(vocab_size=tok.get_vocab_size(), sink_tokens=1, block_size=CONTEXT))
    torch.manual_seed(0)
    model = DLM(cfg.model)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return save_checkpoint(root / "run", 1, model.state_dict(), cfg, {"eos_id": EOS}, tokenizer=root / "tokenizer.json")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(checkpoint: Path, *extra: str) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "sinkdlm", "serve", "--checkpoint", str(checkpoint), "--port", "0",
                             "--threads", "1", *extra], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stdout.readline()
    match = re.search(r"at (http://\S+/v1)", line)
    if not match:
        proc.kill()
        raise AssertionError(f"the server did not start: {line!r} {proc.stderr.read()}")
    return proc, match.group(1)


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("serve")
    checkpoint = make_checkpoint(root / "ck")
    (root / "chat.jinja").write_text(TEMPLATE)
    proc, url = start_server(checkpoint, "--api-key", KEY, "--chat-template", str(root / "chat.jinja"),
                             "--batch-window-ms", "50", "--max-batch", "16")
    yield {"url": url, "proc": proc, "checkpoint": checkpoint}
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server["url"], api_key=KEY, max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def reference(server):
    """The served checkpoint in this process: what generate gives for a request's rows."""
    from sinkdlm.sample import load_for_sampling

    model, tok, eos = load_for_sampling(server["checkpoint"])

    def complete(prompt: str, seed: int, n: int = 1, **settings) -> list[str]:
        ids = tok.encode(prompt).ids
        cfg = SampleConfig(**{"gen_length": 8, "steps": 8, "block_length": 4, **settings})
        out = generate(model, [ids] * n, cfg, model.mask_id, eos, indices=[seed * CHOICE_SPACE + k for k in range(n)])
        return [tok.decode(o[:o.index(eos)] if eos in o else o, skip_special_tokens=True) for o in out]

    return complete


def post(server, path: str, body: bytes | dict, key: str | None = KEY) -> tuple[int, dict]:
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
    request = urllib.request.Request(server["url"] + path, data=data, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def test_completion_is_the_samplers(client, reference):
    out = client.completions.create(model="run", prompt="The cat", seed=3, temperature=0.8, **SETTINGS)
    assert out.object == "text_completion" and len(out.choices) == 1
    assert out.choices[0].text == reference("The cat", 3, temperature=0.8)[0]
    assert out.choices[0].finish_reason in ("stop", "length") and out.usage.prompt_tokens > 0


def test_seeds_reproduce_and_n_gives_distinct_rows(client, reference):
    ask = dict(model="run", prompt="Sarah", temperature=1.0, n=3, **SETTINGS)
    a = client.completions.create(seed=5, **ask)
    assert [c.text for c in a.choices] == [c.text for c in client.completions.create(seed=5, **ask).choices]
    assert [c.text for c in a.choices] == reference("Sarah", 5, n=3, temperature=1.0)
    assert [c.text for c in client.completions.create(seed=6, **ask).choices] == reference("Sarah", 6, n=3,
                                                                                           temperature=1.0)


def test_stream_sends_blocks_that_add_up_to_the_completion(client, server):
    ask = dict(model="run", prompt="Question:", seed=1, temperature=0.5, **SETTINGS)
    whole = client.completions.create(**ask).choices[0].text
    chunks = list(client.completions.create(stream=True, **ask))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    assert len(chunks) <= 3  # one per committed block (2), and the finish


def test_step_stream_shows_the_canvas_with_masks(server):
    body = {"model": "run", "prompt": "The", "seed": 0, "max_tokens": 8, "steps": 8, "block_length": 4,
            "stream": True, "stream_steps": True}
    data = json.dumps(body).encode()
    request = urllib.request.Request(server["url"] + "/completions", data=data,
                                     headers={"Content-Type": "application/json", "Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=60) as r:
        events = [line[6:] for line in r.read().decode().splitlines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    canvases = [json.loads(e)["choices"][0] for e in events[:-1] if "canvas" in json.loads(e)["choices"][0]]
    assert [c["step"] for c in canvases] == list(range(8))
    masks = [c["canvas"].count("<|sinkdlm_mask|>") for c in canvases]
    assert masks == list(range(7, -1, -1))  # one token revealed per step


def test_chat_uses_the_template(client, reference):
    out = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}], seed=2,
                                         **SETTINGS)
    assert out.choices[0].message.role == "assistant"
    assert out.choices[0].message.content == reference("<user>Hi\n<assistant>", 2)[0]
    streamed = client.chat.completions.create(model="run", messages=[{"role": "user", "content": "Hi"}], seed=2,
                                              stream=True, **SETTINGS)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == out.choices[0].message.content


def test_concurrent_requests_equal_sequential_ones(client, server):
    prompts = [("The cat", 1), ("Sarah", 2), ("Question:", 3), ("mat", 4)] * 2
    ask = dict(model="run", temperature=0.9, **SETTINGS)
    alone = [client.completions.create(prompt=p, seed=s, **ask).choices[0].text for p, s in prompts]
    before = health(server)
    with ThreadPoolExecutor(8) as pool:
        together = list(pool.map(lambda ps: client.completions.create(prompt=ps[0], seed=ps[1], **ask)
                                 .choices[0].text, prompts))
    assert together == alone
    after = health(server)
    assert after["rows"] - before["rows"] == 8 and after["batches"] - before["batches"] < 8  # some were batched


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list()] == ["run"]
    request = urllib.request.Request(server["url"].removesuffix("/v1") + "/health",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        assert json.loads(r.read())["status"] == "ok"


@pytest.mark.parametrize("body, status, param", [
    (b"{not json", 400, None),
    ({"model": "run", "prompt": "x", "steps_typo": 3}, 400, "steps_typo"),
    ({"model": "run", "prompt": "x", "max_tokens": -1}, 400, "max_tokens"),
    ({"model": "run", "prompt": "x", "n": 100000}, 400, "n"),
    ({"model": "run", "prompt": "word " * CONTEXT, "max_tokens": 8}, 400, "prompt"),
    ({"model": "run", "prompt": "x", "max_tokens": 8, "block_length": 4, "steps": 3}, 400, "steps"),
    ({"model": "run", "prompt": "x", "remasking": "sideways"}, 400, "remasking"),
    ({"model": "run", "prompt": "x", "temperature": "hot"}, 400, "temperature"),
    ({"model": "run", "prompt": "x", "logprobs": 5}, 400, "logprobs"),
    ({"model": "other", "prompt": "x"}, 404, "model"),
    ({"model": "run", "prompt": [1, 2, 10**6]}, 400, "prompt"),
], ids=["malformed json", "unknown field", "negative max_tokens", "absurd n", "prompt too long", "bad steps",
        "bad remasking", "bad type", "logprobs", "other model", "token id out of range"])
def test_bad_input_is_an_openai_error_and_the_server_stays_up(server, client, body, status, param):
    code, answer = post(server, "/completions", body)
    assert code == status and set(answer["error"]) == {"message", "type", "param", "code"}
    assert answer["error"]["param"] == param and answer["error"]["message"]
    assert client.completions.create(model="run", prompt="x", seed=0, **SETTINGS).choices


def test_a_body_too_large_is_refused_before_it_is_read(server):
    host, port = re.match(r"http://([^:]+):(\d+)", server["url"]).groups()
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: 1000000000\r\n\r\n{")
        answer = b""
        while b"}}" not in answer and (chunk := sock.recv(65536)):
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413") and b"body_too_large" in answer


def test_the_api_key_is_required(server):
    code, answer = post(server, "/completions", {"model": "run", "prompt": "x"}, key=None)
    assert code == 401 and answer["error"]["code"] == "invalid_api_key"
    assert post(server, "/completions", {"model": "run", "prompt": "x"}, key="wrong")[0] == 401


def test_a_client_that_leaves_mid_stream_cancels_its_work_and_others_go_on(server, client):
    """A long request (16 guided rows x 128 steps, seconds here) is read until its first canvas,
    then its connection closed: the server stops its batch (/health counts it) and answers the next
    request."""
    host, port = re.match(r"http://([^:]+):(\d+)", server["url"]).groups()
    body = json.dumps({"model": "run", "prompt": "The", "max_tokens": 128, "steps": 128, "block_length": 8, "n": 16,
                       "guidance": 1.0, "stream": True, "stream_steps": True, "seed": 9}).encode()
    before = health(server)["cancelled_batches"]
    with socket.create_connection((host, int(port))) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Authorization: Bearer " + KEY.encode() + b"\r\nContent-Length: " + str(len(body)).encode()
                     + b"\r\n\r\n" + body)
        received = b""
        while b"canvas" not in received:
            received += sock.recv(65536)
    assert client.completions.create(model="run", prompt="x", seed=0, **SETTINGS).choices
    assert health(server)["cancelled_batches"] == before + 1


def health(server) -> dict:
    request = urllib.request.Request(server["url"].removesuffix("/v1") + "/health",
                                     headers={"Authorization": f"Bearer {KEY}"})
    with urllib.request.urlopen(request, timeout=10) as r:
        return json.loads(r.read())


def rss_mb(pid: int) -> float:
    status = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1)) / 1024


LOAD_REQUESTS, LOAD_THREADS, LOAD_LIMIT_S, RSS_GROWTH_MB = 200, 16, 60, 30


def test_load_every_request_answered_and_memory_back(server, client):
    """200 requests from 16 threads within a minute, every one answered; the server's memory after
    them within RSS_GROWTH_MB of its level after a warm-up of the same load's shape."""
    def one(i: int) -> str:
        return client.completions.create(model="run", prompt=TEXT[i % len(TEXT)][:12], seed=i, **SETTINGS) \
            .choices[0].finish_reason

    with ThreadPoolExecutor(LOAD_THREADS) as pool:
        list(pool.map(one, range(LOAD_THREADS * 2)))
        before = rss_mb(server["proc"].pid)
        start = time.monotonic()
        answers = list(pool.map(one, range(LOAD_REQUESTS)))
        took = time.monotonic() - start
    assert len(answers) == LOAD_REQUESTS and set(answers) <= {"stop", "length"}
    assert took < LOAD_LIMIT_S, f"{LOAD_REQUESTS} requests took {took:.1f} s"
    assert rss_mb(server["proc"].pid) - before < RSS_GROWTH_MB
    assert server["proc"].poll() is None


PROBLEMS = [{"question": "Tom has 3 apples and buys 4 more. How many apples does he have?",
             "answer": "3 + 4 = <<3+4=7>>7\n#### 7"},
            {"question": "A box holds 12 eggs. How many eggs are in 2 boxes?", "answer": "12 * 2 = 24\n#### 24"},
            {"question": "Sam had 10 pens and lost 3. How many are left?", "answer": "10 - 3 = 7\n#### 7"}]


def test_lm_evals_local_completions_gives_sinkdlm_evals_answers(server, tmp_path, monkeypatch, capsys):
    """The offline gsm8k task (on a cached copy of three problems) through lm-eval's
    `local-completions` model against the server, and through `sinkdlm eval --sampling` with the
    same settings (8 tokens in 8 steps, greedy): the same answer for every problem."""
    lm_eval = pytest.importorskip("lm_eval")
    import lm_eval.models.openai_completions  # noqa: F401 - registers local-completions (a registry that
    from lm_eval.tasks import TaskManager  # already holds sinkdlm's model is not filled lazily)

    from sinkdlm.cli import main
    from sinkdlm.eval import task_data

    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path))
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    (tmp_path / "gsm8k_test.jsonl").write_text("".join(json.dumps(p) + "\n" for p in PROBLEMS))
    task_data.materialise([task_data.GSM8K], tmp_path)
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(server["checkpoint"]), "--tasks", "gsm8k", "--num-fewshot", "0",
                 "--sampling", "gen_length=8,steps=8", "--log-samples", "--output", str(out)]) == 0
    capsys.readouterr()
    ours = {s["doc_id"]: s["resps"][0][0] for line in (out / "samples_gsm8k.jsonl").read_text().splitlines()
            for s in [json.loads(line)]}
    results = lm_eval.simple_evaluate(
        model="local-completions", tasks=["gsm8k"], num_fewshot=0, log_samples=True,
        model_args=f"model=run,base_url={server['url']}/completions,tokenizer_backend=none,"
                   f"tokenized_requests=False,num_concurrent=1,max_retries=1,max_gen_toks=8",
        task_manager=TaskManager(include_path=str(task_data.tasks_dir(tmp_path)), include_defaults=False))
    theirs = {s["doc_id"]: s["resps"][0][0] for s in results["samples"]["gsm8k"]}
    assert len(ours) == len(PROBLEMS) and theirs == ours
    assert all(ours.values())  # text to compare, not empty answers
