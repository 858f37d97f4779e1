"""Import of SMDM / sink-paper lit_gpt checkpoints: logits against an independent forward written from
lit_gpt's TransEncoder (SMDM's lit_gpt/diffmodel.py), on tiny random weights saved in SMDM's naming as
Fabric .pth files (`{"model": state_dict, ...}`), bare state dicts and safetensors. Nothing downloaded."""

import json
import math

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers

from sinkdlm.checkpoint import load_config_of, load_meta, load_model
from sinkdlm.cli import main
from sinkdlm.config import SMDM_SEQ_LEN
from sinkdlm.errors import UserError
from sinkdlm.interop.convert import convert
from sinkdlm.interop.smdm import GATE_NAMES, infer_config, load_state

VOCAB = 40  # the head's rows; the embedding has VOCAB + 1 (mask) [+ 1 (sink)]
N_EMBD, N_HEAD, INTERMEDIATE, N_LAYER = 32, 4, 48, 2
PARITY_TOL = 1e-5  # fp32: the same maths in another order (observed up to ~2e-6)
EPS, BASE = 1e-5, 10000.0  # SMDM's RMSNorm eps and RoPE base


class NotWeights:
    """Any Python object in a .pth needs pickle code execution to load."""


# ----------------------------------------------------------------------------------------------
# SMDM-named random weights and lit_gpt's forward, written from lit_gpt/diffmodel.py


def smdm_state(groups=N_HEAD, sinks=0, gate=None, packed_mlp=False, seed=0):
    """A TransEncoder state dict in lit_gpt's names, every tensor random (norms around 1); gate: the
    name (one of GATE_NAMES) of the gated baseline's E x E gate, None for none."""
    gen = torch.Generator().manual_seed(seed)
    hd = N_EMBD // N_HEAD

    def rand(*shape, scale=0.2):
        return torch.randn(*shape, generator=gen) * scale

    sd = {"transformer.wte.weight": rand(VOCAB + 1 + sinks, N_EMBD, scale=1.0),
          "lm_head.weight": rand(VOCAB, N_EMBD), "transformer.ln_f.weight": 1 + rand(N_EMBD)}
    for i in range(N_LAYER):
        p = f"transformer.h.{i}."
        sd[p + "norm_1.weight"], sd[p + "norm_2.weight"] = 1 + rand(N_EMBD), 1 + rand(N_EMBD)
        sd[p + "attn.attn.weight"] = rand((N_HEAD + 2 * groups) * hd, N_EMBD)
        sd[p + "attn.proj.weight"] = rand(N_EMBD, N_EMBD)
        if gate:
            sd[p + gate] = rand(N_EMBD, N_EMBD)
        w1, w2 = rand(INTERMEDIATE, N_EMBD), rand(INTERMEDIATE, N_EMBD)
        if packed_mlp:
            sd[p + "mlp.swiglu.w12.weight"] = torch.cat([w1, w2])
        else:
            sd[p + "mlp.swiglu.w1.weight"], sd[p + "mlp.swiglu.w2.weight"] = w1, w2
        sd[p + "mlp.swiglu.w3.weight"] = rand(N_EMBD, INTERMEDIATE)
    return sd


def rms_norm(x, weight):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * weight


