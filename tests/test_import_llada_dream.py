"""Import of LLaDA and Dream folders: tiny random models saved in their original naming and config
format, converted, and compared with an independent forward written here from each model's own
modelling code (LLaDA's modeling_llada.py, Dream's modeling_dream.py + the logit shift of its
generation_utils.py). Then the converted checkpoint runs generate, eval, eval-gsm8k and analyze.
Nothing is downloaded."""

import dataclasses
import json
import math
import os
import sys

import pytest
import torch
import torch.nn.functional as F

os.environ.setdefault("HF_DATASETS_OFFLINE", "1")  # before lm-eval (eval test) imports `datasets`
os.environ.setdefault("HF_HUB_OFFLINE", "1")

pytest.importorskip("transformers")  # tokenizer files are read with transformers' classes
from safetensors.torch import save_file  # noqa: E402
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402

from sinkdlm.checkpoint import load_config_of, load_meta, load_model, load_tokenizer, load_weights  # noqa: E402
from sinkdlm.cli import main  # noqa: E402
from sinkdlm.config import ModelConfig  # noqa: E402
from sinkdlm.errors import UserError  # noqa: E402
from sinkdlm.model import DLM  # noqa: E402

PARITY_TOL = 1e-5  # fp32, same maths in another order (observed up to ~7e-6 with logits of size ~10)
TEXT = ["Question: Which is a planet?\nAnswer: Mars", "The cat sat on the mat.", "Sarah ran home fast.",
        "Natalia sold 48 clips in April and half as many in May."] * 4
SPECIALS = ["<|endoftext|>", "<|mask|>"]
EOS_ID, MASK_ID = 0, 1  # the mask is a vocabulary row, as LLaDA's 126336 and Dream's 151666
BPE_VOCAB = 300
VOCAB = 320  # embedding rows: the tokenizer's plus padding rows, as in the published models
WIDTH, HEADS, LAYERS, MLP = 64, 4, 2, 96
HEAD_DIM = WIDTH // HEADS


def byte_bpe() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=BPE_VOCAB, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(TEXT, trainer)
    return tok


