"""The block sampler against LLaDA's published `generate()` (GSAI-ML/LLaDA, generate.py).

`llada_generate` below is that function re-written from reading it: a canvas of prompt + masks,
semi-autoregressive blocks, per block a precomputed transfer schedule (`llada_transfer_counts`:
masks // steps each, the remainder to the first steps), every step a full forward over the whole
canvas, x0 = argmax(exp(logits) / (-log u) ** T) in float64, confidence p(x0) (low_confidence) or a
uniform draw (random), -inf beyond the current block and at decoded positions, and the top-k of
each row committed. Unsupervised classifier-free guidance masks the prompt for the unconditional
half and mixes un + (w + 1)(cond - un). sinkdlm's sampler must commit the same tokens at every step.

LLaDA draws its noise from the device RNG over the whole canvas; sinkdlm draws per row and step
(`RowNoise`) at the block's masked positions. For temperature > 0 and random remasking the
reference is handed sinkdlm's uniforms at exactly those positions (its other draws never matter:
their confidence is -inf), so the comparison tests the algorithm, not two RNGs.

Both refuse steps that are not a multiple of the number of blocks (LLaDA asserts it); "steps not
divisible" is covered where it can run: steps per block that do not divide the block length, the
case where the schedule's remainder goes to the first steps.
"""

import pytest
import torch

from sinkdlm.errors import UserError
from sinkdlm.model import DLM
from sinkdlm.sample import RowNoise, SampleConfig, generate
from tests.conftest import tiny

MASK = 50
EOS = 0
PROMPTS = [[3, 7, 11, 2, 9], [5, 1, 8, 13, 4]]  # equal lengths: LLaDA's canvas has no padding
SEED = 5


def llada_transfer_counts(block_masked: torch.Tensor, steps: int) -> torch.Tensor:
    """(B, steps) tokens to commit at each step of a block: an even split, the remainder first."""
    total = block_masked.sum(dim=1, keepdim=True)
    base, remainder = total // steps, total % steps
    return base + (torch.arange(steps)[None, :] < remainder).long()


def llada_generate(model, prompt, steps, gen_length, block_length, temperature=0.0, cfg_scale=0.0,
                   remasking="low_confidence", uniforms=None):
    """LLaDA's generate(); returns the canvas after every step. uniforms(step, x, lo, hi, width)
    supplies the (B, L, width) float64 draws of a step (default: torch.rand, as LLaDA)."""
    b, p = prompt.shape
    x = torch.cat([prompt, torch.full((b, gen_length), MASK)], dim=1)
    prompt_index = x != MASK
    assert gen_length % block_length == 0
    n_blocks = gen_length // block_length
    assert steps % n_blocks == 0
    steps //= n_blocks
    draw = uniforms or (lambda step, x, lo, hi, width: torch.rand(*x.shape, width, dtype=torch.float64))
    trajectory = []
    for block in range(n_blocks):
        lo, hi = p + block * block_length, p + (block + 1) * block_length
        counts = llada_transfer_counts(x[:, lo:hi] == MASK, steps)
        for i in range(steps):
            masked = x == MASK
            if cfg_scale > 0:
                unconditional = x.masked_fill(prompt_index, MASK)
                cond, un = model(torch.cat([x, unconditional])).chunk(2)
                logits = un + (cfg_scale + 1) * (cond - un)
            else:
                logits = model(x)
            logits = logits.double()
            step = block * steps + i
            gumbel_u = draw(step, x, lo, hi, logits.shape[-1]) if temperature > 0 else torch.rand_like(logits)
            x0 = (logits.exp() / (-torch.log(gumbel_u)) ** temperature).argmax(-1)
            if remasking == "low_confidence":
                confidence = logits.softmax(-1).gather(-1, x0[..., None]).squeeze(-1)
            else:
                confidence = draw(step, x, lo, hi, 1)[..., 0]
            confidence[:, hi:] = float("-inf")
            x0 = torch.where(masked, x0, x)
            confidence = torch.where(masked, confidence, torch.tensor(float("-inf"), dtype=torch.float64))
            commit = torch.zeros_like(masked)
            for row in range(b):
                commit[row, confidence[row].topk(int(counts[row, i])).indices] = True
            x = torch.where(commit, x0, x)
            trajectory.append(x.clone())
    return trajectory


def sinkdlm_draws(stream: int):
    """The uniforms sinkdlm's sampler draws at a step, placed where LLaDA's canvas-wide draw is read."""
    def uniforms(step, x, lo, hi, width):
        block_masked = x[:, lo:hi] == MASK
        noise = RowNoise(SEED, step, range(x.shape[0]), block_masked.sum(1))
        out = torch.full((*x.shape, width), 0.5, dtype=torch.float64)
        block = out[:, lo:hi]
        block[block_masked] = noise.uniforms(stream, width)
        return out
    return uniforms


