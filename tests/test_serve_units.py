"""The server's parts without a server: request validation, streamed block text, and the batcher's
batching and cancelling, against `sample.generate` on a tiny sharpened model (weights x3, so float
noise of another batch shape does not flip an argmax)."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from tokenizers import Tokenizer, decoders, models

from sinkdlm.model import DLM
from sinkdlm.sample import SampleConfig, generate
from sinkdlm.serve.batcher import Batcher, Job
from sinkdlm.serve.schema import CHOICE_SPACE, COMPLETION_FIELDS, Limits, RequestError, check_fields, generation
from sinkdlm.serve.text import BlockStream, Decoder, cut_at_stop
from tests.conftest import tiny

VOCAB = 50
EOS = 0
WORDS = ["<eos>"] + [f"w{i} " for i in range(1, VOCAB)]
LIMITS = Limits("m", block_size=64, vocab_size=VOCAB, max_rows=8)
DEFAULTS = SampleConfig(gen_length=8, steps=8, block_length=4)
WAIT_S = 30


@pytest.fixture(scope="module")
def model() -> DLM:
    torch.manual_seed(0)
    m = DLM(tiny(sink_tokens=1, vocab_size=VOCAB)).eval()
    with torch.no_grad():
        for p in m.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return m


@pytest.fixture(scope="module")
def decoder(model) -> Decoder:
    return Decoder(word_tokenizer(WORDS), EOS, model.mask_id)


def word_tokenizer(words: list[str]) -> Tokenizer:
    """One token per word, decoded by concatenation."""
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=words[0]))
    tok.decoder = decoders.Fuse()
    return tok


def request(prompt: list[int], seed: int, n: int = 1, **body) -> object:
    return generation({"model": "m", "seed": seed, "n": n, **body}, [prompt], "prompt", DEFAULTS, LIMITS)


def reference(model, gen) -> list[list[int]]:
    return generate(model, gen.rows, gen.sampling, model.mask_id, EOS, indices=gen.indices)


class Collector:
    """A job's events; with `leave`, the job is cancelled at its first step event."""

    def __init__(self, batcher: Batcher | None = None, leave: bool = False) -> None:
        self.events, self.done, self.batcher, self.leave = [], threading.Event(), batcher, leave
        self.job = None

    def __call__(self, event) -> None:
        self.events.append(event)
        if event[0] == "step" and self.leave:
            self.batcher.cancel(self.job)
            self.done.set()
        if event[0] in ("done", "error"):
            self.done.set()


def run_jobs(batcher: Batcher, gens, leave=()) -> list[Collector]:
    """Submit every generation while the batcher's window is open, so that they share a batch."""
    collectors = []
    for i, gen in enumerate(gens):
        c = Collector(batcher, leave=i in leave)
        c.job = Job(gen, c)
        collectors.append(c)
    for c in collectors:
        batcher.submit(c.job)
    for c in collectors:
        assert c.done.wait(WAIT_S)
    return collectors


def final_text(c: Collector) -> list[str]:
    kind, payload = c.events[-1]
    assert kind == "done", c.events[-1]
    return [choice.text for choice in payload["choices"]]


def test_batched_requests_equal_generate_alone_and_share_one_batch(model, decoder):
    gens = [request([3, 4, 5], 1, temperature=0.9), request([7], 2, n=2, temperature=0.9),
            request([9, 9], 3, temperature=0.9, remasking="random")]
    batcher = Batcher(model, decoder, window_s=0.2, max_rows=8)
    try:
        got = [final_text(c) for c in run_jobs(batcher, gens)]
    finally:
        batcher.close()
    want = [[decoder.choice(ids, 8, []).text for ids in reference(model, g)] for g in gens]
    assert got == want
    assert batcher.counts["batches"] == 2 and batcher.counts["rows"] == 4  # random remasking: its own batch


def test_max_rows_splits_batches(model, decoder):
    gens = [request([3, 4], s, temperature=0.9) for s in range(3)]
    batcher = Batcher(model, decoder, window_s=0.2, max_rows=2)
    try:
        got = [final_text(c) for c in run_jobs(batcher, gens)]
    finally:
        batcher.close()
    assert got == [[decoder.choice(reference(model, g)[0], 8, []).text] for g in gens]
    assert batcher.counts["batches"] == 2


def test_a_batch_whose_requests_all_left_stops_and_one_with_others_goes_on(model, decoder):
    batcher = Batcher(model, decoder, window_s=0.2, max_rows=8)
    try:
        alone = run_jobs(batcher, [request([3], 1, temperature=0.9, stream=True)], leave={0})
        deadline = time.monotonic() + WAIT_S
        while batcher.counts["cancelled_batches"] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert batcher.counts["cancelled_batches"] == 1
        assert all(kind == "step" for kind, _ in alone[0].events)
        gens = [request([3], 1, temperature=0.9, stream=True), request([5, 6], 2, temperature=0.9)]
        leaver, stayer = run_jobs(batcher, gens, leave={0})
        assert stayer.done.wait(WAIT_S) and final_text(stayer) == [decoder.choice(reference(model, gens[1])[0], 8,
                                                                                  []).text]
        assert batcher.counts["cancelled_batches"] == 1 and all(kind == "step" for kind, _ in leaver.events)
        assert batcher.counts["batches"] == 2  # the leaver and the stayer ran together
    finally:
        batcher.close()


