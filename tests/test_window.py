"""Sink-pinned windowed decoding (SampleConfig.window, sinkdlm.window): a block attends to the sinks,
the row's first `window_anchors` tokens, the last `window` committed tokens and itself only."""

import json

import pytest
import torch

from sinkdlm.errors import UserError
from sinkdlm.sample import SampleConfig, generate
from sinkdlm.window import kept_columns, window_canvas, windowed_pairs
from tests.test_llada_reference import MASK, llada_generate, sharp_model
from tests.test_sample import checkpoint, cli_in_process, memorised  # noqa: F401 (fixtures)

EOS = 0
PROMPTS = [[3, 7, 11, 2, 9, 4], [5, 1, 8]]
EVERYTHING = 10_000  # a window longer than any canvas here: nothing is evicted
MODELS = [dict(sink_tokens=1), dict(sink_tokens=0), dict(sink_tokens=2, sink_position="end")]


def run(model, prompts, cfg, **kw):
    trajectory = []
    out = generate(model, prompts, cfg, MASK, EOS, on_step=lambda _, x: trajectory.append(x.clone()), **kw)
    return out, trajectory


def test_kept_columns_are_anchors_then_the_window_then_the_block():
    assert kept_columns(0, 10, 14, window=3, anchors=2) == [0, 1, 7, 8, 9, 10, 11, 12, 13]
    assert kept_columns(0, 4, 8, window=3, anchors=2) == [0, 1, 2, 3, 4, 5, 6, 7]  # window meets anchors
    assert kept_columns(0, 10, 14, window=0, anchors=0) == [10, 11, 12, 13]
    assert kept_columns(2, 10, 12, window=EVERYTHING, anchors=0) == list(range(2, 12))


@pytest.mark.parametrize("model_kw", MODELS, ids=str)
@pytest.mark.parametrize("changes", [
    dict(), dict(temperature=0.8, remasking="random", seed=2), dict(cache="dual"), dict(guidance=1.0),
    dict(threshold=0.3, eos="fill", min_length=3),
], ids=str)
def test_a_window_covering_everything_is_full_decoding_in_one_block(model_kw, changes):
    """With one block there is no lookahead to drop: the windowed canvas is the full canvas."""
    model = sharp_model(**model_kw)
    cfg = SampleConfig(gen_length=12, steps=12, **changes)
    full, full_steps = run(model, PROMPTS, cfg)
    windowed, windowed_steps = run(model, PROMPTS, cfg.replace(window=EVERYTHING))
    assert windowed == full
    assert all(torch.equal(a, b) for a, b in zip(full_steps, windowed_steps, strict=True))


def without_lookahead(model, prompt_length: int, block: int):
    """The model seeing the canvas only up to the end of the block being decoded (LLaDA's loop
    decodes blocks in order: the current one holds the first mask after the prompt)."""
    def forward(x):
        first_mask = int((x[0, prompt_length:] == MASK).nonzero()[0]) + prompt_length
        end = prompt_length + (first_mask - prompt_length) // block * block + block
        logits = model(x[:, :end])
        return torch.cat([logits, logits.new_zeros(x.shape[0], x.shape[1] - end, logits.shape[-1])], dim=1)
    return forward


@pytest.mark.parametrize("model_kw", MODELS, ids=str)
@pytest.mark.parametrize("shape", [(16, 4, 8), (15, 5, 6)], ids=str)
@pytest.mark.parametrize("guidance", [0.0, 1.5])
def test_a_window_covering_everything_is_lladas_loop_without_lookahead(model_kw, shape, guidance):
    gen_length, block, steps = shape
    model = sharp_model(**model_kw)
    prompts = [[3, 7, 11, 2, 9], [5, 1, 8, 13, 4]]
    ref = llada_generate(without_lookahead(model, 5, block), torch.tensor(prompts), steps, gen_length, block,
                         cfg_scale=guidance)
    cfg = SampleConfig(gen_length=gen_length, block_length=block, steps=steps, guidance=guidance,
                       window=EVERYTHING)
    _, ours = run(model, prompts, cfg)
    assert all(torch.equal(a, b) for a, b in zip(ref, ours, strict=True))