def random_weights(shapes: dict[str, tuple[int, ...]], seed: int) -> dict[str, torch.Tensor]:
    """Every tensor random, norms around 1 and biases around 0, so none of them is a no-op."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in shapes.items():
        noise = torch.randn(shape, generator=gen)
        out[name] = 1 + 0.2 * noise if "norm" in name or name.endswith("ln_f.weight") else 0.2 * noise
    return out


def save_sharded(folder, weights):
    """Two safetensors shards and model.safetensors.index.json, as the 8B models ship."""
    names = sorted(weights)
    shards = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    for file, keys in shards.items():
        save_file({k: weights[k].contiguous() for k in keys}, str(folder / file))
    index = {"metadata": {}, "weight_map": {k: file for file, keys in shards.items() for k in keys}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


# ----------------------------------------------------------------------------------------------
# LLaDA: config keys and parameter names of GSAI-ML/LLaDA-8B-Base, tiny sizes

def llada_config(**overrides):
    return {"model_type": "llada", "architectures": ["LLaDAModelLM"], "d_model": WIDTH, "n_heads": HEADS,
            "n_kv_heads": HEADS, "multi_query_attention": None, "n_layers": LAYERS, "mlp_hidden_size": MLP,
            "mlp_ratio": 4, "activation_type": "silu", "block_type": "llama", "block_group_size": 1,
            "layer_norm_type": "rms", "layer_norm_with_affine": True, "rms_norm_eps": 1e-5,
            "bias_for_layer_norm": False, "include_bias": False, "include_qkv_bias": False,
            "attention_layer_norm": False, "alibi": False, "rope": True, "rope_theta": 500000.0,
            "rope_full_precision": True, "input_emb_norm": False, "scale_logits": False, "weight_tying": False,
            "vocab_size": VOCAB, "embedding_size": VOCAB, "max_sequence_length": 4096,
            "mask_token_id": MASK_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, **overrides}


def llada_shapes(c):
    kv = c["n_kv_heads"] * HEAD_DIM
    p = "model.transformer."
    shapes = {f"{p}wte.weight": (VOCAB, WIDTH), f"{p}ln_f.weight": (WIDTH,)}
    if not c["weight_tying"]:
        shapes[f"{p}ff_out.weight"] = (VOCAB, WIDTH)
    for i in range(LAYERS):
        b = f"{p}blocks.{i}."
        shapes.update({f"{b}attn_norm.weight": (WIDTH,), f"{b}ff_norm.weight": (WIDTH,),
                       f"{b}q_proj.weight": (WIDTH, WIDTH), f"{b}k_proj.weight": (kv, WIDTH),
                       f"{b}v_proj.weight": (kv, WIDTH), f"{b}attn_out.weight": (WIDTH, WIDTH),
                       f"{b}ff_proj.weight": (MLP, WIDTH), f"{b}up_proj.weight": (MLP, WIDTH),
                       f"{b}ff_out.weight": (WIDTH, MLP)})
        if c["include_qkv_bias"]:
            shapes.update({f"{b}q_proj.bias": (WIDTH,), f"{b}k_proj.bias": (kv,), f"{b}v_proj.bias": (kv,)})
    return shapes


def llada_folder(root, **overrides):
    """A LLaDA-8B-style folder: config.json, sharded safetensors, tokenizer.json + tokenizer_config.json."""
    folder = root / "LLaDA-tiny"
    folder.mkdir()
    c = llada_config(**overrides)
    (folder / "config.json").write_text(json.dumps(c))
    byte_bpe().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "PreTrainedTokenizerFast", "eos_token": SPECIALS[EOS_ID]}))
    weights = random_weights(llada_shapes(c), seed=1)
    save_sharded(folder, weights)
    return folder, c, weights


def rms_norm(x, weight, eps):
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rope(t, theta):
    """Rotate-halves RoPE over the head dim at positions 0..T-1 (LLaDA's RotaryEmbedding, Dream's
    apply_rotary_pos_emb)."""
    d = t.shape[-1]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2).float() / d)
    angles = torch.outer(torch.arange(t.shape[-2]).float(), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    first, second = t[..., : d // 2], t[..., d // 2:]
    return t * angles.cos() + torch.cat([-second, first], dim=-1) * angles.sin()


def attention(q, k, v, n_kv, mask):
    """Bidirectional attention, 1/sqrt(head_dim), each key/value head shared by n_heads/n_kv queries;
    mask (B, T), 1 = real: padding keys get -inf (LLaDA's and Dream's attention_mask bias)."""
    k, v = (t.repeat_interleave(q.shape[1] // n_kv, dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    return torch.softmax(scores.masked_fill(~mask.bool()[:, None, None, :], -math.inf), dim=-1) @ v


def heads(x, n):
    return x.view(x.shape[0], x.shape[1], n, HEAD_DIM).transpose(1, 2)


def llada_reference(w, c, idx, mask):
    """LLaDAModelLM.forward with LLaDALlamaBlock, written from modeling_llada.py."""
    p, eps, n_kv = "model.transformer.", c["rms_norm_eps"], c["n_kv_heads"]
    x = w[f"{p}wte.weight"][idx]
    for i in range(c["n_layers"]):
        b = f"{p}blocks.{i}."
        h = rms_norm(x, w[f"{b}attn_norm.weight"], eps)
        q, k, v = (F.linear(h, w[f"{b}{n}_proj.weight"], w.get(f"{b}{n}_proj.bias")) for n in "qkv")
        q, k = rope(heads(q, HEADS), c["rope_theta"]), rope(heads(k, n_kv), c["rope_theta"])
        att = attention(q, k, heads(v, n_kv), n_kv, mask).transpose(1, 2).reshape(x.shape)
        x = x + att @ w[f"{b}attn_out.weight"].T
        h = rms_norm(x, w[f"{b}ff_norm.weight"], eps)
        x = x + (F.silu(h @ w[f"{b}ff_proj.weight"].T) * (h @ w[f"{b}up_proj.weight"].T)) @ w[f"{b}ff_out.weight"].T
    x = rms_norm(x, w[f"{p}ln_f.weight"], eps)
    return x @ (w[f"{p}wte.weight"] if c["weight_tying"] else w[f"{p}ff_out.weight"]).T


# ----------------------------------------------------------------------------------------------
# Dream: config keys and parameter names of Dream-org/Dream-v0-Base-7B, tiny sizes

DREAM_KV = 2  # grouped-query attention, as Dream-7B's 28 query / 4 key-value heads


def dream_config(**overrides):
    return {"model_type": "Dream", "architectures": ["DreamModel"], "hidden_size": WIDTH,
            "intermediate_size": MLP, "num_hidden_layers": LAYERS, "num_attention_heads": HEADS,
            "num_key_value_heads": DREAM_KV, "hidden_act": "silu", "max_position_embeddings": 131072,
            "rms_norm_eps": 1e-6, "rope_theta": 1000000.0, "rope_scaling": None, "tie_word_embeddings": False,
            "use_sliding_window": False, "sliding_window": None, "vocab_size": VOCAB, "mask_token_id": MASK_ID,
            "bos_token_id": EOS_ID, "eos_token_id": EOS_ID, "pad_token_id": EOS_ID, **overrides}


def dream_shapes(c):
    kv = c["num_key_value_heads"] * HEAD_DIM
    shapes = {"model.embed_tokens.weight": (VOCAB, WIDTH), "model.norm.weight": (WIDTH,)}
    if not c["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (VOCAB, WIDTH)
    for i in range(LAYERS):
        b = f"model.layers.{i}."
        shapes.update({f"{b}input_layernorm.weight": (WIDTH,), f"{b}post_attention_layernorm.weight": (WIDTH,),
                       f"{b}self_attn.q_proj.weight": (WIDTH, WIDTH), f"{b}self_attn.q_proj.bias": (WIDTH,),
                       f"{b}self_attn.k_proj.weight": (kv, WIDTH), f"{b}self_attn.k_proj.bias": (kv,),
                       f"{b}self_attn.v_proj.weight": (kv, WIDTH), f"{b}self_attn.v_proj.bias": (kv,),
                       f"{b}self_attn.o_proj.weight": (WIDTH, WIDTH), f"{b}mlp.gate_proj.weight": (MLP, WIDTH),
                       f"{b}mlp.up_proj.weight": (MLP, WIDTH), f"{b}mlp.down_proj.weight": (WIDTH, MLP)})
    return shapes


def dream_folder(root, **overrides):
    """A Dream-style folder: config.json, model.safetensors, and its tokenizer as vocab.json + merges.txt
    + tokenizer_config.json naming its own (remote-code) tokenizer class, as Dream ships it."""
    folder = root / "Dream-tiny"
    folder.mkdir()
    c = dream_config(**overrides)
    (folder / "config.json").write_text(json.dumps(c))
    tok = byte_bpe()
    tok.model.save(str(folder))  # vocab.json + merges.txt
    added = {str(i): {"content": s, "special": True, "lstrip": False, "rstrip": False, "normalized": False,
                      "single_word": False} for i, s in enumerate(SPECIALS)}
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "DreamTokenizer", "auto_map": {"AutoTokenizer": ["tokenization_dream.DreamTokenizer", None]},
        "added_tokens_decoder": added, "eos_token": SPECIALS[EOS_ID], "pad_token": SPECIALS[EOS_ID],
        "mask_token": SPECIALS[MASK_ID]}))
    weights = random_weights(dream_shapes(c), seed=2)
    save_file(weights, str(folder / "model.safetensors"))
    return folder, c, weights


def dream_reference(w, c, idx, mask):
    """DreamModel.forward (Qwen2 layers, bidirectional) from modeling_dream.py, then the logit shift
    of Dream's generation_utils.py: position i shows the logits of hidden state i - 1."""
    eps, n_kv = c["rms_norm_eps"], c["num_key_value_heads"]
    x = w["model.embed_tokens.weight"][idx]
    for i in range(c["num_hidden_layers"]):
        b = f"model.layers.{i}."
        h = rms_norm(x, w[f"{b}input_layernorm.weight"], eps)
        q, k, v = (F.linear(h, w[f"{b}self_attn.{n}_proj.weight"], w[f"{b}self_attn.{n}_proj.bias"]) for n in "qkv")
        q, k = rope(heads(q, HEADS), c["rope_theta"]), rope(heads(k, n_kv), c["rope_theta"])
        att = attention(q, k, heads(v, n_kv), n_kv, mask).transpose(1, 2).reshape(x.shape)
        x = x + att @ w[f"{b}self_attn.o_proj.weight"].T
        h = rms_norm(x, w[f"{b}post_attention_layernorm.weight"], eps)
        x = x + (F.silu(h @ w[f"{b}mlp.gate_proj.weight"].T) * (h @ w[f"{b}mlp.up_proj.weight"].T)) \
            @ w[f"{b}mlp.down_proj.weight"].T
    x = rms_norm(x, w["model.norm.weight"], eps)
    logits = x @ (w["model.embed_tokens.weight"] if c["tie_word_embeddings"] else w["lm_head.weight"]).T
    return torch.cat([logits[:, :1], logits[:, :-1]], dim=1)


