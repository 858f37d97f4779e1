"""Import of HF Llama/Qwen2 models: exact causal parity, a trainable bidirectional sink model, export
round trip, and one-line errors for bad input. Tiny random models built locally, nothing downloaded."""

import dataclasses
import sys

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from sinkdlm import diffusion  # noqa: E402
from sinkdlm.checkpoint import load_config_of, load_meta, load_model, load_tokenizer  # noqa: E402
from sinkdlm.cli import main  # noqa: E402
from sinkdlm.errors import UserError  # noqa: E402
from sinkdlm.interop.convert import convert_hf, model_config  # noqa: E402
from sinkdlm.model import DLM  # noqa: E402

VOCAB = 100
PARITY_TOL = 1e-4  # fp32: same maths, different kernel order
SIZES = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=64, vocab_size=VOCAB, rms_norm_eps=1e-5, rope_theta=5000.0)


def hf_model(kind: str, tie: bool, **overrides):
    """A random HF model with every parameter perturbed (so biases and norms are not 0 / 1)."""
    config_cls, model_cls = {"llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
                             "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM)}[kind]
    config = config_cls(**{**SIZES, "tie_word_embeddings": tie, "bos_token_id": 1, **overrides})
    torch.manual_seed(0)
    model = model_cls._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return model


def hf_tokenizer(n_tokens: int = VOCAB):
    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", unk_token="<unk>")


def save_hf(tmp_path, model, tokenizer=None):
    folder = tmp_path / "hf"
    model.save_pretrained(folder)
    (tokenizer or hf_tokenizer()).save_pretrained(folder)
    return folder


def causal_dlm(weights, cfg):
    model = DLM(dataclasses.replace(cfg, causal=True))
    model.load_state_dict(weights, strict=True)
    return model.eval()


@pytest.mark.parametrize("kind,tie", [("llama", False), ("qwen2", True), ("qwen2", False)])
def test_causal_logits_match_hf(kind, tie):
    hf = hf_model(kind, tie)
    weights, cfg = convert_hf(hf, hf_tokenizer())
    assert cfg.qkv_bias == (kind == "qwen2") and cfg.tie_embeddings == tie and not cfg.causal
    assert cfg.kv_heads == 2 and cfg.rope_base == 5000.0 and cfg.norm_eps == 1e-5
    idx = torch.randint(0, VOCAB, (2, 16))
    with torch.no_grad():
        ours, theirs = causal_dlm(weights, cfg)(idx), hf(idx).logits
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max() < PARITY_TOL


def test_mask_row_is_the_mean_embedding_and_never_predicted():
    hf = hf_model("qwen2", tie=True)
    weights, cfg = convert_hf(hf, hf_tokenizer(80))
    wte = hf.model.embed_tokens.weight
    assert weights["wte.weight"].shape == (VOCAB + 1, 32)
    assert torch.equal(weights["wte.weight"][-1], wte[:80].mean(0))  # real tokens only, not padding rows
    assert causal_dlm(weights, cfg)(torch.tensor([[cfg.mask_id, 3]])).shape[-1] == VOCAB


def test_sink_model_is_bidirectional_and_trains_a_step():
    weights, cfg = convert_hf(hf_model("llama", tie=False), sink_tokens=1, sink_init="bos")
    assert torch.equal(weights["sink"][0], weights["wte.weight"][1])
    model = DLM(cfg)
    model.load_state_dict(weights, strict=True)
    x = torch.randint(0, VOCAB, (2, 16))
    x_late = x.clone()
    x_late[:, -1] = (x[:, -1] + 1) % VOCAB
    with torch.no_grad():  # bidirectional: a change at the end reaches the first position
        assert not torch.allclose(model(x)[:, 0], model(x_late)[:, 0])
    p = diffusion.noise_level(diffusion.draw_t(0, 0, [0, 1], 2), 1e-3)
    noisy, masked = diffusion.mask_tokens(x, p, diffusion.draw_uniforms(0, 0, [0, 1], 16), model.mask_id)
    loss = diffusion.elbo_loss(model(noisy), x, masked, p, diffusion.pretrain_weights(x))
    loss.backward()
    assert torch.isfinite(loss) and model.sink.grad.abs().sum() > 0
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)