def dense_window_mask(columns: torch.Tensor, valid: torch.Tensor, width: int) -> torch.Tensor:
    """(B, 1, W, W): every query may see exactly the kept columns of its row."""
    keys = torch.zeros(columns.shape[0], width, dtype=torch.bool)
    keys.scatter_(1, columns.masked_fill(~valid, 0), valid)
    return keys[:, None, None, :].expand(-1, 1, width, width)


@pytest.mark.parametrize("model_kw", [dict(sink_tokens=0), dict(sink_tokens=2, sink_position="end")], ids=str)
@pytest.mark.parametrize("window", [3, 7, 0])
def test_the_window_canvas_equals_the_full_canvas_under_a_dense_mask_hiding_the_evicted_keys(model_kw, window):
    """Logits of the current block: the small re-indexed canvas vs the whole canvas where a dense
    mask hides every evicted and every later key. RoPE is relative and end sinks sit after the last
    visible key, so the positions cancel; re-indexing moves front sinks and anchors closer by design,
    so for them the next test checks that evicted tokens change nothing instead."""
    model = sharp_model(**model_kw)
    torch.manual_seed(1)
    x = torch.randint(1, 50, (2, 30))
    row_begin, first, end = torch.tensor([0, 0]), torch.tensor([16, 12]), torch.tensor([20, 16])
    x[0, 17:] = MASK
    x[1, 13:] = MASK
    kept = window_canvas(row_begin, first, end, window, anchors=0)
    with torch.no_grad():
        small = model(kept.gather(x, EOS), attention_mask=kept.valid.long())
        dense = model(x, attention_mask=dense_window_mask(kept.columns, kept.valid, x.shape[1]))
    for row in range(2):
        small_block = small[row, int(kept.first[row]):int(kept.end[row])]
        torch.testing.assert_close(small_block, dense[row, int(first[row]):int(end[row])], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("model_kw", MODELS, ids=str)
@pytest.mark.parametrize("cache", ["none", "dual"])
def test_evicted_prompt_tokens_never_change_the_completion(model_kw, cache):
    """Prompt tokens after the anchors and older than the window are never read; one inside is."""
    model = sharp_model(**model_kw)
    prompt = list(range(1, 21))
    cfg = SampleConfig(gen_length=12, steps=12, block_length=4, window=6, window_anchors=2, cache=cache)
    out, steps = run(model, [prompt], cfg)
    evicted = prompt[:2] + [49 - t for t in prompt[2:14]] + prompt[14:]
    out2, steps2 = run(model, [evicted], cfg)
    assert out2 == out
    assert all(torch.equal(a[:, 20:], b[:, 20:]) for a, b in zip(steps, steps2, strict=True))
    inside = prompt[:19] + [45]
    anchor = [45] + prompt[1:]
    for changed in (inside, anchor):
        assert not torch.equal(run(model, [changed], cfg)[1][-1][:, 20:], steps[-1][:, 20:])


@pytest.mark.parametrize("cache", ["none", "dual"])
def test_memory_is_flat_in_the_length_with_a_window(cache):
    model = sharp_model(sink_tokens=1)
    sizes = {}
    for gen_length in (16, 64, 128):  # 128 + the prompt is past the model's block_size of 64
        for window in (None, 8):
            if window is None and gen_length > 32:
                continue
            stats = {}
            cfg = SampleConfig(gen_length=gen_length, steps=gen_length, block_length=8, cache=cache, window=window)
            generate(model, [[1, 2, 3, 4]], cfg, MASK, EOS, stats=stats)
            sizes[gen_length, window] = stats["widest_input"], stats["peak_cache_bytes"]
    assert sizes[16, 8] == sizes[64, 8] == sizes[128, 8]
    assert sizes[16, 8][0] == 8 + 8  # the window and the block
    assert sizes[16, None][0] == 20
    if cache == "dual":
        assert sizes[16, 8][1] > 0 and sizes[16, None][1] > sizes[16, 8][1]


def test_window_batches_and_seeds_as_full_decoding():
    """A row's windowed sample does not depend on its batch (its window holds only its own tokens)."""
    model = sharp_model(sink_tokens=1)
    cfg = SampleConfig(gen_length=12, steps=12, block_length=4, window=5, temperature=0.8, seed=4)
    together = generate(model, PROMPTS, cfg, MASK, EOS)
    assert [generate(model, [p], cfg, MASK, EOS, indices=[i])[0] for i, p in enumerate(PROMPTS)] == together


@pytest.mark.parametrize("bad,match", [
    (dict(window_anchors=2), "needs a window"),
    (dict(window=4, padding="left"), "padding=right"),
])
def test_bad_window_settings_are_user_errors(bad, match):
    with pytest.raises(UserError, match=match):
        SampleConfig(gen_length=8, steps=8, **bad)


def test_a_window_wider_than_the_model_is_refused_naming_the_fix():
    with pytest.raises(UserError, match="smaller window"):
        generate(sharp_model(), [[1, 2]], SampleConfig(gen_length=64, steps=8, block_length=8, window=60),
                 MASK, EOS)


def test_windowed_pairs_cut_the_continuation_into_blocks_with_their_windows():
    tokens = list(range(100, 114))
    assert windowed_pairs(tokens, prompt=4, block=4, window=3, anchors=1) == [
        ([100, 101, 102, 103], [104, 105, 106, 107]),
        ([100, 105, 106, 107], [108, 109, 110, 111]),
        ([100, 109, 110, 111], [112, 113]),
    ]
    full = windowed_pairs(tokens, prompt=4, block=4, window=EVERYTHING)
    assert [c + x for c, x in full] == [tokens[:8], tokens[:12], tokens]


def test_windowed_elbo_is_the_sum_of_its_blocks_exact_elbos_and_reads_no_evicted_token():
    from sinkdlm.eval.likelihood import LikelihoodConfig, exact_elbo, score_pairs

    model = sharp_model(sink_tokens=1)
    tokens = [3, 7, 11, 2, 9, 4, 5, 1, 8, 13, 4, 6]
    settings = LikelihoodConfig(mc_num=2048, batch_size=512)

    def elbo(tokens):
        return score_pairs(model, windowed_pairs(tokens, prompt=4, block=4, window=2), settings)

    with torch.no_grad():
        mc = elbo(tokens)
        exact = sum(exact_elbo(model, c, x) for c, x in windowed_pairs(tokens, prompt=4, block=4, window=2))
        assert [e.loglik for e in elbo([40, 41] + tokens[2:])] == [e.loglik for e in mc]  # evicted for every block
        assert elbo(tokens[:3] + [40] + tokens[4:])[0].loglik != mc[0].loglik  # in block 1's window
    stderr = sum(e.stderr ** 2 for e in mc) ** 0.5
    assert abs(sum(e.loglik for e in mc) - exact) < 4 * stderr


def test_cli_window_flags(checkpoint, monkeypatch, capsys):
    """--window covering everything gives full decoding's completion; --window-anchors alone is one line, exit 2."""
    args = ["--checkpoint", checkpoint, "--prompt", "w10 w11 w12 w13", "--gen-length", 8, "--steps", 8,
            "--format", "jsonl"]
    completions = []
    for extra in ([], ["--window", 100], ["--window", 2, "--window-anchors", 1, "--block-length", 4]):
        assert cli_in_process(monkeypatch, *args, *extra) == 0
        completions.append(json.loads(capsys.readouterr().out)["completion"])
    assert completions[0] == completions[1]
    assert cli_in_process(monkeypatch, *args, "--window-anchors", 2) == 2
    err = capsys.readouterr().err.strip()
    assert "needs a window" in err and len(err.splitlines()) == 1