# ----------------------------------------------------------------------------------------------
# parity

MODELS = {"llada": (llada_folder, llada_reference), "dream": (dream_folder, dream_reference)}
VARIANTS = [("llada", {}), ("llada", {"n_kv_heads": 2, "include_qkv_bias": True, "weight_tying": True}),
            ("dream", {}), ("dream", {"tie_word_embeddings": True})]


PADDED = 4  # trailing padding of the second row


def tokens(seed=0):
    """(ids, attention_mask): two rows of real tokens with the mask id among them (a masked diffusion
    input), the second padded at the right (positions stay 0..T-1 in every convention)."""
    idx = torch.randint(2, BPE_VOCAB, (2, 12), generator=torch.Generator().manual_seed(seed))
    idx[:, 3::4] = MASK_ID
    mask = torch.ones_like(idx)
    mask[1, -PADDED:] = 0
    idx[1, -PADDED:] = EOS_ID
    return idx, mask


def real_logits_diff(ours, theirs, mask):
    """Largest |logit difference| at real positions (a padding position's output is nobody's)."""
    return (ours - theirs).abs()[mask.bool()].max().item()


@pytest.mark.parametrize("kind,overrides", VARIANTS)
def test_converted_logits_match_the_original_forward(kind, overrides, tmp_path, capsys):
    folder, c, weights = MODELS[kind][0](tmp_path, **overrides)
    diff = converted_logits_diff(kind, folder, c, weights, tmp_path)
    with capsys.disabled():
        print(f"\n{kind} {overrides}: max |logit diff| = {diff:.2e}")
    assert diff <= PARITY_TOL


