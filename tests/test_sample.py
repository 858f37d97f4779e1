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
from sinkdlm.sample import (Forward, SampleConfig, build_canvas, forward_at, generate, generate_two_stage,
                            scheduled_count)
from tests.conftest import tiny

MASK = 50
EOS = 0
PATTERN = list(range(10, 34))  # 24 distinct tokens, memorised below
PROMPT = PATTERN[:4]
TRAIN_STEPS = 200


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny models run ~100x slower on 2 threads when the CPU is shared (spinning OpenMP workers)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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
    for step in range(TRAIN_STEPS):
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
    cfg = SampleConfig(gen_length=8, steps=8, temperature=2.0, cfg_scale=0.5, top_k=10, top_p=0.9)
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


@pytest.mark.parametrize("sink", [0, 1])
def test_kv_store_forward_equals_model_forward(sink):
    model = random_model(sink)
    x = torch.randint(0, MASK + 1, (2, 12))
    valid = torch.ones(2, 12, dtype=torch.bool)
    valid[1, 9:] = False
    kv = []
    with torch.no_grad():
        full = forward_at(model, x, valid, None, kv, model.sink_kv(12) if sink else None)
        ref = model(x, attention_mask=valid)
    assert torch.equal(full[valid], ref[valid])  # same kernels, same order: exact


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
def test_cfg_with_a_kv_cache_is_exact_within_a_single_step_block(cache):
    # guided rows and their prompt-masked twins keep separate K/V; a padded batch checks the mask
    model = random_model(sink=1)
    cfg = SampleConfig(gen_length=6, steps=6, block_length=1, temperature=1.0, cfg_scale=1.5, seed=3)
    prompts = [[1, 2, 3], [4, 5, 6, 7, 8]]
    assert generate(model, prompts, cfg.replace(cache=cache), MASK, EOS) == generate(model, prompts, cfg, MASK, EOS)


@pytest.mark.parametrize("cache", ["prefix", "dual"])
@pytest.mark.parametrize("cfg_scale", [0.0, 1.5])
def test_cached_step_with_nothing_decoded_since_the_refresh_gives_the_refresh_logits(cache, cfg_scale):
    """The cached path (head at the masked positions only, CFG twins, padding) reads K/V that are not
    stale here, so it must reproduce the full forward of the refresh."""
    model = random_model(sink=1)
    cfg = SampleConfig(gen_length=8, steps=8, block_length=4, cache=cache, cfg_scale=cfg_scale)
    canvas = build_canvas([[1, 2, 3], [4, 5, 6, 7, 8]], [8, 8], "right", MASK, EOS, torch.device("cpu"))
    forward = Forward(model, canvas, cfg)
    window = canvas.start[:, None] + torch.arange(4)
    queries = canvas.start[:, None] + torch.arange(8 if cache == "prefix" else 4)
    wanted = torch.tensor([[True, False, True, True], [False, True, True, False]])
    refreshed = forward(canvas.x, window, queries, True, wanted)
    cached = forward(canvas.x, window, queries, False, wanted)
    assert refreshed.shape == (5, MASK) and torch.allclose(cached, refreshed, atol=1e-5)
    with torch.no_grad():  # the head mask picks the same rows as the full output
        full = forward_at(model, canvas.x, canvas.valid, None, [], model.sink_kv(canvas.x.shape[1]))
        at = torch.zeros_like(canvas.valid).scatter_(1, window[:, :2], True)
        picked = forward_at(model, canvas.x, canvas.valid, None, [], model.sink_kv(canvas.x.shape[1]), head=at)
    assert torch.allclose(picked, full[at], atol=1e-6)


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