def sharp_model(**kw) -> DLM:
    """A random tiny model with weights x3: peaked predictions, so no two candidates' confidences
    are within float32 noise of each other (the head runs on other shapes in the two samplers)."""
    torch.manual_seed(0)
    model = DLM(tiny(**kw)).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.mul_(3.0)
    return model


def sinkdlm_trajectory(model, cfg: SampleConfig) -> list[torch.Tensor]:
    trajectory = []
    generate(model, PROMPTS, cfg, MASK, EOS, on_step=lambda _, x: trajectory.append(x.clone()))
    return trajectory


SHAPES = [  # (gen_length, block_length, steps)
    (16, 16, 16),  # one block, one token a step
    (16, 4, 8),  # 4 blocks of 2 steps
    (15, 5, 6),  # 2 steps for 5 tokens: [3, 2]
    (16, 8, 6),  # 3 steps for 8 tokens: [3, 3, 2]
    (10, 10, 4),  # one block, [3, 3, 2, 2]
    (12, 6, 2),  # one step per block: the whole block at once
]
MODELS = [dict(sink_tokens=1), dict(sink_tokens=0), dict(sink_tokens=2, sink_position="end")]


@pytest.mark.parametrize("model_kw", MODELS, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_low_confidence_at_temperature_0_commits_lladas_tokens_at_every_step(model_kw, shape):
    gen_length, block_length, steps = shape
    model = sharp_model(**model_kw)
    ref = llada_generate(model, torch.tensor(PROMPTS), steps, gen_length, block_length)
    ours = sinkdlm_trajectory(model, SampleConfig(gen_length=gen_length, block_length=block_length, steps=steps))
    assert len(ours) == len(ref) == steps
    for ref_x, our_x in zip(ref, ours):
        assert torch.equal(ref_x, our_x)


@pytest.mark.parametrize("shape", [(16, 4, 8), (15, 5, 6)], ids=str)
@pytest.mark.parametrize("cfg_scale", [0.5, 2.0])
def test_guidance_is_lladas_cfg_scale(shape, cfg_scale):
    gen_length, block_length, steps = shape
    model = sharp_model(sink_tokens=1)
    ref = llada_generate(model, torch.tensor(PROMPTS), steps, gen_length, block_length, cfg_scale=cfg_scale)
    cfg = SampleConfig(gen_length=gen_length, block_length=block_length, steps=steps, guidance=cfg_scale)
    assert all(torch.equal(a, b) for a, b in zip(ref, sinkdlm_trajectory(model, cfg)))


@pytest.mark.parametrize("shape", [(16, 4, 8), (16, 8, 6)], ids=str)
def test_random_remasking_with_the_same_draws_is_lladas(shape):
    gen_length, block_length, steps = shape
    model = sharp_model(sink_tokens=1)
    ref = llada_generate(model, torch.tensor(PROMPTS), steps, gen_length, block_length, remasking="random",
                         uniforms=sinkdlm_draws(RowNoise.REMASK))
    cfg = SampleConfig(gen_length=gen_length, block_length=block_length, steps=steps, remasking="random",
                       seed=SEED)
    assert all(torch.equal(a, b) for a, b in zip(ref, sinkdlm_trajectory(model, cfg)))


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0])
def test_gumbel_sampling_with_the_same_draws_is_lladas(temperature):
    """LLaDA's exp(logits) / (-log u)^T and sinkdlm's logits / T + Gumbel(u) pick the same token."""
    model = sharp_model(sink_tokens=1)
    ref = llada_generate(model, torch.tensor(PROMPTS), 8, 16, 4, temperature=temperature,
                         uniforms=sinkdlm_draws(RowNoise.GUMBEL))
    cfg = SampleConfig(gen_length=16, block_length=4, steps=8, temperature=temperature, seed=SEED)
    ours = sinkdlm_trajectory(model, cfg)
    assert all(torch.equal(a, b) for a, b in zip(ref, ours))
    assert not torch.equal(ours[-1], sinkdlm_trajectory(model, cfg.replace(temperature=0))[-1])


def test_steps_not_a_multiple_of_the_blocks_are_refused_like_llada():
    model = sharp_model()
    with pytest.raises(AssertionError):
        llada_generate(model, torch.tensor(PROMPTS), 7, 16, 4)
    with pytest.raises(UserError, match="multiple of the number of blocks"):
        SampleConfig(gen_length=16, block_length=4, steps=7)