def converted_logits_diff(kind, folder, c, weights, tmp_path):
    """`sinkdlm convert` the folder; the largest |logit difference| from the original forward at real positions."""
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "dlm")]) == 0
    model, cfg = load_model(tmp_path / "dlm")
    assert cfg.model.mask_id == MASK_ID and model.mask_id == MASK_ID and not cfg.model.causal
    assert cfg.model.logit_shift == (kind == "dream")
    idx, mask = tokens()
    with torch.no_grad():
        ours, theirs = model(idx, attention_mask=mask), MODELS[kind][1](weights, c, idx, mask)
    assert ours.shape == theirs.shape == (2, 12, VOCAB)
    return real_logits_diff(ours, theirs, mask)


def test_bf16_weights_stay_bf16_in_the_checkpoint_and_match(tmp_path):
    """The published models are bf16: the checkpoint keeps them so (half of float32's memory and disk)
    and loading casts them exactly, so the float32 forward still matches."""
    folder, c, weights = dream_folder(tmp_path)
    weights = {k: v.bfloat16() for k, v in weights.items()}
    save_file(weights, str(folder / "model.safetensors"))
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "dlm"), "--sink-tokens", "1"]) == 0
    saved = load_weights(tmp_path / "dlm")
    assert {v.dtype for v in saved.values()} == {torch.bfloat16} and "sink" in saved
    model = DLM(dataclasses.replace(load_config_of(tmp_path / "dlm").model, sink_tokens=0))
    model.load_state_dict({k: v for k, v in saved.items() if k != "sink"})  # the import without its sink
    idx, mask = tokens()
    with torch.no_grad():
        theirs = dream_reference({k: v.float() for k, v in weights.items()}, c, idx, mask)
        diff = real_logits_diff(model(idx, attention_mask=mask), theirs, mask)
    assert diff <= PARITY_TOL