def test_cli_convert_folder_then_export_round_trips(tmp_path):
    hf = hf_model("llama", tie=True)  # a qwen2 folder makes AutoTokenizer rebuild our toy tokenizer
    folder = save_hf(tmp_path, hf)
    out = tmp_path / "dlm"
    assert main(["convert", "--from", str(folder), "--out", str(out), "--sink-tokens", "2"]) == 0
    model, cfg = load_model(out)
    assert cfg.model.sink_tokens == 2 and load_meta(out)["eos_id"] == 0
    assert load_tokenizer(out).encode("w5 w7").ids == [5, 7]
    weights = {k: v for k, v in model.state_dict().items() if k != "sink"}
    idx = torch.randint(0, VOCAB, (1, 8))
    parity_model = causal_dlm(weights, dataclasses.replace(cfg.model, sink_tokens=0))
    with torch.no_grad():
        assert (parity_model(idx) - hf(idx).logits).abs().max() < PARITY_TOL

    published = tmp_path / "published"
    assert main(["export", "--checkpoint", str(out), "--out", str(published)]) == 0
    assert {"config.json", "model.safetensors", "tokenizer.json", "README.md"} <= {p.name for p in published.iterdir()}
    again, cfg_again = load_model(published)
    assert cfg_again == cfg and load_config_of(published) == cfg
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys() and all(torch.equal(state[k], state_again[k]) for k in state)
    card = (published / "README.md").read_text()
    assert "sink x2 (front); sink init" in card and "0 diffusion training steps" in card
    assert main(["export", "--checkpoint", str(out), "--out", str(published)]) == 2  # not empty


def expect_cli_error(capsys, argv, fragment):
    capsys.readouterr()
    assert main(argv) == 2
    lines = capsys.readouterr().err.strip().splitlines()  # transformers' progress bars may come first
    errors = [line for line in lines if line.startswith("sinkdlm")]
    assert errors == lines[-1:] and fragment in lines[-1]


def test_unsupported_architecture(tmp_path, capsys):
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=VOCAB))
    with pytest.raises(UserError, match="not supported"):
        convert_hf(gpt2)
    expect_cli_error(capsys, ["convert", "--from", str(save_hf(tmp_path, gpt2)), "--out", str(tmp_path / "o")],
                     "model_type 'gpt2' is not supported")


def test_unsupported_rope_scaling():
    config = transformers.LlamaConfig(**SIZES, rope_scaling={"rope_type": "linear", "factor": 2.0})
    with pytest.raises(UserError, match="RoPE scaling 'linear'"):
        model_config(config)


def test_missing_weights(tmp_path, capsys):
    folder = save_hf(tmp_path, hf_model("llama", tie=False))
    weights = load_file(folder / "model.safetensors")
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    expect_cli_error(capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "o")], "missing weights")


def test_weights_of_the_wrong_shape_are_named_in_one_line(tmp_path, capsys):
    """Right names, wrong shapes: not transformers' ignore_mismatched_sizes traceback."""
    folder = save_hf(tmp_path, hf_model("llama", tie=False))
    weights = load_file(folder / "model.safetensors")
    weights["model.layers.1.mlp.up_proj.weight"] = torch.zeros(48, SIZES["hidden_size"])
    save_file(weights, folder / "model.safetensors", metadata={"format": "pt"})
    expect_cli_error(capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "o")],
                     "weight model.layers.1.mlp.up_proj.weight has shape (48, 32) but config.json implies (64, 32)")
    assert not (tmp_path / "o").exists()


def test_tokenizer_larger_than_vocab(tmp_path, capsys):
    folder = save_hf(tmp_path, hf_model("llama", tie=True), hf_tokenizer(VOCAB + 5))
    expect_cli_error(capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "o")],
                     f"the tokenizer has {VOCAB + 5} tokens")


def test_gguf_without_the_gguf_package(tmp_path, capsys, monkeypatch):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"GGUF")
    monkeypatch.setitem(sys.modules, "gguf", None)  # makes `import gguf` raise ImportError
    expect_cli_error(capsys, ["convert", "--from", str(fake), "--out", str(tmp_path / "o")],
                     'needs `gguf`, which is not installed; install the `convert` extra: pip install -e ".[convert]"')


def test_known_gguf_checks_its_loaders_before_downloading(tmp_path, capsys, monkeypatch):
    import sinkdlm.interop.convert as converter

    monkeypatch.setitem(sys.modules, "accelerate", None)
    monkeypatch.setattr(converter, "fetch_known_gguf", lambda *a: pytest.fail("downloaded before checking accelerate"))
    expect_cli_error(capsys, ["convert", "--from", "smollm2-135m", "--out", str(tmp_path / "o")],
                     "needs `accelerate`")


def test_transformers_older_than_the_bound_is_one_line(tmp_path, capsys, monkeypatch):
    """transformers 4.55 has no from_pretrained(dtype=): refuse it before it fails with a TypeError."""
    import importlib.metadata

    folder = save_hf(tmp_path, hf_model("llama", tie=True), hf_tokenizer())
    real_version = importlib.metadata.version
    monkeypatch.setattr(importlib.metadata, "version",
                        lambda name: "4.55.4" if name == "transformers" else real_version(name))
    expect_cli_error(capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "o")],
                     "needs transformers>=4.56, but 4.55.4 is installed")


def test_not_a_model_folder(tmp_path, capsys):
    expect_cli_error(capsys, ["convert", "--from", str(tmp_path), "--out", str(tmp_path / "o")], "no config.json")