def rotate(x, cos, sin):
    """Tri Dao's rotary kernel, interleaved=False: the first and second halves of the head are a pair."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


def lit_gpt_logits(sd, idx, groups=N_HEAD, mask=None):
    """TransEncoder.forward; the paper's sink (id vocab + 1) prepended at position 0, attending only to
    itself and dropped before ln_f; the gated baseline: sigmoid(gate(norm_1 x)) on the heads' output.
    The gate is not in SMDM's public code: this is the importer's stated assumption (docs/import-smdm.md),
    so the gate case checks that the import computes what that assumption says, not the paper's fork.
    mask (B, T), 1 = real: padding keys hidden from every query (SMDM has no padding; sinkdlm's own)."""
    vocab, hd = sd["lm_head.weight"].shape[0], N_EMBD // N_HEAD
    has_sink = sd["transformer.wte.weight"].shape[0] == vocab + 2
    if has_sink:
        idx = torch.cat([torch.full((idx.shape[0], 1), vocab + 1), idx], dim=1)
    b, t = idx.shape
    x = sd["transformer.wte.weight"][idx]
    theta = 1.0 / BASE ** (torch.arange(0, hd, 2).float() / hd)
    angles = torch.outer(torch.arange(t).float(), theta)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]  # (T, 1, hd/2) against (B, T, H, hd/2)
    bias = torch.zeros(b, 1, t, t)
    if mask is not None:
        bias[:, :, :, t - mask.shape[1]:] = bias[:, :, :, t - mask.shape[1]:].masked_fill(
            ~mask.bool()[:, None, None, :], -math.inf)
    if has_sink:
        bias[:, :, 0, 1:] = -math.inf  # the sink's query sees only its own key
    per_group = N_HEAD // groups
    for i in range(N_LAYER):
        w = {k.removeprefix(f"transformer.h.{i}."): v for k, v in sd.items() if k.startswith(f"transformer.h.{i}.")}
        n1 = rms_norm(x, w["norm_1.weight"])
        qkv = (n1 @ w["attn.attn.weight"].T).view(b, t, groups, per_group + 2, hd)
        q, k, v = qkv.split((per_group, 1, 1), dim=-2)
        q, k, v = (z.reshape(b, t, -1, hd) for z in (q, k, v))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        q, k, v = (z.transpose(1, 2) for z in (q, k, v))
        k, v = k.repeat_interleave(per_group, dim=1), v.repeat_interleave(per_group, dim=1)
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(hd) + bias, dim=-1)
        y = (att @ v).transpose(1, 2).reshape(b, t, N_EMBD)
        gate = next((w[name] for name in GATE_NAMES if name in w), None)
        if gate is not None:
            y = y * torch.sigmoid(n1 @ gate.T)
        x = x + y @ w["attn.proj.weight"].T
        n2 = rms_norm(x, w["norm_2.weight"])
        if "mlp.swiglu.w12.weight" in w:
            w1, w2 = w["mlp.swiglu.w12.weight"].chunk(2)
        else:
            w1, w2 = w["mlp.swiglu.w1.weight"], w["mlp.swiglu.w2.weight"]
        x = x + (F.silu(n2 @ w1.T) * (n2 @ w2.T)) @ w["mlp.swiglu.w3.weight"].T
    if has_sink:
        x = x[:, 1:]
    return rms_norm(x, sd["transformer.ln_f.weight"]) @ sd["lm_head.weight"].T