def test_llada_import_keeps_names_ids_and_the_tokenizer(tmp_path):
    folder, c, weights = llada_folder(tmp_path)
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "dlm"), "--sink-tokens", "2"]) == 0
    cfg = load_config_of(tmp_path / "dlm").model
    assert (cfg.name, cfg.vocab_size, cfg.mask_token_id, cfg.rope_base, cfg.norm_eps, cfg.kv_heads, cfg.sink_tokens) == \
        ("LLaDA-tiny", VOCAB, MASK_ID, 500000.0, 1e-5, HEADS, 2)
    meta = load_meta(tmp_path / "dlm")
    assert meta["eos_id"] == EOS_ID and meta["tokenizer_size"] == BPE_VOCAB and "id 1" in meta["mask_init"]
    assert load_tokenizer(tmp_path / "dlm").encode("The cat").ids == byte_bpe().encode("The cat").ids
    model, _ = load_model(tmp_path / "dlm")
    wte = weights["model.transformer.wte.weight"]
    assert torch.equal(model.wte.weight[:VOCAB], wte) and torch.equal(model.wte.weight[VOCAB], wte[MASK_ID])
    assert torch.equal(model.sink[0], wte[:BPE_VOCAB].mean(0))  # the mean of the tokenizer's real tokens


def test_a_hub_name_is_fetched_as_a_snapshot_of_config_safetensors_and_tokenizer(tmp_path, monkeypatch):
    """`--from GSAI-ML/LLaDA-8B-Base`: its config.json decides the importer, then only the files it needs
    (never *.py or *.bin) are downloaded; here the Hub is stood in for by a local folder."""
    from sinkdlm.interop import convert
    from sinkdlm.interop import hf_folder as hub

    snapshot, _, _ = llada_folder(tmp_path)
    fetched = []
    monkeypatch.setattr(convert, "require_hub", lambda what: None)
    monkeypatch.setattr(hub, "hub_model_type", lambda name: hub.model_type(snapshot))
    monkeypatch.setattr(hub, "hub_snapshot", lambda name: fetched.append(name) or snapshot)
    assert main(["convert", "--from", "GSAI-ML/LLaDA-8B-Base", "--out", str(tmp_path / "dlm")]) == 0
    assert fetched == ["GSAI-ML/LLaDA-8B-Base"] and load_config_of(tmp_path / "dlm").model.name == "LLaDA-8B-Base"
    assert load_meta(tmp_path / "dlm")["converted_from"] == "GSAI-ML/LLaDA-8B-Base"
    assert "*.py" not in hub.HUB_FILES and not any(p.endswith(".bin") for p in hub.HUB_FILES)


@pytest.mark.parametrize("kind,argv,block_size", [
    ("llada", [], 4096), ("dream", [], 131072),  # max_sequence_length, max_position_embeddings
    ("llada", ["--block-size", "64"], 64), ("dream", ["--block-size", "200000"], 131072)])
