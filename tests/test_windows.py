"""Training window orders: `random` (with replacement) and `epoch` (each window once per pass, SMDM),
both pure functions of (seed, step, global sample index)."""

import numpy as np
import pytest
import torch

from sinkdlm import checkpoint as ckpt
from sinkdlm.config import WINDOW_ORDERS, config_from_dict
from sinkdlm.data.shards import epoch_window_starts, permute, sample_windows, window_sampler
from sinkdlm.errors import UserError
from sinkdlm.training.trainer import train
from tests.conftest import tiny_train_config
from tests.test_train import losses

SEQ = 8


@pytest.mark.parametrize("n", [1, 2, 3, 5, 64, 1000, 4097])
def test_permute_is_a_bijection_per_key(n):
    keys = np.full(n, 12345, dtype=np.uint64)
    out = permute(np.arange(n), n, keys)
    assert sorted(out.tolist()) == list(range(n))
    if n >= 64:
        assert out.tolist() != list(range(n))
        assert out.tolist() != permute(np.arange(n), n, keys + np.uint64(1)).tolist()


@pytest.mark.parametrize("global_batch", [4, 7])
def test_an_epoch_visits_every_window_once(global_batch):
    n_tokens = 50 * SEQ + 3  # 50 windows; the tail shorter than a window is never used
    n_windows, seed = 50, 11
    starts = [epoch_window_starts(n_tokens, SEQ, seed, step, range(global_batch), global_batch)
              for step in range(2 * n_windows // global_batch + 1)]
    flat = np.concatenate(starts)
    first, second = flat[:n_windows], flat[n_windows:2 * n_windows]
    assert sorted(first.tolist()) == sorted(second.tolist()) == [w * SEQ for w in range(n_windows)]
    assert first.tolist() != second.tolist()  # each epoch its own order
    assert first.tolist() != sorted(first.tolist())


def test_window_orders_depend_only_on_seed_step_and_index():
    """What makes resume exact and 1 or N processes equal: any subset of indices, asked in any
    split, gets the windows the whole batch would."""
    tokens = np.arange(1000, dtype=np.uint16)
    for order in WINDOW_ORDERS:
        draw = window_sampler(order, tokens, SEQ, seed=3, global_batch=8)
        whole = draw(5, range(8))
        rank0, rank1 = draw(5, [0, 1, 4, 5]), draw(5, [2, 3, 6, 7])
        assert torch.equal(whole[[0, 1, 4, 5]], rank0) and torch.equal(whole[[2, 3, 6, 7]], rank1)
        assert torch.equal(whole, window_sampler(order, tokens, SEQ, seed=3, global_batch=8)(5, range(8)))
        assert not torch.equal(whole, draw(6, range(8)))
        assert ((whole[:, 1:] - whole[:, :-1]) == 1).all()  # contiguous windows
    random = window_sampler("random", tokens, SEQ, seed=3, global_batch=8)(5, range(8))
    assert torch.equal(random, sample_windows(tokens, SEQ, seed=3, step=5, indices=range(8)))
    epoch = window_sampler("epoch", tokens, SEQ, seed=3, global_batch=8)(5, range(8))
    assert (epoch[:, 0] % SEQ == 0).all()  # non-overlapping windows


def test_orders_are_declared_once_and_checked():
    tokens = np.arange(100, dtype=np.uint16)
    for order in WINDOW_ORDERS:
        window_sampler(order, tokens, SEQ, seed=0, global_batch=2)
    with pytest.raises(UserError, match="data.order"):
        window_sampler("sorted", tokens, SEQ, seed=0, global_batch=2)
    with pytest.raises(UserError, match="data.order='sorted' is not one of"):
        config_from_dict({"data": {"order": "sorted"}})
    with pytest.raises(UserError, match="fewer than one window"):
        window_sampler("epoch", tokens[:5], SEQ, seed=0, global_batch=2)(0, [0])


def test_epoch_order_resumes_bit_for_bit(tiny_data, tmp_path):
    def config(out, steps, **train_):
        cfg = tiny_train_config(tiny_data, out, steps=steps, **train_)
        cfg.data.order = "epoch"
        return cfg

    straight = train(config(tmp_path / "a", 6))
    train(config(tmp_path / "b", 3))
    resumed = train(config(tmp_path / "b", 6, resume=True))
    assert losses(tmp_path / "a") == losses(tmp_path / "b")
    wa, wb = ckpt.load_weights(straight["checkpoint"]), ckpt.load_weights(resumed["checkpoint"])
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    train(tiny_train_config(tiny_data, tmp_path / "random", steps=6))
    assert losses(tmp_path / "a") != losses(tmp_path / "random")  # the order reaches the trainer
    with pytest.raises(UserError, match="order"):  # another order is another trajectory
        train(tiny_train_config(tiny_data, tmp_path / "b", steps=9, resume=True))
