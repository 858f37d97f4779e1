"""The diffusion maths against hand computations."""

import math

import pytest
import torch

from sinkdlm import diffusion


def test_elbo_matches_hand_computation():
    # B=2, L=3, V=2; uniform logits except one confident position
    logits = torch.zeros(2, 3, 2)
    logits[0, 1] = torch.tensor([2.0, 0.0])
    targets = torch.tensor([[0, 0, 1], [1, 1, 0]])
    masked = torch.tensor([[True, True, False], [False, False, True]])
    p = torch.tensor([0.5, 0.25])
    loss = diffusion.elbo_loss(logits, targets, masked, p, diffusion.pretrain_weights(targets))
    ce_uniform, ce_confident = math.log(2), math.log(1 + math.exp(-2))
    expected = ((ce_uniform + ce_confident) / 0.5 + ce_uniform / 0.25) / 6
    assert abs(loss.item() - expected) < 1e-6


def test_noise_level_keeps_eps_floor():
    assert diffusion.noise_level(torch.tensor([0.0, 1.0], dtype=torch.float64), 1e-3).tolist() == [1e-3, 1.0]


def test_masking_follows_uniforms_and_maskable():
    x = torch.arange(6).view(1, 6)
    u = torch.tensor([[0.1, 0.9, 0.2, 0.8, 0.05, 0.6]], dtype=torch.float64)
    noisy, masked = diffusion.mask_tokens(x, torch.tensor([0.5]), u, 99, maskable=torch.tensor([[0, 1, 1, 1, 1, 1]]))
    assert masked.tolist() == [[False, False, True, False, True, False]]
    assert noisy.tolist() == [[0, 1, 99, 3, 99, 5]]


def test_noise_depends_only_on_seed_step_index():
    a = diffusion.draw_t(1, 7, [0, 1, 2, 3], 4, "uniform")
    b = diffusion.draw_t(1, 7, [2, 3], 4, "uniform")
    assert a[2:].tolist() == b.tolist()
    ua, ub = diffusion.draw_uniforms(1, 7, [0, 3], 5), diffusion.draw_uniforms(1, 7, [3], 5)
    assert torch.equal(ua[1], ub[0])


def test_stratified_and_antithetic_t():
    s = diffusion.draw_t(0, 0, range(4), 4, "stratified")
    gaps = sorted(((s - s.min()) % 1).tolist())
    assert all(abs(g - k / 4) < 1e-9 for g, k in zip(gaps, range(4)))
    a = diffusion.draw_t(0, 0, range(4), 4, "antithetic")
    assert abs(a[0] + a[2] - 1) < 1e-12 and abs(a[1] + a[3] - 1) < 1e-12


def test_sft_weights_normalise_by_response_length():
    r = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    w = diffusion.sft_weights(r)
    assert torch.allclose(w.sum(dim=1), torch.tensor([0.5, 0.5]))
    assert w[0, 0] == 0


def test_truncated_length_is_deterministic_and_in_range():
    lengths = [diffusion.truncated_length(0, s, 64, 0.5) for s in range(200)]
    assert lengths == [diffusion.truncated_length(0, s, 64, 0.5) for s in range(200)]
    assert 0.3 < sum(n < 64 for n in lengths) / 200 < 0.7 and min(lengths) >= 1
    assert diffusion.truncated_length(0, 3, 64, 0.0) == 64


def test_annealed_mask_goes_from_causal_to_full():
    causal = torch.ones(6, 6, dtype=torch.bool).tril()
    assert torch.equal(diffusion.annealed_mask(0, 0, 6, 0.0)[0, 0], causal)
    assert diffusion.annealed_mask(0, 0, 6, 1.0).all()
    half = diffusion.annealed_mask(0, 5, 64, 0.5)[0, 0]
    assert torch.equal(half, diffusion.annealed_mask(0, 5, 64, 0.5)[0, 0])
    assert half[torch.ones(64, 64, dtype=torch.bool).tril()].all()  # the causal part stays visible
    upper = half[torch.ones(64, 64, dtype=torch.bool).triu(1)]
    assert 0.4 < upper.float().mean() < 0.6


@pytest.mark.parametrize("frac", [0.1, 0.5, 0.9])
def test_annealed_mask_keeps_the_causal_part_and_opens_that_fraction_of_the_future(frac):
    length = 64
    causal = torch.ones(length, length, dtype=torch.bool).tril()
    mask = diffusion.annealed_mask(0, 5, length, frac)[0, 0]
    assert mask[causal].all()
    future = mask[~causal].float()  # 2,016 keys: the share's std is <= 0.011
    assert abs(future.mean().item() - frac) < 0.05
    assert not torch.equal(mask, diffusion.annealed_mask(0, 6, length, frac)[0, 0])  # new keys every step
    wider = diffusion.annealed_mask(0, 5, length, min(1.0, frac + 0.05))[0, 0]
    assert (wider | ~mask).all() and not torch.equal(wider, mask)  # annealing only ever opens keys
