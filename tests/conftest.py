import pytest
import torch

from sinkdlm.config import ModelConfig, model_preset


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(1)  # tiny models: threads only add overhead, worse on a shared CPU


def tiny(**overrides) -> ModelConfig:
    """The `tiny` preset with a small vocabulary, for tests that take milliseconds."""
    return model_preset("tiny", **{"vocab_size": 50, **overrides})


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory):
    """A prepared corpus of synthetic sentences (BPE 300), shared by the trainer tests."""
    import numpy as np

    from sinkdlm.data.prepare import prepare

    rng = np.random.default_rng(0)
    words = "the cat sat on a mat while seven kings sang of night and day under stars".split()
    corpus = tmp_path_factory.mktemp("corpus")
    for i in range(20):
        (corpus / f"doc{i:02}.txt").write_text(" ".join(rng.choice(words, size=300)) + ".")
    return prepare(str(corpus), tmp_path_factory.mktemp("data") / "tiny", "bpe:300", val_fraction=0.1,
                   progress=False)


def tiny_train_config(data, out, steps=6, **train):
    """A seconds-long pretraining config on `tiny_data`."""
    from sinkdlm.config import config_from_dict

    return config_from_dict({
        "model": {"preset": "tiny", "sink_tokens": 1},
        "data": {"path": str(data), "seq_len": 32, "val_windows": 8},
        "optim": {"lr": 1e-3, "warmup_min_steps": 2},
        "train": {"out_dir": str(out), "global_batch": 4, "micro_batch": 2, "max_steps": steps,
                  "log_every": 1, "val_every": 3, "save_every": 3, "sink_monitor_every": 3,
                  "progress": False, **train},
    })


def small_synthetic_corpus(tmp_path, monkeypatch, spec="synthetic:bigram-backcopy:length=31,k=2,vocab=8,docs=60"):
    """A small synthetic copy-task corpus prepared into tmp_path/data from test_synthetic's short text
    (its character bigram replaces the demo corpus's)."""
    from sinkdlm.data import synthetic
    from sinkdlm.data.prepare import prepare
    from tests.test_synthetic import TEXT

    monkeypatch.setattr(synthetic, "demo_text", lambda: TEXT)
    synthetic.bigram_model.cache_clear()
    try:
        return prepare(spec, tmp_path / "data", val_fraction=0.2, progress=False)
    finally:
        synthetic.bigram_model.cache_clear()
