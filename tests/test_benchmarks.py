"""The benchmark helpers' arithmetic (not timings): statistics, FLOPs, saved-activation bytes."""

import math

import torch

from benchmarks import bench_train, common
from sinkdlm.config import model_preset
from sinkdlm.model import DLM


def test_stats_and_paired_ratio_are_exact():
    s = common.Stats.of([4.0, 1.0, 3.0, 2.0, 5.0])
    assert (s.median, s.q1, s.q3, s.min, s.max, s.n) == (3.0, 2.0, 4.0, 1.0, 5.0, 5)
    r = common.paired_ratio([2.0, 6.0, 3.0], [1.0, 2.0, 3.0])
    assert (r.median, r.min, r.max) == (2.0, 1.0, 3.0)


def test_time_interleaved_runs_in_rounds():
    order = []
    fns = {name: (lambda n=name: order.append(n)) for name in "abc"}
    samples = common.time_interleaved(fns, repeats=2, warmup=1, device=torch.device("cpu"), clock="cpu")
    assert order == list("abc") * 3
    assert {k: len(v) for k, v in samples.items()} == {"a": 2, "b": 2, "c": 2}


def test_saved_activation_bytes_counts_storages_once_and_skips_parameters():
    w = torch.nn.Parameter(torch.ones(1000))
    x = torch.ones(1000)

    def step():
        y = (w * x).exp()  # mul saves x (w is a parameter, not counted); exp saves its output y
        (y * w).sum()      # saves y again (same storage, counted once) and w (a parameter)

    assert common.saved_activation_bytes(step, exclude=[w]) == 2 * 1000 * 4


def test_train_flops_formula():
    cfg = model_preset("tiny", vocab_size=50, sink_tokens=1)
    model = DLM(cfg)
    linear = cfg.n_layer * (4 * cfg.n_embd**2 + 3 * cfg.n_embd * cfg.intermediate_size) + 50 * cfg.n_embd
    assert bench_train.matmul_params(model) == linear
    b, t = 3, 16
    attention = 12 * cfg.n_layer * cfg.n_head * cfg.head_size * t * (t + 1) * b
    assert bench_train.train_flops(model, b, t) == 6 * linear * b * t + attention


def test_every_train_step_variant_backpropagates_and_the_two_sink_paths_agree():
    """Each benchmarked variant's step gives a finite loss and a gradient on every parameter; the
    variants differ in architecture, so only the two sink paths (same weights, same batch) must agree."""
    models, losses = {}, {}
    for name in bench_train.VARIANTS:
        cfg = model_preset("tiny", vocab_size=50, **bench_train.VARIANTS[name])
        models[name], step = bench_train.make_step(cfg, batch=2, device=torch.device("cpu"), dtype=torch.float32)
        losses[name] = step().item()
        assert math.isfinite(losses[name]), name
        for param_name, param in models[name].named_parameters():
            assert param.grad is not None and param.grad.abs().sum() > 0, (name, param_name)
    assert abs(losses["sink-fast"] - losses["sink-dense"]) < 1e-5  # fp32 summation order only
    dense = dict(models["sink-dense"].named_parameters())
    for param_name, param in models["sink-fast"].named_parameters():
        assert torch.allclose(param.grad, dense[param_name].grad, atol=1e-5), param_name


def test_generation_agreement_and_answer_accuracy():
    from benchmarks import bench_generate

    assert bench_generate.agreement([[1, 2, 3], [4, 5]], [[1, 9, 3], [4, 5]]) == 4 / 5

    class Digits:  # token i decodes to the digit i; 0 is EOS (skipped)
        def decode(self, tokens, skip_special_tokens=True):
            return "".join(str(t) for t in tokens if t)

    assert bench_generate.accuracy([[4, 2], [4, 0], [7]], ["42", "4", "8"], Digits()) == 2 / 3
