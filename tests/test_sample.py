import json
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers

from sinkdlm.checkpoint import save_checkpoint
from sinkdlm.config import Config
from sinkdlm.diffusion import elbo_loss, mask_tokens, noise_level, pretrain_weights
from sinkdlm.errors import UserError
from sinkdlm.model import DLM
from sinkdlm.sample import Forward, SampleConfig, build_canvas, generate, generate_two_stage, scheduled_count
from tests.conftest import tiny
from tests.test_model import SELF_ONLY_VARIANTS, _name, _options

MASK = 50
EOS = 0
PATTERN = list(range(10, 34))  # 24 distinct tokens, memorised below
PROMPT = PATTERN[:4]
TRAIN_STEPS = 200


def random_model(sink: int = 1, **kw) -> DLM:
    torch.manual_seed(0)
    return DLM(tiny(sink_tokens=sink, **kw)).eval()


@pytest.fixture(scope="module")
def memorised() -> DLM:
    """A tiny sink model trained (a few seconds) to reproduce PATTERN from any partial masking."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 32-wide model trains fastest on one thread
    torch.manual_seed(0)
    model = DLM(tiny(sink_tokens=1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.0)
    x = torch.tensor([PATTERN] * 16)
    for _ in range(TRAIN_STEPS):
        p = noise_level(torch.rand(16, dtype=torch.float64), 1e-3)
        noisy, masked = mask_tokens(x, p, torch.rand(x.shape, dtype=torch.float64), MASK)
        loss = elbo_loss(model(noisy), x, masked, p, pretrain_weights(x))
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    return model.eval()


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
def test_memorised_pattern_is_completed(memorised, remasking):
    cfg = SampleConfig(gen_length=20, steps=20, block_length=10, remasking=remasking)
    assert generate(memorised, [PROMPT], cfg, MASK, EOS) == [PATTERN[4:]]


def test_schedule_equals_lladas_num_transfer_tokens():
    for masks, steps in [(6, 5), (10, 4), (256, 256), (3, 8)]:
        remaining, counts = torch.tensor([masks]), []
        for s in range(steps):
            counts.append(int(scheduled_count(remaining, steps - s)))
            remaining -= counts[-1]
        base, extra = divmod(masks, steps)
        assert counts == [base + 1] * extra + [base] * (steps - extra)


@pytest.mark.parametrize("remasking", ["low_confidence", "margin", "entropy", "random"])
@pytest.mark.parametrize("padding", ["right", "left"])
def test_each_step_unmasks_exactly_the_schedule(remasking, padding):
    model = random_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    cfg = SampleConfig(gen_length=12, steps=10, block_length=6, remasking=remasking, temperature=1.0,
                       padding=padding, seed=3)
    masks_left = []
    generate(model, prompts, cfg, MASK, EOS, on_step=lambda s, x: masks_left.append((x == MASK).sum(1).tolist()))
    # 6 masks per block over 5 steps: LLaDA's schedule [2, 1, 1, 1, 1], the same for each sequence
    expected_per_block = [2, 1, 1, 1, 1]
    before = [12, 12]
    for step, after in enumerate(masks_left):
        n = expected_per_block[step % 5]
        assert [b - a for b, a in zip(before, after)] == [n, n]
        before = after
    assert before == [0, 0]


def test_flattened_batch_ranking_unmasks_the_batch_total():
    model = random_model()
    cfg = SampleConfig(gen_length=8, steps=4, batch_ranking="flattened_batch", temperature=1.0)
    masks = []
    generate(model, [[1, 2], [3, 4, 5]], cfg, MASK, EOS, on_step=lambda s, x: masks.append(int((x == MASK).sum())))
    assert masks == [12, 8, 4, 0]


def test_threshold_decoding_leaves_no_masks_and_saves_steps(memorised):
    cfg = SampleConfig(gen_length=20, steps=20, threshold=0.5)
    stats, final = {}, []
    out = generate(memorised, [PROMPT], cfg, MASK, EOS, on_step=lambda s, x: final.append(x), stats=stats)
    assert int((final[-1] == MASK).sum()) == 0
    assert out == [PATTERN[4:]]
    assert stats["forward_calls"] < 20


def test_prompt_tokens_never_change_and_padding_is_untouched():
    model = random_model()
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    cfg = SampleConfig(gen_length=8, steps=8, temperature=2.0, guidance=0.5, top_k=10, top_p=0.9)
    canvases = []
    generate(model, prompts, cfg, MASK, EOS, on_step=lambda s, x: canvases.append(x))
    for x in canvases:
        assert x[0, :3].tolist() == [1, 2, 3] and x[1, :5].tolist() == [4, 5, 6, 7, 8]
        assert (x[0, 11:] == EOS).all()  # right padding: row 0 ends 2 positions early


def test_sink_kv_cache_matches_recompute(monkeypatch):
    import contextlib
    model = random_model()
    x = torch.randint(0, MASK + 1, (2, 12))
    with torch.no_grad():
        plain = model(x)
        with model.sink_cache():
            cached = model(x)
    assert torch.equal(plain, cached)
    cfg = SampleConfig(gen_length=8, steps=8, temperature=1.0, seed=5)
    with_cache = generate(model, [[1, 2, 3]], cfg, MASK, EOS)
    monkeypatch.setattr(type(model), "sink_cache", lambda self: contextlib.nullcontext())
    assert generate(model, [[1, 2, 3]], cfg, MASK, EOS) == with_cache


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_approximate_caches_are_exact_within_a_single_step_block(memorised, cache):
    # one step per block: every block starts with a refresh, so the cache is never stale
    cfg = SampleConfig(gen_length=20, steps=20, block_length=1, temperature=0.0)
    assert generate(memorised, [PROMPT], cfg.replace(cache=cache), MASK, EOS) == \
        generate(memorised, [PROMPT], cfg, MASK, EOS)
    stats = {}
    out = generate(memorised, [PROMPT], SampleConfig(gen_length=20, steps=20, block_length=10, cache=cache),
                   MASK, EOS, stats=stats)
    assert len(out[0]) == 20 and stats["forward_calls"] == 20


@pytest.mark.parametrize("cache", ["prefix", "dual"])
def test_guidance_with_a_kv_cache_is_exact_within_a_single_step_block(cache):
    # guided rows and their prompt-masked twins keep separate K/V; a padded batch checks the mask
    model = random_model(sink=1)
    cfg = SampleConfig(gen_length=6, steps=6, block_length=1, temperature=1.0, guidance=1.5, seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(model, prompts, cfg.replace(cache=cache), MASK, EOS) == generate(model, prompts, cfg, MASK, EOS)


@pytest.mark.parametrize("kw", SELF_ONLY_VARIANTS, ids=_name)
@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_cached_step_with_nothing_decoded_since_the_refresh_gives_the_refresh_logits(kw, cache, guidance):
    """For every sink/gate/GQA variant: the refresh is the full forward (exact), and the cached path
    (head at the masked positions only, guidance twins, padding) reads K/V that are not stale here, so it
    must reproduce it."""
    torch.manual_seed(0)
    model = DLM(tiny(**_options(kw))).eval()
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, cache=cache, guidance=guidance)
    canvas = build_canvas([[1, 2, 3], [4, 5, 6, 7, 8]], [8, 8], "right", MASK, EOS, torch.device("cpu"))
    window = canvas.start[:, None] + torch.arange(4)
    queries = canvas.start[:, None] + torch.arange(8 if cache == "prefix" else 4)
    wanted = torch.tensor([[True, False, True, True], [False, True, True, False]])
    with model.sink_cache():
        full = Forward(model, canvas, cfg.replace(cache="none"))(canvas.x, window, queries, True, wanted)
        forward = Forward(model, canvas, cfg)
        refreshed = forward(canvas.x, window, queries, True, wanted)
        cached = forward(canvas.x, window, queries, False, wanted)
    assert refreshed.shape == (5, MASK) and torch.equal(refreshed, full)
    torch.testing.assert_close(cached, refreshed, rtol=1e-5, atol=1e-5)


def sharpened_model(**kw) -> DLM:
    """A random model with weights x3: peaked predictions, so float noise of another batch shape
    does not flip an argmax."""
    model = random_model(**kw)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model


@pytest.mark.parametrize("cache", ["none", "prefix", "dual"])
def test_end_sink_generation_does_not_depend_on_the_batch_padding(cache):
    model = sharpened_model(sink=2, sink_position="end")
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, cache=cache)
    alone = generate(model, [[1, 2, 3]], cfg, MASK, EOS)
    assert generate(model, [[4, 5, 6, 7, 8, 9, 10], [1, 2, 3], [11, 12]], cfg, MASK, EOS)[1] == alone[0]


BATCH_PROMPTS = [[1, 2, 3], [4, 5, 6, 7, 8, 9, 10], [11, 12]]


@pytest.mark.parametrize("model_kw", [dict(sink=0), dict(sink=1), dict(sink=2, sink_position="end")], ids=str)
@pytest.mark.parametrize("changes", [
    dict(temperature=0.7), dict(remasking="random"), dict(temperature=0.7, top_p=0.9, padding="left"),
    dict(temperature=0.7, remasking="random", threshold=0.3, guidance=1.0, cache="dual", suppress_eos_steps=3),
], ids=str)
def test_a_prompts_sample_does_not_depend_on_its_batch(model_kw, changes):
    """Every random draw of a row is a function of (seed, the prompt's index, step): batch sizes 1
    and 3 and a shuffled order (mapped back) give the same completions."""
    if changes.get("padding") == "left" and model_kw.get("sink_position", "front") == "front" and model_kw["sink"]:
        pytest.skip("left padding moves a row's content away from front sinks by its batch's longest prompt")
    model = sharpened_model(**model_kw)
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, seed=3, **changes)
    together = generate(model, BATCH_PROMPTS, cfg, MASK, EOS)
    alone = [generate(model, [p], cfg, MASK, EOS, indices=[i])[0] for i, p in enumerate(BATCH_PROMPTS)]
    assert alone == together
    order = [2, 0, 1]
    shuffled = generate(model, [BATCH_PROMPTS[i] for i in order], cfg, MASK, EOS, indices=order)
    assert [shuffled[order.index(i)] for i in range(3)] == together
    assert generate(model, BATCH_PROMPTS, cfg.replace(seed=4), MASK, EOS) != together


def test_two_stage_sample_does_not_depend_on_its_batch():
    model = sharpened_model()
    first, second = SampleConfig(gen_length=4, steps=4, temperature=0.7), SampleConfig(gen_length=4, steps=4)
    together = generate_two_stage(model, BATCH_PROMPTS, first, second.replace(temperature=0.7), MASK, EOS)
    assert [generate_two_stage(model, [p], first, second.replace(temperature=0.7), MASK, EOS, indices=[i])[0]
            for i, p in enumerate(BATCH_PROMPTS)] == together


def test_prompt_indices_must_match_the_prompts():
    with pytest.raises(UserError, match="indices"):
        generate(random_model(), [[1, 2]], SampleConfig(gen_length=4, steps=4), MASK, EOS, indices=[0, 1])


def test_same_seed_same_output_and_other_seed_differs():
    model = random_model()
    cfg = SampleConfig(gen_length=16, steps=8, temperature=1.0, seed=7)
    a = generate(model, [[1, 2, 3]], cfg, MASK, EOS)
    assert generate(model, [[1, 2, 3]], cfg, MASK, EOS) == a
    assert generate(model, [[1, 2, 3]], cfg.replace(seed=8), MASK, EOS) != a


def test_eos_fill_and_suppression():
    model = random_model()
    with torch.no_grad():  # bias the head hard towards EOS
        model.lm_head.weight[EOS] += 5.0
    cfg = SampleConfig(gen_length=8, steps=8, eos="fill")
    out = generate(model, [[1, 2]], cfg, MASK, EOS)[0]
    first = out.index(EOS)
    assert all(t == EOS for t in out[first:])
    kept = generate(model, [[1, 2]], cfg.replace(min_length=5), MASK, EOS)[0]
    assert EOS not in kept[:5]


def test_two_stage_continues_from_the_first_stage(memorised):
    first = SampleConfig(gen_length=10, steps=10)
    second = SampleConfig(gen_length=10, steps=10)
    out = generate_two_stage(memorised, [PROMPT], first, second, MASK, EOS)
    assert out == [PATTERN[4:]]


def test_length_includes_prompt_counts_the_prompt(memorised):
    cfg = SampleConfig(gen_length=24, steps=24, length_includes_prompt=True)
    assert generate(memorised, [PROMPT, PATTERN[:8]], cfg, MASK, EOS) == [PATTERN[4:], PATTERN[8:]]


@pytest.mark.parametrize("bad", [
    dict(gen_length=0), dict(steps=0), dict(gen_length=10, block_length=4),
    dict(gen_length=8, block_length=4, steps=3), dict(remasking="best"), dict(cache="full"),
    dict(threshold=1.5), dict(top_p=0.0),
])
def test_bad_sample_config_is_a_user_error(bad):
    with pytest.raises(UserError):
        SampleConfig(**bad)


def test_bad_prompts_are_user_errors():
    model = random_model()
    with pytest.raises(UserError, match="empty"):
        generate(model, [[]], SampleConfig(gen_length=4, steps=4), MASK, EOS)
    with pytest.raises(UserError, match="block_size"):
        generate(model, [[1] * 60], SampleConfig(gen_length=8, steps=8), MASK, EOS)


# ---- the CLI -----------------------------------------------------------------------------------


def word_tokenizer(path) -> None:
    vocab = {"<|endoftext|>": 0, "[UNK]": 1, **{f"w{i}": i for i in range(2, 50)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory, memorised):
    root = tmp_path_factory.mktemp("ckpt")
    word_tokenizer(root / "tok.json")
    cfg = Config(model=tiny(sink_tokens=1))
    return save_checkpoint(root / "run", 1, memorised.state_dict(), cfg, {"eos_id": EOS}, root / "tok.json")


def cli(*args):
    return subprocess.run([sys.executable, "-m", "sinkdlm", "generate", *map(str, args)],
                          capture_output=True, text=True)


def cli_in_process(monkeypatch, *args) -> int:
    """The same entry point without a new interpreter (seconds saved per call)."""
    from sinkdlm.cli import main

    monkeypatch.setattr(sys, "argv", list(sys.argv))
    return main(["generate", *map(str, args)])


@pytest.mark.slow
def test_cli_generates_deterministically(checkpoint, tmp_path, monkeypatch, capsys):
    prompt = " ".join(f"w{t}" for t in PROMPT)
    args = ["--checkpoint", checkpoint, "--prompt", prompt, "--gen-length", 20, "--steps", 20, "--temperature", 0.5]
    done = cli(*args, "--output", tmp_path / "out.jsonl")
    assert done.returncode == 0, done.stderr
    rows = [json.loads(line) for line in (tmp_path / "out.jsonl").read_text().splitlines()]
    assert rows[0]["prompt"] == prompt and len(rows[0]["completion"].split()) == 20
    assert cli_in_process(monkeypatch, *args) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0])["completion"] == rows[0]["completion"]


def test_cli_completions_do_not_depend_on_the_batch_size(checkpoint, tmp_path, monkeypatch, capsys):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(["w3 w9 w2", "w10 w11 w12 w13 w14", "w40"]))
    args = ["--checkpoint", checkpoint, "--input", prompts, "--gen-length", 8, "--steps", 8, "--temperature", 2.0]
    outputs = []
    for batch in (1, 3):
        assert cli_in_process(monkeypatch, *args, "--batch-size", batch) == 0
        outputs.append([json.loads(line)["completion"] for line in capsys.readouterr().out.splitlines()])
    assert outputs[0] == outputs[1] and len(outputs[0]) == 3


@pytest.mark.slow
def test_cli_bad_input_exits_2_in_a_subprocess(checkpoint):
    done = cli("--checkpoint", checkpoint, "--prompt", "w1", "--gen-length", 0)
    assert done.returncode == 2 and "error:" in done.stderr and "Traceback" not in done.stderr


@pytest.mark.parametrize("extra", [["--steps", 7, "--gen-length", 8, "--block-length", 4], ["--remasking", "nope"],
                                   ["--prompt", ""], ["--prompt", " ".join(["w1"] * 60)]])
def test_cli_bad_input_exits_2(checkpoint, extra, monkeypatch, capsys):
    args = ["--checkpoint", checkpoint, *(["--prompt", "w1"] if "--prompt" not in extra else []), *extra]
    assert cli_in_process(monkeypatch, *args) == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("changes", [
    dict(), dict(cache="prefix"), dict(cache="dual", cache_refresh=2), dict(window=4),
    dict(cache="dual", guidance=1.0, threshold=0.3, padding="left"), dict(window=4, cache="prefix"),
    dict(cache="dual", threshold_factor=2.0, cache_refresh_tokens=2),
], ids=str)
@pytest.mark.parametrize("drop_at", [1, 4, 6])
def test_a_dropped_row_stops_being_computed_and_the_others_get_what_they_get_alone(changes, drop_at):
    """keep() drops the middle prompt after `drop_at` steps (mid-block or at a block start; with a
    window at the next block start): the forwards take fewer rows from then on, the other two
    prompts' completions equal theirs alone, and the dropped one keeps masks it never decoded."""
    model = sharpened_model(sink=0) if changes.get("padding") == "left" else sharpened_model()
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, seed=3, temperature=0.7, **changes)
    steps, rows, full = [], [], []
    hook = model.register_forward_pre_hook(lambda module, args: rows.append(args[0].shape[0]))
    try:
        got = generate(model, BATCH_PROMPTS, cfg, MASK, EOS, on_step=lambda s, x: steps.append(x),
                       keep=lambda: [True, len(steps) < drop_at, True])
    finally:
        hook.remove()
    alone = [generate(model, [p], cfg, MASK, EOS, indices=[i])[0] for i, p in enumerate(BATCH_PROMPTS)]
    assert [got[0], got[2]] == [alone[0], alone[2]]
    generate(model, BATCH_PROMPTS, cfg, MASK, EOS, on_step=lambda s, x: full.append(x))
    block_steps = cfg.steps // cfg.n_blocks
    frozen_after = min(drop_at if cfg.window is None else -(-drop_at // block_steps) * block_steps, len(full))
    assert torch.equal(steps[-1][1], full[frozen_after - 1][1])  # the leaver: as it was when dropped
    per_row = 2 if cfg.guidance else 1
    left = 3 if frozen_after == len(full) else 2  # the batch ended first (threshold; a window's last block)
    assert rows == sorted(rows, reverse=True) and rows[0] == 3 * per_row and rows[-1] == left * per_row
    if cfg.window is None and cfg.threshold is None:  # one forward per step
        assert rows.count(3 * per_row) == drop_at


def test_keep_dropping_every_row_stops_the_batch():
    model = sharpened_model()
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, cache="dual")
    steps = []
    stats = {}
    got = generate(model, BATCH_PROMPTS, cfg, MASK, EOS, on_step=lambda s, x: steps.append(x.shape[0]),
                   keep=lambda: [len(steps) < 2] * 3, stats=stats)
    assert steps == [3, 3] and stats["forward_calls"] == 2 and all(MASK in g for g in got)
