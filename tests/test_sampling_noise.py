"""The sampler's categorical draws: float64 Gumbel-max that draws each token at its probability.

Batch invariance of the draws is tested in tests/test_sample.py (a prompt's sample does not depend
on its batch)."""

import pytest
import torch

from sinkdlm.sample import RowNoise, SampleConfig, gumbel_argmax, propose

DRAWS = 100_000
SIGMAS = 5.0  # binomial standard errors a frequency may stray; the draws are seeded, so no flakes


@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_gumbel_max_draws_each_token_at_its_tempered_probability(temperature):
    logits = torch.tensor([2.0, 0.0, -1.0, -6.0])  # the last: p = 2e-4 at T = 1
    cfg = SampleConfig(gen_length=4, steps=4, temperature=temperature)
    noise = RowNoise(seed=7, step=0, indices=[0], counts=torch.tensor([DRAWS]))
    x0, confidence, _ = propose(logits.expand(DRAWS, -1), cfg, noise)
    assert confidence.dtype == torch.float64
    expected = (logits.double() / temperature).softmax(-1)
    freq = torch.bincount(x0, minlength=4).double() / DRAWS
    tolerance = SIGMAS * (expected * (1 - expected) / DRAWS).sqrt()
    assert ((freq - expected).abs() <= tolerance).all(), (freq, expected)


def test_draws_are_float64_so_the_gumbel_tail_reaches_far_below_the_top_token():
    """A token 20 nats below the top wins only with Gumbel noise above ~20, i.e. u within 2e-9 of 1:
    float32 has no uniform there (its largest below 1 gives 16.6), float64 does."""
    noise = RowNoise(seed=0, step=0, indices=[0], counts=torch.tensor([3]))
    assert noise.uniforms(RowNoise.GUMBEL, 5).dtype == torch.float64
    logits = torch.tensor([[0.0, -20.0]], dtype=torch.float64)
    near_one = torch.tensor([[0.5, 1 - 1e-10]], dtype=torch.float64)
    assert int(gumbel_argmax(logits, 1.0, near_one)) == 1
    largest_float32 = torch.tensor(1.0, dtype=torch.float32).nextafter(torch.tensor(0.0)).double()
    assert -torch.log(-torch.log(largest_float32)) < 17