def test_a_leavers_rows_stop_being_computed_while_its_batch_goes_on(model, decoder):
    """The leaver (n=2) cancels at its first step event: every later forward takes the stayer's row only."""
    gens = [request([3], 1, n=2, temperature=0.9, stream=True, stream_steps=True), request([5, 6], 2, temperature=0.9)]
    batcher = Batcher(model, decoder, window_s=0.2, max_rows=8)
    rows = []
    hook = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        leaver, stayer = run_jobs(batcher, gens, leave={0})
        assert stayer.done.wait(WAIT_S)
    finally:
        hook.remove()
        batcher.close()
    assert rows == [3] + [1] * (DEFAULTS.steps - 1)
    assert final_text(stayer) == [decoder.choice(reference(model, gens[1])[0], 8, []).text]
    assert [kind for kind, _ in leaver.events] == ["step"] and batcher.counts["cancelled_batches"] == 0


@pytest.mark.parametrize("window", [{}, {"window": 4}], ids=["full", "windowed"])
def test_streamed_blocks_add_up_to_the_final_text(model, decoder, window):
    gen = request([3, 4], 4, temperature=1.0, stream=True, stream_steps=True, max_tokens=16, steps=16, block_length=4,
                  **window)
    batcher = Batcher(model, decoder, window_s=0.0, max_rows=8)
    try:
        (c,) = run_jobs(batcher, [gen])
    finally:
        batcher.close()
    steps = [p for kind, p in c.events if kind == "step"]
    streamed = "".join(p["text"].get(0, "") for p in steps) + c.events[-1][1]["rest"][0]
    assert streamed == final_text(c)[0]
    assert [p["step"] for p in steps] == list(range(16))
    assert [p["canvas"][0].count(decoder.mask_text) for p in steps] == list(range(15, -1, -1))
    assert final_text(c) == [decoder.choice(reference(model, gen)[0], 16, []).text]


def test_block_stream_holds_back_a_possible_stop_string_and_cuts_at_it():
    decoder = Decoder(word_tokenizer(["<eos>", "ab", "cd", "ef", "[M]"]), EOS, mask_id=4)
    stream = BlockStream(decoder, block=1, stop=["cde"])
    region = torch.tensor([1, 2, 4, 4])
    sent = stream.update(region)
    assert sent == "ab"  # "cd" may begin the stop string "cde"
    assert stream.update(torch.tensor([1, 2, 3, 4])) == "" and stream.done  # "abcdef" -> cut at "cde"
    assert sent + stream.finish(cut_at_stop("abcdef", ["cde"])[0]) == "ab"


def test_choice_finish_reasons(decoder):
    assert decoder.choice([5, 6, EOS, EOS], 4, []).finish_reason == "stop"
    assert decoder.choice([5, 6, 7, 8], 4, []).finish_reason == "length"
    choice = decoder.choice([5, 6, 7, 8], 4, ["w6"])
    assert (choice.text, choice.finish_reason) == ("w5 ", "stop")


@pytest.mark.parametrize("body, param", [
    ({"stepz": 3}, "stepz"), ({"steps": 0}, "steps"), ({"steps": 2.5}, "steps"), ({"n": 0}, "n"), ({"n": 9}, "n"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_tokens": 64}, "max_tokens"), ({"threshold": 2}, "threshold"),
    ({"cache": "all"}, "cache"), ({"top_p": 0}, "top_p"), ({"stop": [""]}, "stop"), ({"seed": "x"}, "seed"),
    ({"padding": "left"}, "padding"), ({"batch_ranking": "flattened_batch"}, "batch_ranking"),
    ({"presence_penalty": 1}, "presence_penalty"), ({"stream": "yes"}, "stream"),
], ids=str)
def test_bad_fields_are_refused_by_name(body, param):
    with pytest.raises(RequestError) as e:
        check_fields({"model": "m", **body}, COMPLETION_FIELDS)
        generation({"model": "m", **body}, [[1, 2]], "prompt", DEFAULTS, LIMITS)
    assert e.value.param == param and e.value.status == 400, e.value.message


def test_max_tokens_keeps_the_servers_tokens_per_step():
    half = SampleConfig(gen_length=32, steps=16, block_length=None)
    gen = generation({"model": "m", "max_tokens": 8}, [[1]], "prompt", half, LIMITS)
    assert (gen.sampling.gen_length, gen.sampling.steps) == (8, 4)
    gen = generation({"model": "m", "max_tokens": 12, "block_length": 4}, [[1]], "prompt", half, LIMITS)
    assert (gen.sampling.gen_length, gen.sampling.steps, gen.sampling.n_blocks) == (12, 6, 3)


def test_noise_indices_are_keyed_by_seed_and_choice():
    gen = generation({"model": "m", "seed": 7, "n": 2, "prompt": "x"}, [[1], [2]], "prompt", DEFAULTS, LIMITS)
    assert gen.indices == [7 * CHOICE_SPACE + k for k in range(4)] and gen.rows == [[1], [1], [2], [2]]
    assert gen.sampling.seed == 0


def test_a_port_in_use_is_one_line_before_the_model_loads():
    pytest.importorskip("fastapi")
    from sinkdlm.errors import UserError
    from sinkdlm.serve.app import bind

    first = bind("127.0.0.1", 0)
    try:
        with pytest.raises(UserError, match=r"cannot listen on 127\.0\.0\.1:\d+ .*pick another --port"):
            bind("127.0.0.1", first.getsockname()[1])
    finally:
        first.close()