def tokenizer_file(tmp_path):
    vocab = {"</s>": 0, "<unk>": 1, "<s>": 2, **{f"w{i}": i for i in range(3, VOCAB)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    path = tmp_path / "tokenizer.json"
    tok.save(str(path))
    return path


def save_smdm(sd, path, container):
    """Fabric's checkpoint (as pretrain/train_mdm.py saves it), a bare state dict, or safetensors."""
    if container == "fabric":
        optimizer = {"state": {0: {"step": torch.tensor(3.0), "exp_avg": torch.zeros(2)}},
                     "param_groups": [{"lr": 2e-4}]}
        torch.save({"model": sd, "optimizer": optimizer, "hparams": {"n_layer": N_LAYER}, "iter_num": 12,
                    "step_count": 3}, path)
    elif container == "bare":
        torch.save(sd, path)
    else:
        save_file(sd, str(path))
    return path


# ----------------------------------------------------------------------------------------------
# parity


VARIANTS = {  # name -> (smdm_state arguments, the sinkdlm variant it must become)
    "plain": (dict(), "plain"),
    "plain_gqa_packed_mlp": (dict(groups=2, packed_mlp=True), "plain"),
    "sink": (dict(sinks=1), "sink x1 (front)"),
    **{f"gate:{name}": (dict(gate=name), "gate elementwise") for name in GATE_NAMES},
}
PADDED = 5  # trailing padding of the last row


@pytest.mark.parametrize("container", ["fabric", "bare", "safetensors"])
@pytest.mark.parametrize("variant", list(VARIANTS))
def test_logits_match_lit_gpt(tmp_path, variant, container):
    kwargs, label = VARIANTS[variant]
    sd = smdm_state(**kwargs)
    suffix = ".safetensors" if container == "safetensors" else ".pth"
    source = save_smdm(sd, tmp_path / f"iter-000012-ckpt{suffix}", container)
    ckpt, _ = convert(str(source), tmp_path / "run", tokenizer=str(tokenizer_file(tmp_path)), n_head=N_HEAD)
    model, cfg = load_model(ckpt)
    assert cfg.model.variant() == label and cfg.model.kv_heads == kwargs.get("groups", N_HEAD)
    assert cfg.model.mask_id == VOCAB  # SMDM's mask row: the first row after the head's
    assert cfg.model.block_size == SMDM_SEQ_LEN  # SMDM's own context (every Diff_LLaMA config)
    idx = torch.randint(0, VOCAB + 1, (3, 12), generator=torch.Generator().manual_seed(1))  # masks included
    mask = torch.ones_like(idx)
    mask[-1, -PADDED:] = 0
    with torch.no_grad():
        ours, theirs = model(idx, attention_mask=mask), lit_gpt_logits(sd, idx, kwargs.get("groups", N_HEAD), mask)
    diff = (ours - theirs).abs()[mask.bool()].max().item()  # a padding position's output is nobody's
    print(f"{variant}/{container}: max |logit diff| = {diff:.2e}")
    assert diff <= PARITY_TOL
    if container == "fabric":
        assert load_meta(ckpt)["source_iter_num"] == 12


# ----------------------------------------------------------------------------------------------
# the config from the tensors


@pytest.mark.parametrize("n_embd,intermediate,heads,name", [
    (256, 1024, 4, None), (640, 2560, 10, None), (640, 1600, 8, "Diff_LLaMA_75M")])
def test_head_count_from_smdm_sizes(n_embd, intermediate, heads, name):
    """Width 640 is two SMDM sizes with 10 and 8 heads; the MLP width tells them apart."""
    n_layer = 16 if name else 1
    sd = {"lm_head.weight": torch.empty(VOCAB, n_embd), "transformer.wte.weight": torch.empty(VOCAB + 1, n_embd),
          "transformer.ln_f.weight": torch.empty(n_embd)}
    for i in range(n_layer):
        sd[f"transformer.h.{i}.attn.attn.weight"] = torch.empty(3 * n_embd, n_embd)
        sd[f"transformer.h.{i}.mlp.swiglu.w1.weight"] = torch.empty(intermediate, n_embd)
    cfg, _ = infer_config(sd)
    assert cfg.n_head == heads and cfg.kv_heads == heads
    assert cfg.name == (name or "smdm") and (cfg.rope_base, cfg.norm_eps) == (BASE, EPS)


def test_unknown_width_asks_for_the_head_count(tmp_path):
    with pytest.raises(UserError, match="--n-head"):
        infer_config(smdm_state())
    source = save_smdm(smdm_state(), tmp_path / "m.pth", "bare")
    assert main(["convert", "--from", str(source), "--out", str(tmp_path / "run"),
                 "--tokenizer", str(tokenizer_file(tmp_path))]) == 2


def test_a_pickled_object_is_refused_in_one_line(tmp_path, capsys):
    source = tmp_path / "evil.pth"
    torch.save({"model": smdm_state(), "hparams": NotWeights()}, source)
    code = main(["convert", "--from", str(source), "--out", str(tmp_path / "run"),
                 "--tokenizer", str(tokenizer_file(tmp_path)), "--n-head", str(N_HEAD)])
    err = capsys.readouterr().err
    assert code == 2 and len(err.strip().splitlines()) == 1, err
    assert "NotWeights" in err and "code execution" in err and "weights_only=False" not in err
    assert not (tmp_path / "run").exists()


def test_a_state_dict_with_foreign_weights_is_refused(tmp_path):
    sd = smdm_state()
    sd["transformer.h.0.attn.attn.bias"] = torch.zeros(3 * N_EMBD)
    with pytest.raises(UserError, match="attn.attn.bias"):
        convert(str(save_smdm(sd, tmp_path / "m.pth", "bare")), tmp_path / "run",
                tokenizer=str(tokenizer_file(tmp_path)), n_head=N_HEAD)


def test_layers_that_differ_or_a_missing_file_are_refused(tmp_path):
    sd = smdm_state(gate="attn.gate.weight")
    del sd["transformer.h.1.attn.gate.weight"]  # the gate in layer 0 only
    with pytest.raises(UserError, match="blocks.1.attn.gate.weight"):
        convert(str(save_smdm(sd, tmp_path / "m.pth", "bare")), tmp_path / "run",
                tokenizer=str(tokenizer_file(tmp_path)), n_head=N_HEAD)
    with pytest.raises(UserError, match="does not exist"):
        convert(str(tmp_path / "absent.pth"), tmp_path / "run")


def test_sinks_are_added_to_a_plain_checkpoint_only(tmp_path):
    tok = str(tokenizer_file(tmp_path))
    plain = save_smdm(smdm_state(), tmp_path / "plain.pth", "bare")
    ckpt, _ = convert(str(plain), tmp_path / "run", sink_tokens=2, tokenizer=tok, n_head=N_HEAD)
    model, cfg = load_model(ckpt)
    assert cfg.model.sink_tokens == 2  # --sink-init mean: the real tokens' mean embedding
    assert torch.allclose(model.sink.data, model.wte.weight.data[:VOCAB].mean(0).expand(2, -1))
    with_sink = save_smdm(smdm_state(sinks=1), tmp_path / "sink.pth", "bare")
    with pytest.raises(UserError, match="already has 1 sink"):
        convert(str(with_sink), tmp_path / "run2", sink_tokens=1, tokenizer=tok, n_head=N_HEAD)


def test_load_state_unwraps_fabric_and_refuses_other_contents(tmp_path):
    sd = smdm_state()
    state, extra = load_state(save_smdm(sd, tmp_path / "f.pth", "fabric"))
    assert state.keys() == sd.keys() and extra == {"iter_num": 12, "step_count": 3}
    torch.save([1, 2], tmp_path / "list.pth")
    with pytest.raises(UserError, match="neither a state dict"):
        load_state(tmp_path / "list.pth")


# ----------------------------------------------------------------------------------------------
# the converted checkpoint works with the other commands


def test_generate_and_analyze_run_on_an_imported_sink_model(tmp_path, capsys):
    source = save_smdm(smdm_state(sinks=1), tmp_path / "sink.pth", "fabric")
    run = tmp_path / "run"
    assert main(["convert", "--from", str(source), "--out", str(run), "--tokenizer", str(tokenizer_file(tmp_path)),
                 "--n-head", str(N_HEAD), "--block-size", "64"]) == 0
    assert "sink x1 (front)" in capsys.readouterr().out
    assert load_config_of(run).model.sink_tokens == 1
    assert main(["generate", "--checkpoint", str(run), "--prompt", "w3 w4 w5", "--gen-length", "4",
                 "--steps", "4", "--format", "jsonl"]) == 0
    assert main(["analyze", "--checkpoint", str(run), "--prompt", "w3 w4 w5 w6", "--out", str(tmp_path / "report"),
                 "--steps", "4", "--gen-length", "4", "--top-k", "2", "--elbo-samples", "2"]) == 0
    assert (tmp_path / "report" / "metrics.json").stat().st_size > 0
    assert main(["eval-gsm8k", "--checkpoint", str(run), "--data", "synthetic", "--limit", "2", "--one-stage",
                 "--gen-length", "4", "--steps", "4", "--no-progress"]) == 0
    assert json.loads((run / "step-00000000" / "gsm8k-synthetic" / "gsm8k_summary.json").read_text())["n"] == 2


def test_eval_runs_on_an_imported_model_offline(tmp_path, monkeypatch):
    pytest.importorskip("lm_eval")
    from sinkdlm.eval import task_data
    from tests.test_harness import write_task

    source = save_smdm(smdm_state(sinks=1), tmp_path / "sink.pth", "fabric")
    run = tmp_path / "run"
    assert main(["convert", "--from", str(source), "--out", str(run), "--tokenizer", str(tokenizer_file(tmp_path)),
                 "--n-head", str(N_HEAD), "--block-size", "64"]) == 0
    monkeypatch.setenv("SINKDLM_CACHE", str(tmp_path / "cache"))
    write_task(tmp_path / "cache" / task_data.TASKS_DIR / "arc_easy", name="arc_easy")  # the offline copy's place
    assert main(["eval", "--checkpoint", str(run), "--tasks", "arc_easy", "--limit", "2", "--mc-num", "2",
                 "--output", str(tmp_path / "out")]) == 0
    assert "arc_easy" in json.loads((tmp_path / "out" / "results.json").read_text())["results"]


def test_adapt_and_sft_run_on_an_imported_model(tmp_path):
    """docs/import-smdm.md: `adapt` and `sft` take an import like any checkpoint (a step each)."""
    from sinkdlm.data.prepare import prepare

    source = save_smdm(smdm_state(sinks=1), tmp_path / "sink.pth", "fabric")
    run = tmp_path / "run"
    assert main(["convert", "--from", str(source), "--out", str(run), "--tokenizer", str(tokenizer_file(tmp_path)),
                 "--n-head", str(N_HEAD), "--block-size", "64"]) == 0
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    gen = torch.Generator().manual_seed(0)
    for i in range(10):
        (corpus / f"doc{i}.txt").write_text(" ".join(f"w{t}" for t in torch.randint(3, VOCAB, (200,), generator=gen)))
    data = prepare(str(corpus), tmp_path / "data", str(run / "step-00000000" / "tokenizer.json"), val_fraction=0.2,
                   progress=False)
    steps = ["train.max_steps=1", "train.global_batch=2", "train.micro_batch=2", "train.progress=false",
             "data.val_windows=2"]
    assert main(["adapt", "--init-from", str(run), "--data", str(data), "--out", str(tmp_path / "adapted"),
                 "data.seq_len=32", *steps]) == 0
    assert load_config_of(tmp_path / "adapted").model == load_config_of(run).model
    assert main(["sft", "--init-from", str(run), "--out", str(tmp_path / "sft"), "data.seq_len=64", *steps]) == 0
    assert load_config_of(tmp_path / "sft").model == load_config_of(run).model


def test_a_pth_in_torchs_legacy_format_is_read_whole(tmp_path):
    """torch < 1.6's format cannot be memory-mapped; it is read (weights_only) without mmap."""
    sd = smdm_state()
    source = tmp_path / "legacy.pth"
    torch.save(sd, source, _use_new_zipfile_serialization=False)
    ckpt, _ = convert(str(source), tmp_path / "run", tokenizer=str(tokenizer_file(tmp_path)), n_head=N_HEAD)
    model, _ = load_model(ckpt)
    idx = torch.randint(0, VOCAB + 1, (2, 8), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert (model(idx) - lit_gpt_logits(sd, idx)).abs().max() <= PARITY_TOL