def test_a_folder_of_pickled_weights_only_is_refused_without_unpickling(tmp_path, capsys, monkeypatch):
    """A pytorch_model.bin is a pickle: refused in one line, and torch.load is never called (also when
    the folder check is bypassed: transformers is asked for safetensors only)."""
    import sinkdlm.interop.convert as converter

    hf = hf_model("llama", tie=True)
    folder = save_hf(tmp_path, hf)
    (folder / "model.safetensors").unlink()
    torch.save(hf.state_dict(), folder / "pytorch_model.bin")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("a pickled weights file was loaded"))
    expect_cli_error(capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "o")],
                     "pickled weights (pytorch_model.bin")
    monkeypatch.setattr(converter.hf_folder, "weight_files", lambda path: [])
    expect_cli_error(capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "o")], "could not load")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("flags", [["--tokenizer", "x"], ["--n-head", "4"], ["--tokenizer", "x", "--n-head", "4"]])
def test_smdm_only_flags_are_refused_for_other_sources(flags, tmp_path, capsys):
    folder = save_hf(tmp_path, hf_model("llama", tie=True))
    expect_cli_error(capsys, ["convert", "--from", str(folder), "--out", str(tmp_path / "o"), *flags],
                     f"{' and '.join(flags[::2])} appl{'y' if len(flags) > 2 else 'ies'} only to SMDM files")
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("block_size,expected", [(None, 2048), (512, 512), (10**6, 8192)])
def test_a_causal_lm_records_2048_unless_asked_capped_at_its_own(block_size, expected):
    """A causal LM's own context (32k for Qwen2.5) is not the length its diffusion adaptation uses."""
    config = transformers.LlamaConfig(**SIZES, max_position_embeddings=8192)
    assert model_config(config, block_size=block_size).block_size == expected


def adapt_args(*argv):
    from sinkdlm.cli import parse_args
    from sinkdlm.training.recipes import adapt_config, shortcuts_of

    args = parse_args(["adapt", *argv])
    return adapt_config(args.init_from, args.config, args.overrides, **shortcuts_of(args))


def test_adapt_takes_the_model_from_the_checkpoint(tmp_path):
    from sinkdlm.interop.convert import save_converted

    weights, cfg = convert_hf(hf_model("qwen2", tie=True), sink_tokens=1)
    ckpt = save_converted(tmp_path / "dlm", weights, cfg, hf_tokenizer(), "test")
    adapted = adapt_args("--init-from", str(tmp_path / "dlm"), "--data", "prepared", "train.max_steps=3")
    assert adapted.model == cfg and adapted.train.init_from == str(ckpt) and adapted.data.path == "prepared"
    with pytest.raises(UserError, match="model.sink_tokens=0 but the checkpoint"):
        adapt_args("--init-from", str(ckpt), "model.sink_tokens=0")


@pytest.mark.parametrize("recipe,tokens", [("adapt_qwen2.5-0.5b", 30e9), ("adapt_qwen2.5-1.5b", 100e9),
                                           ("adapt_smollm2", None)])
def test_adaptation_recipes_load(recipe, tokens):
    from pathlib import Path

    from sinkdlm.config import load_config

    cfg = load_config(Path(__file__).parents[1] / "configs" / f"{recipe}.yaml")
    assert (cfg.optim.lr, cfg.optim.min_lr) == (1e-4, 1e-5)
    if tokens:  # the paper's budget, to within one step
        assert abs(cfg.steps() * cfg.train.global_batch * cfg.seq_len - tokens) <= cfg.train.global_batch * cfg.seq_len


def test_convert_records_the_chat_template_and_serve_and_export_read_it(tmp_path):
    """tokenizer.json holds no chat template: convert keeps the source tokenizer's in meta.json, `sinkdlm
    serve` answers chat with it, and an export writes it into tokenizer_config.json."""
    import json

    from sinkdlm.checkpoint import chat_settings
    from sinkdlm.interop.convert import save_converted
    from sinkdlm.interop.export import export
    from sinkdlm.serve.text import chat_template

    template = "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% endfor %}"
    tokenizer = hf_tokenizer()
    tokenizer.chat_template = template
    weights, cfg = convert_hf(hf_model("llama", tie=False))
    ckpt = save_converted(tmp_path / "dlm", weights, cfg, tokenizer, "test")
    assert chat_settings(ckpt) == {"chat_template": template}
    assert chat_template(ckpt, None) == (template, "")
    folder = export(ckpt, tmp_path / "export")
    assert json.loads((folder / "tokenizer_config.json").read_text())["chat_template"] == template
    assert chat_template(folder, None) == (template, "")
    plain = save_converted(tmp_path / "plain", weights, cfg, hf_tokenizer(), "test")  # no template: none
    assert chat_settings(plain) == {} and chat_template(plain, None) == (None, "")