def test_block_size_is_the_models_own_context_unless_a_shorter_one_is_asked(kind, argv, block_size, tmp_path):
    folder, _, _ = MODELS[kind][0](tmp_path)
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "dlm"), *argv]) == 0
    assert load_config_of(tmp_path / "dlm").model.block_size == block_size


def test_dream_tokenizer_is_built_from_vocab_and_merges_with_its_special_ids(tmp_path):
    folder, _, _ = dream_folder(tmp_path)
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "dlm")]) == 0
    tok = load_tokenizer(tmp_path / "dlm")
    assert tok.token_to_id(SPECIALS[MASK_ID]) == MASK_ID and tok.token_to_id(SPECIALS[EOS_ID]) == EOS_ID
    assert tok.encode("The cat sat").ids == byte_bpe().encode("The cat sat").ids


# ----------------------------------------------------------------------------------------------
# refusals: one line, exit 2, naming what is unsupported

@pytest.mark.parametrize("kind,overrides,named", [
    ("llada", {"activation_type": "gelu"}, "activation_type"),
    ("llada", {"layer_norm_type": "default"}, "layer_norm_type"),
    ("llada", {"block_type": "sequential"}, "block_type"),
    ("llada", {"scale_logits": True}, "scale_logits"),
    ("llada", {"mask_token_id": None}, "mask_token_id"),
    ("llada", {"multi_query_attention": True}, "multi_query_attention"),  # contradicts n_kv_heads=4
    ("llada", {"model_type": "llada_moe"}, "llada_moe"),
    ("llada", {"vocab_size": VOCAB + 8}, "embedding_size=320 is smaller than vocab_size=328"),  # LLaDA refuses it
    ("dream", {"hidden_act": "gelu"}, "hidden_act"),
    ("dream", {"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope_scaling asks for RoPE scaling 'yarn'"),
    # what transformers 5 writes when it re-saves a config
    ("dream", {"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}},
     "rope_parameters asks for RoPE scaling 'yarn'"),
    ("dream", {"head_dim": HEAD_DIM // 2}, f"head_dim={HEAD_DIM // 2} disagrees"),  # Dream's own code fails
])
def test_unsupported_configs_are_refused_in_one_line(kind, overrides, named, tmp_path, capsys):
    folder, _, _ = MODELS[kind][0](tmp_path, **overrides)
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "dlm")]) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "dlm").exists()


@pytest.mark.parametrize("kind,overrides,note", [
    ("llada", {"clip_qkv": 0.5}, "clip_qkv=0.5 is ignored"),  # never read by LLaDA's llama block
    ("dream", {"use_sliding_window": True, "sliding_window": 4}, "use_sliding_window=true is ignored"),
    ("dream", {"rope_scaling": {"rope_type": "default"}}, None),  # plain RoPE, under another spelling
])
def test_configs_the_original_computes_the_same_are_accepted(kind, overrides, note, tmp_path, capsys):
    """Values the original's code ignores (a 0.5 clip or a 4-token window would change these logits)."""
    folder, c, weights = MODELS[kind][0](tmp_path, **overrides)
    assert converted_logits_diff(kind, folder, c, weights, tmp_path) <= PARITY_TOL
    notes = [line for line in capsys.readouterr().err.splitlines() if line.startswith("note:")]
    assert len(notes) == (note is not None) and all(note in line for line in notes)


def test_a_dream_config_resaved_by_transformers_5_keeps_its_rope_base(tmp_path):
    """transformers 5 moves rope_theta into rope_parameters; read there, not taken as the default 10000."""
    folder, c, weights = dream_folder(tmp_path)
    raw = json.loads((folder / "config.json").read_text())
    del raw["rope_theta"], raw["rope_scaling"]
    raw["rope_parameters"] = {"rope_type": "default", "rope_theta": c["rope_theta"]}
    (folder / "config.json").write_text(json.dumps(raw))
    assert converted_logits_diff("dream", folder, c, weights, tmp_path) <= PARITY_TOL
    assert load_config_of(tmp_path / "dlm").model.rope_base == c["rope_theta"]


