"""Probes of the copy task (sinkdlm.eval.probes) against hand-computed cases and a direct loop."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from sinkdlm.data.synthetic import NO_SOURCE, CopyRule
from sinkdlm.eval import probes
from sinkdlm.model import DLM
from tests.conftest import tiny

TASK = CopyRule("bigram-backcopy", triggers=[1], eos=9)
WINDOWS = torch.tensor([[1, 5, 1, 5, 2, 1, 6, 3, 4, 1, 4, 9, 1, 6, 2, 1],
                        [3, 1, 3, 7, 1, 7, 1, 7, 8, 1, 8, 2, 5, 1, 5, 9]])


class Fixed(nn.Module):
    """A 'model' whose logits are given: the true tokens (an oracle) or one constant guess."""

    def __init__(self, vocab: int, answer: torch.Tensor | None = None, guess: int = 0):
        super().__init__()
        self.mask_id, self.vocab, self.answer, self.guess = vocab, vocab, answer, guess
        self.weight = nn.Parameter(torch.zeros(1))

    def forward(self, idx):
        target = self.answer if self.answer is not None else torch.full_like(idx, self.guess)
        return F.one_hot(target, self.vocab).float() * 10.0


def test_bin_levels_are_midpoints():
    assert probes.bin_levels(2, 2) == [[0.125, 0.375], [0.625, 0.875]]
    assert len(probes.bin_levels()) == 5 and probes.bin_levels()[0][0] == pytest.approx(0.0125)


def hand_active(masked: torch.Tensor) -> set[tuple[int, int]]:
    """Backcopy's active queries written out: t masked, t-1 a visible trigger, t-2 a visible non-trigger,
    not EOS, and no EOS between (the only EOS here is at row 0, position 11)."""
    out = set()
    for r in range(WINDOWS.shape[0]):
        for t in range(2, WINDOWS.shape[1]):
            w = WINDOWS[r].tolist()
            if masked[r, t] and not masked[r, t - 1] and not masked[r, t - 2] and w[t - 1] == 1 \
                    and w[t - 2] not in (1, 9) and w[t] != 9:
                out.add((r, t))
    return out


def test_copy_accuracy_counts_active_queries_only():
    seen = 0
    for seed in range(10):
        noisy, masked = probes.masked_windows(WINDOWS, 0.5, seed=seed, mask_id=10)
        sources = probes.active_sources(WINDOWS, masked, TASK)
        active = sources != NO_SOURCE
        assert set(map(tuple, active.nonzero().tolist())) == hand_active(masked)
        assert all(sources[r, t] == t - 2 for r, t in active.nonzero().tolist())
        n = int(active.sum())
        assert probes.copy_accuracy(Fixed(10, WINDOWS), WINDOWS, TASK, 0.5, seed=seed) == (n, n)
        fives = int((WINDOWS[active] == 5).sum())  # a constant guess of 5 is right exactly where 5 is copied
        assert probes.copy_accuracy(Fixed(10, guess=5), WINDOWS, TASK, 0.5, seed=seed) == (fives, n)
        seen += n
    assert seen >= 5


def test_elbo_by_bin_matches_a_direct_loop():
    model = Fixed(10, guess=0)
    got = probes.elbo_by_bin(model, WINDOWS, seed=1, bins=2, per_bin=2)
    for b, levels in enumerate([[0.125, 0.375], [0.625, 0.875]]):
        values = []
        for t in levels:
            noisy, masked = probes.masked_windows(WINDOWS, t, 1, 10)
            logp = torch.log_softmax(model(noisy), -1)
            nll = -logp.gather(-1, WINDOWS[..., None])[..., 0]
            values.append(sum(float(nll[r, c]) for r, c in masked.nonzero().tolist()) / t / WINDOWS.numel())
        assert got[b] == pytest.approx(sum(values) / 2, rel=1e-6)


def test_gu_rates_by_hand():
    # one window, 2 heads, 2 queries, 3 keys (sink, a [MASK], content): head 0 sinks on the sink key
    probs = torch.tensor([[[[0.8, 0.1, 0.1], [0.6, 0.2, 0.2]],
                           [[0.3, 0.4, 0.3], [0.4, 0.3, 0.3]]]])
    types = torch.tensor([[probes.KEY_TYPES.index("sink"), probes.KEY_TYPES.index("mask"),
                           probes.KEY_TYPES.index("content")]])
    rates = probes.gu_rates(probs, types, epsilon=0.3)
    # head 0: mean 0.7 on the sink; head 1: its top mean is 0.35 on key 0, also > 0.3
    assert rates["rate"] == 1.0 and rates["rate_sink"] == 1.0 and rates["max_key_attention"] == pytest.approx(0.7)
    rates = probes.gu_rates(probs, types, epsilon=0.5)
    assert rates["rate"] == 0.5 and rates["rate_sink"] == 0.5 and rates["rate_mask"] == 0.0


def test_head_attention_by_hand():
    # 1 window of 3 content tokens after 1 sink; positions 1, 2 masked; 2 is active (copies position 0)
    noisy = torch.tensor([[4, 10, 10]])
    sources = torch.tensor([[NO_SOURCE, NO_SOURCE, 0]])
    probs = torch.tensor([[[[0.1, 0.3, 0.3, 0.3],
                            [0.5, 0.1, 0.2, 0.2],     # dormant: 0.5 on the sink; 0.4 on the 2 masks
                            [0.05, 0.9, 0.025, 0.025]]]])  # active: 0.9 on its source (content 0)
    norms = torch.tensor([[[1.0, 2.0, 3.0, 2.0]]])
    out = probes.head_attention(probs, norms, noisy, sources, n_sink=1, mask_id=10)
    assert out["active_on_source"].item() == pytest.approx(0.9)
    assert out["active_on_sink"].item() == pytest.approx(0.05)
    assert out["dormant_on_sink"].item() == pytest.approx(0.5)
    assert out["dormant_mask_ratio"].item() == pytest.approx(0.4 / (2 / 4))  # uniform share 2 of 4 keys
    assert out["sink_value_ratio"].item() == pytest.approx(1.0 / 2.0)


def test_probe_on_a_real_model_and_batch_invariance():
    torch.manual_seed(0)
    model = DLM(tiny(vocab_size=10, sink_tokens=1)).eval()
    task = CopyRule("bigram-backcopy", [1], eos=9)
    out = probes.probe(model, WINDOWS, task, levels=(0.5,), seed=2)
    level = out["levels"]["0.5"]
    assert len(level["layers"]) == model.cfg.n_layer
    for layer in level["layers"]:
        by_type = sum(layer[f"rate_{name}"] for name in probes.KEY_TYPES)
        assert by_type == pytest.approx(layer["rate"]) and 0 < layer["sink_share"] < 1
        assert layer["uniform_share"] == pytest.approx(1 / 17)
    assert 0 <= level["copy_accuracy"] <= 1 and level["active_queries"] > 0
    # a window's attention does not depend on its batch mates (float32, reduction order: 1e-6)
    noisy, _ = probes.masked_windows(WINDOWS, 0.5, 2, model.mask_id)
    both = probes.attention_maps(model, noisy)[0][1][0]
    alone = probes.attention_maps(model, noisy[:1])[0][1][0]
    assert torch.allclose(both, alone, atol=1e-6)
    assert not math.isnan(level["copy_head"]["active_on_source"])


def test_probe_command_on_a_trained_run_caches_per_checkpoint(tmp_path, monkeypatch, capsys):
    from sinkdlm.cli import main
    from sinkdlm.training.trainer import train
    from tests.conftest import small_synthetic_corpus, tiny_train_config

    data = small_synthetic_corpus(tmp_path, monkeypatch)
    run = tmp_path / "run"
    train(tiny_train_config(data, run, steps=4, save_every=2, val_every=2, keep_last=0, sink_monitor_every=0))
    logged = [row for row in map(json.loads, (run / "metrics.jsonl").read_text().splitlines()) if "val_loss" in row]
    assert [row["step"] for row in logged] == [2, 4]  # every validation logs the copy task's numbers too
    assert all(set(row["copy_accuracy"]) == {str(x) for x in probes.MASK_LEVELS} for row in logged)
    assert all(len(row["elbo_bins"]) == probes.ELBO_BINS for row in logged)
    assert main(["probe", str(run), "--windows", "4"]) == 0
    table = capsys.readouterr().out
    assert table.count("| run | 2 |") == 1 and table.count("| run | 4 |") == 1
    cached = json.loads((run / probes.PROBE_CACHE).read_text())
    assert sorted(cached["checkpoints"]) == ["step-00000002", "step-00000004"]
    assert len(cached["checkpoints"]["step-00000004"]["elbo_bins"]) == probes.ELBO_BINS
    monkeypatch.setattr(probes, "probe_checkpoint", lambda *a, **k: pytest.fail("probed again"))
    assert main(["probe", str(run), "--windows", "4", "--level", "0.5"]) == 0
    assert main(["probe", str(run), "--level", "0.3"]) == 2