def test_weights_that_do_not_fit_are_refused(tmp_path, capsys):
    folder, c, weights = dream_folder(tmp_path)
    save_file({**weights, "model.layers.0.self_attn.q_norm.weight": torch.ones(HEAD_DIM)},
              str(folder / "model.safetensors"))  # a QK-norm Dream variant
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "a")]) == 2
    assert "q_norm" in capsys.readouterr().err
    del weights["model.layers.1.mlp.up_proj.weight"]
    save_file(weights, str(folder / "model.safetensors"))
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "b")]) == 2
    assert "blocks.1.mlp.w_up.weight" in capsys.readouterr().err


def test_pickled_weights_are_never_loaded(tmp_path, capsys):
    folder, _, _ = llada_folder(tmp_path)
    for f in folder.glob("model*.safetensors*"):
        f.unlink()
    (folder / "pytorch_model.bin").write_bytes(b"not read")
    assert main(["convert", "--from", str(folder), "--out", str(tmp_path / "dlm")]) == 2
    assert "pickled" in capsys.readouterr().err


def test_mask_token_id_must_be_inside_the_vocabulary():
    assert ModelConfig(vocab_size=10, mask_token_id=3).mask_id == 3
    assert ModelConfig(vocab_size=10).mask_id == 10  # sinkdlm's own models: the extra row
    with pytest.raises(UserError, match="mask_token_id=10"):
        ModelConfig(vocab_size=10, mask_token_id=10)


# ----------------------------------------------------------------------------------------------
# the converted checkpoints run every command

@pytest.fixture(scope="module", params=["llada", "dream"])
def converted(request, tmp_path_factory):
    root = tmp_path_factory.mktemp(request.param)
    folder, _, _ = MODELS[request.param][0](root)
    assert main(["convert", "--from", str(folder), "--out", str(root / "dlm"), "--sink-tokens", "1"]) == 0
    return root / "dlm"


def test_generate_runs_on_the_import(converted, tmp_path):
    out = tmp_path / "gen.jsonl"
    assert main(["generate", "--checkpoint", str(converted), "--prompt", "The cat", "--gen-length", "4",
                 "--steps", "4", "--output", str(out)]) == 0
    assert json.loads(out.read_text().splitlines()[0])["prompt"] == "The cat"


def test_eval_runs_on_the_import_offline(converted, tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from sinkdlm.eval import task_data
    from tests.test_harness import write_task

    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path / "cache"))
    write_task(tmp_path / "cache" / task_data.TASKS_DIR / "arc_easy", name="arc_easy")  # the offline copy's place
    assert main(["eval", "--checkpoint", str(converted), "--tasks", "arc_e", "--limit", "2", "--mc-num", "2",
                 "--output", str(tmp_path / "out")]) == 0
    assert "arc_easy" in json.loads((tmp_path / "out" / "results.json").read_text())["results"]


def test_eval_gsm8k_runs_on_the_import(converted, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", list(sys.argv))
    argv = ["eval-gsm8k", "--checkpoint", str(converted), "--data", "synthetic", "--limit", "2", "--out", str(tmp_path),
            "--one-stage", "--gen-length", "4", "--steps", "4", "--no-progress"]
    if load_config_of(converted).model.logit_shift:  # Dream: no KV cache, so the fast default is refused
        assert main(argv) == 2 and "pass --exact" in capsys.readouterr().err
        argv.append("--exact")
    assert main(argv) == 0
    assert json.loads((tmp_path / "gsm8k_summary.json").read_text())["n"] == 2


def test_analyze_runs_on_the_import(converted, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text(" ".join(TEXT))
    out = tmp_path / "report"
    assert main(["analyze", "--checkpoint", str(converted), "--text", str(text), "--out", str(out), "--steps", "4",
                 "--gen-length", "4", "--max-windows", "1", "--elbo-samples", "1", "--top-k", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["sinks"]["steps"] == 4 and (out / "report.md").stat().st_size > 0
