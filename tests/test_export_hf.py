"""`sinkdlm export` writes a folder transformers loads without sinkdlm: every variant's logits match
sinkdlm's within 1e-5 in a fresh process where sinkdlm cannot be imported; the shipped model code is
sinkdlm's own; `sinkdlm convert --from` the folder gives the checkpoint back; the folder is written
whole or not at all."""

import dataclasses
import importlib.util
import json
import re
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402

from sinkdlm.checkpoint import (  # noqa: E402  # noqa: E402
    TMP_PREFIX,
    TRASH_PREFIX,
    load_config_of,
    load_meta,
    load_model,
    load_tokenizer,
    save_checkpoint,
)
from sinkdlm.cli import main  # noqa: E402
from sinkdlm.config import Config, ModelConfig  # noqa: E402
from sinkdlm.errors import UserError  # noqa: E402
from sinkdlm.interop import export as export_module  # noqa: E402
from sinkdlm.interop.export import IMPORT_REWRITES, export, shipped_source  # noqa: E402
from sinkdlm.interop.from_export import checkpoint_from_export  # noqa: E402
from sinkdlm.interop.hf_tokenizer import MASK_TOKEN  # noqa: E402
from sinkdlm.model import DLM  # noqa: E402
from tests.conftest import tiny  # noqa: E402

VOCAB = 50
LOGIT_TOL = 1e-5  # fp32, the same code on the same CPU: only kernel choice may differ
VARIANTS = {
    "plain": {},
    "front_sink_x2": dict(sink_tokens=2, sink_init="learned"),
    "end_sink": dict(sink_tokens=1, sink_position="end"),
    "sink_zero_value": dict(sink_tokens=1, sink_zero_value=True),
    "sink_sees_all": dict(sink_tokens=1, sink_self_only=False),
    "gate_elementwise": dict(attn_gate="elementwise"),
    "gate_headwise": dict(attn_gate="headwise", sink_tokens=1),
    "gqa_bias_tied": dict(n_head=4, n_query_groups=2, qkv_bias=True, tie_embeddings=True),
    "logit_shift": dict(logit_shift=True),
    "mask_in_vocabulary": dict(mask_token_id=VOCAB - 1),  # as LLaDA's and Dream's imports
}
IDS = [[3, 7, VOCAB, 12, VOCAB, 9, 4, 0], [5, VOCAB, 8, 2, 0, 0, 0, 0]]  # VOCAB is the mask id
MASK = [[1] * 8, [1, 1, 1, 1, 1, 0, 0, 0]]  # the second row padded

# Runs with `python -I -S`: no site processing, so the editable install of sinkdlm (a .pth file) is
# not active and neither PYTHONPATH nor the working directory is on the path; only the folders that
# hold torch and transformers are added.
LOADER = textwrap.dedent("""
    import json, sys
    site_dirs, folders, out = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
    sys.path.extend(site_dirs)
    try:
        import sinkdlm
        isolated = False
    except ImportError:
        isolated = True
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer
    ids, mask = torch.tensor(json.loads(sys.argv[4])), torch.tensor(json.loads(sys.argv[5]))
    logits, report = {}, {"isolated": isolated}
    for name, folder in folders.items():
        model, info = AutoModel.from_pretrained(folder, trust_remote_code=True, output_loading_info=True)
        masked_lm = AutoModelForMaskedLM.from_pretrained(folder, trust_remote_code=True)
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
        with torch.no_grad():
            logits[name] = model(input_ids=ids, attention_mask=mask).logits
            logits[name + "/unpadded"] = model(ids[:1]).logits
            same = torch.equal(masked_lm(input_ids=ids, attention_mask=mask).logits, logits[name])
        batch = tokenizer(["w5 w7 " + tokenizer.mask_token, "w9"], padding=True)
        report[name] = {"class": type(model).__name__, "dtype": str(model.dtype), "masked_lm_same": same,
                        "loading": {k: sorted(v) for k, v in info.items()}, "mask_token_id": tokenizer.mask_token_id,
                        "eos_token_id": tokenizer.eos_token_id, "pad_token_id": tokenizer.pad_token_id,
                        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"],
                        "modules": sorted(m for m in sys.modules if m.split(".")[0] == "sinkdlm")}
    # without trust_remote_code too (transformers 5 then asks about the model's code, hears no, and
    # still loads the tokenizer)
    report["plain_tokenizer_mask_id"] = AutoTokenizer.from_pretrained(folders["plain"]).mask_token_id
    save_file({k: v.contiguous() for k, v in logits.items()}, out + ".safetensors")
    with open(out + ".json", "w") as f:
        json.dump(report, f)
""")


def word_tokenizer(path: Path, n_tokens: int = VOCAB) -> Path:
    vocab = {"</s>": 0, "<unk>": 1, **{f"w{i}": i for i in range(2, n_tokens)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(path))
    return path


def random_checkpoint(root: Path, name: str, n_tokens: int = VOCAB, step: int = 3, meta: dict | None = None,
                      **model) -> Path:
    """A checkpoint (step 3 unless told) of a tiny model with every parameter perturbed (norms, sinks,
    biases too)."""
    cfg = Config(model=tiny(**model))
    dlm = DLM(cfg.model)
    with torch.no_grad():
        for p in dlm.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    tok = word_tokenizer(root / f"{name}-tokenizer.json", n_tokens)
    meta = meta if meta is not None else {"eos_id": 0, "tokens": 96}
    return save_checkpoint(root / name, step, dlm.state_dict(), cfg, meta, tokenizer=tok)


def site_dirs() -> list[str]:
    paths = sysconfig.get_paths()
    return sorted({paths["purelib"], paths["platlib"]})


def load_in_clean_process(tmp_path: Path, folders: dict[str, Path]) -> tuple[dict, dict]:
    out = tmp_path / "clean"
    env = {"PATH": "/usr/bin:/bin", "HF_HOME": str(tmp_path / "hf-home"), "HF_HUB_OFFLINE": "1",
           "OMP_NUM_THREADS": "1", "TRANSFORMERS_VERBOSITY": "error"}
    done = subprocess.run([sys.executable, "-I", "-S", "-c", LOADER, json.dumps(site_dirs()),
                           json.dumps({k: str(v) for k, v in folders.items()}), str(out), json.dumps(IDS),
                           json.dumps(MASK)], cwd=tmp_path, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return load_file(str(out) + ".safetensors"), json.loads(Path(str(out) + ".json").read_text())


def test_every_variant_loads_in_transformers_without_sinkdlm(tmp_path):
    folders, ours = {}, {}
    for name, model in VARIANTS.items():
        ckpt = random_checkpoint(tmp_path, name, **model)
        folders[name] = export(ckpt, tmp_path / f"{name}-hf")
        dlm, _ = load_model(ckpt)
        with torch.no_grad():
            ours[name] = dlm(torch.tensor(IDS), torch.tensor(MASK))
            ours[name + "/unpadded"] = dlm(torch.tensor(IDS[:1]))
    theirs, report = load_in_clean_process(tmp_path, folders)
    assert report["isolated"], "sinkdlm was importable in the clean process"
    diffs = {name: (theirs[name] - ours[name]).abs().max().item() for name in ours}
    print("max abs logit difference per variant:", json.dumps(diffs))
    assert max(diffs.values()) <= LOGIT_TOL, diffs
    for name in VARIANTS:
        got = report[name]
        assert got["class"] == "SinkDLMForMaskedLM" and got["dtype"] == "torch.float32" and got["masked_lm_same"]
        assert got["loading"] == {"missing_keys": [], "unexpected_keys": [], "mismatched_keys": [], "error_msgs": []}
        assert got["modules"] == []  # nothing of sinkdlm's package was imported
        mask_id = VARIANTS[name].get("mask_token_id", VOCAB)
        assert (got["mask_token_id"], got["eos_token_id"], got["pad_token_id"]) == (mask_id, 0, 0)
        assert got["input_ids"] == [[5, 7, mask_id], [9, 0, 0]] and got["attention_mask"] == [[1, 1, 1], [1, 0, 0]]
    assert theirs["plain"].shape == (2, 8, VOCAB) and report["plain_tokenizer_mask_id"] == VOCAB


def test_shipped_model_code_is_sinkdlms_own(tmp_path):
    folder = export(random_checkpoint(tmp_path, "sink", sink_tokens=1), tmp_path / "hf")
    root = export_module.PACKAGE
    for module, shipped in (("model", "sinkdlm_model.py"), ("attention", "sinkdlm_attention.py")):
        source, text = (root / f"{module}.py").read_text(), (folder / shipped).read_text()
        changed = [(a, b) for a, b in zip(source.splitlines(), text.splitlines()) if a != b]
        assert len(source.splitlines()) == len(text.splitlines())
        assert all(IMPORT_REWRITES.get(a) == b for a, b in changed)  # only the sinkdlm imports differ
        assert not re.search(r"^\s*(from|import)\s+sinkdlm\b", text, re.MULTILINE)
    for name in ("configuration_sinkdlm.py", "modeling_sinkdlm.py"):
        assert (folder / name).read_text() == (export_module.WRAPPER_CODE / name).read_text()


def test_a_new_sinkdlm_import_in_the_model_is_caught(tmp_path, monkeypatch):
    fake = tmp_path / "pkg"
    fake.mkdir()
    (fake / "model.py").write_text("from sinkdlm.sample import sample\n")
    monkeypatch.setattr(export_module, "PACKAGE", fake)
    with pytest.raises(RuntimeError, match="from sinkdlm.sample import sample"):
        shipped_source("model")


@pytest.mark.parametrize("name", ["gqa_bias_tied", "end_sink", "logit_shift", "mask_in_vocabulary"])
def test_shipped_config_agrees_with_model_config_on_what_dlm_reads(tmp_path, name):
    """Every `cfg.<name>` model.py reads has the same value on the shipped SinkDLMConfig."""
    spec = importlib.util.spec_from_file_location(
        "configuration_sinkdlm", export_module.WRAPPER_CODE / "configuration_sinkdlm.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    folder = export(random_checkpoint(tmp_path, name, **VARIANTS[name]), tmp_path / "hf")
    hf = module.SinkDLMConfig(**json.loads((folder / "config.json").read_text()))
    ours = load_config_of(folder).model
    read = set(re.findall(r"cfg\.(\w+)", (export_module.PACKAGE / "model.py").read_text()))
    assert {"kv_heads", "head_size", "require_vocab", "mask_id", "sink_tokens"} <= read
    for attr in sorted(read):
        a, b = getattr(hf, attr), getattr(ours, attr)
        assert (a() if callable(a) else a) == (b() if callable(b) else b), attr


def test_config_json_is_a_transformers_config_with_every_model_field(tmp_path):
    folder = export(random_checkpoint(tmp_path, "run", sink_tokens=2), tmp_path / "hf")
    data = json.loads((folder / "config.json").read_text())
    assert data["model_type"] == "sinkdlm" and data["architectures"] == ["SinkDLMForMaskedLM"]
    assert data["auto_map"]["AutoModel"] == "modeling_sinkdlm.SinkDLMForMaskedLM"
    assert data["mask_token_id"] == VOCAB and data["dtype"] == "float32"
    assert {f.name for f in dataclasses.fields(ModelConfig)} <= set(data)
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    assert tok_config["mask_token"] == MASK_TOKEN and tok_config["eos_token"] == "</s>"
    assert tok_config["model_input_names"] == ["input_ids", "attention_mask"]  # no token_type_ids (transformers 4)
    assert set(load_file(str(folder / "model.safetensors"))) == {f"model.{k}" for k in DLM(tiny(sink_tokens=2)).state_dict()}


def test_a_tokenizer_smaller_than_the_vocabulary_gets_reserved_tokens_before_the_mask(tmp_path):
    folder = export(random_checkpoint(tmp_path, "run", n_tokens=45), tmp_path / "hf")
    tok = Tokenizer.from_file(str(folder / "tokenizer.json"))
    assert tok.token_to_id(MASK_TOKEN) == VOCAB and tok.id_to_token(45) == "<|sinkdlm_reserved_45|>"
    back = tmp_path / "back"
    assert main(["convert", "--from", str(folder), "--out", str(back)]) == 0
    assert load_tokenizer(back).to_str() == load_tokenizer(tmp_path / "run").to_str()


def converted_back_equals(ckpt: Path, folder: Path, back: Path) -> dict[str, torch.Tensor]:
    """`sinkdlm convert --from` the exported folder gives the checkpoint's config and weights; returns them."""
    assert main(["convert", "--from", str(folder), "--out", str(back)]) == 0
    (model, cfg), (again, cfg_again) = load_model(ckpt), load_model(back)
    assert cfg_again == cfg
    state, state_again = model.state_dict(), again.state_dict()
    assert state.keys() == state_again.keys() and all(torch.equal(state[k], state_again[k]) for k in state)
    return state


@pytest.mark.parametrize("name", ["front_sink_x2", "gqa_bias_tied", "mask_in_vocabulary"])
def test_convert_from_the_export_gives_the_checkpoint_back(tmp_path, name):
    ckpt = random_checkpoint(tmp_path, name, **VARIANTS[name])
    folder = tmp_path / "hf"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(folder)]) == 0
    back = tmp_path / "back"
    state = converted_back_equals(ckpt, folder, back)
    assert load_tokenizer(back).to_str() == load_tokenizer(ckpt).to_str()
    meta = load_meta(back)
    assert meta["step"] == 3 and meta["eos_id"] == 0 and meta["imported_from"] == str(folder)
    exported, _ = load_model(folder)  # sinkdlm reads the exported folder itself too
    assert all(torch.equal(state[k], exported.state_dict()[k]) for k in state)
    with pytest.raises(UserError, match="drop --sink-tokens"):
        checkpoint_from_export(folder, tmp_path / "other", sink_tokens=1)
    weights = load_file(str(folder / "model.safetensors"))
    save_file({k: v for k, v in weights.items() if k != "model.norm.weight"}, str(folder / "model.safetensors"))
    with pytest.raises(UserError, match=r"does not match its config.json \(norm.weight: None where"):
        checkpoint_from_export(folder, tmp_path / "edited")
    assert not (tmp_path / "edited").exists()


def test_an_earlier_export_is_replaced_whole_and_other_folders_never(tmp_path, monkeypatch):
    ckpt = random_checkpoint(tmp_path, "run")
    out = export(ckpt, tmp_path / "hf")
    (out / "stale.txt").write_text("from an older export")
    with pytest.raises(UserError, match="pass --overwrite"):
        export(ckpt, out)
    export(ckpt, out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "modeling_sinkdlm.py").is_file()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_module, "save_file", broken)
    before = sorted(p.name for p in out.iterdir())
    with pytest.raises(OSError, match="disk full"):
        export(ckpt, out, overwrite=True)
    assert sorted(p.name for p in out.iterdir()) == before  # the earlier export is untouched
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no leftovers
    monkeypatch.undo()

    hf_model = tmp_path / "someone-elses-model"
    hf_model.mkdir()
    (hf_model / "config.json").write_text("{}")
    with pytest.raises(UserError, match="refusing to delete it"):
        export(ckpt, hf_model, overwrite=True)
    assert (hf_model / "config.json").read_text() == "{}"
    with pytest.raises(UserError, match="inside the checkpoint"):
        export(ckpt, ckpt / "hf")
    assert not (ckpt / "hf").exists()


def test_an_export_made_before_the_transformers_layout_still_loads_and_converts(tmp_path):
    """Older exports hold the plain Config as config.json and DLM's weight names."""
    ckpt = random_checkpoint(tmp_path, "run", sink_tokens=1)
    old = tmp_path / "old"
    old.mkdir()
    for name in ("model.safetensors", "tokenizer.json"):
        (old / name).write_bytes((ckpt / name).read_bytes())
    (old / "config.json").write_text(json.dumps(load_config_of(ckpt).to_dict()))
    (old / "meta.json").write_text(json.dumps({**load_meta(ckpt), "exported_from": str(ckpt)}))
    model, cfg = load_model(old)
    assert cfg == load_config_of(ckpt)
    assert main(["convert", "--from", str(old), "--out", str(tmp_path / "back")]) == 0
    assert export(old, tmp_path / "new").is_dir()


@pytest.mark.parametrize("tie", [False, True])
@pytest.mark.parametrize("mask", ["extra_row", "mask_in_vocabulary"])
def test_llama_layout_loads_into_llama_and_converts_back(tmp_path, tie, mask):
    in_vocabulary = VARIANTS["mask_in_vocabulary"] if mask == "mask_in_vocabulary" else {}
    ckpt = random_checkpoint(tmp_path, "plain", n_head=4, n_query_groups=2, tie_embeddings=tie, **in_vocabulary)
    folder = tmp_path / "llama"
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(folder), "--llama"]) == 0
    llama, info = transformers.LlamaForCausalLM.from_pretrained(folder, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    ids = torch.tensor(IDS)
    with torch.no_grad():
        theirs, causal, bidirectional = llama(ids).logits, load_model(ckpt, causal=True)[0](ids), load_model(ckpt)[0](ids)
    assert theirs.shape == (2, 8, VOCAB + 1)  # the mask token's column is no prediction
    assert (theirs[..., :VOCAB] - causal).abs().max() < 1e-4  # the weights are ours; Llama attends causally
    assert not torch.allclose(theirs[..., :VOCAB], bidirectional, atol=1e-2)  # what the card warns of
    card = (folder / "README.md").read_text().replace("**", "")
    assert "attention is bidirectional" in card and f"`vocab_size` ({VOCAB + 1})" in card
    assert ("the LM head's row for it is zero" in card) == (not tie and not in_vocabulary)  # tied: wte's row
    assert ("the embedding's tied row" in card) == (tie and not in_vocabulary)
    assert (f"`mask_token_id` {VOCAB - 1}, a vocabulary token" in card) == bool(in_vocabulary)

    converted_back_equals(ckpt, folder, tmp_path / "back")


@pytest.mark.parametrize("model,named", [(dict(sink_tokens=1), "sink tokens"),
                                         (dict(attn_gate="headwise"), "attn_gate=headwise"),
                                         (dict(logit_shift=True), "logit_shift")])
def test_llama_layout_refuses_what_llama_cannot_hold(tmp_path, capsys, model, named):
    ckpt = random_checkpoint(tmp_path, "run", **model)
    assert main(["export", "--checkpoint", str(ckpt), "--out", str(tmp_path / "llama"), "--llama"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and named in err[0] and "without --llama" in err[0]
    assert not (tmp_path / "llama").exists()


def test_the_card_names_an_in_vocabulary_mask_as_the_tokenizers_own_token(tmp_path):
    folder = export(random_checkpoint(tmp_path, "run", **VARIANTS["mask_in_vocabulary"]), tmp_path / "hf")
    card = (folder / "README.md").read_text()
    assert f"vocabulary {VOCAB} (mask: the vocabulary's own token `w{VOCAB - 1}`, id {VOCAB - 1}; " in card
    assert MASK_TOKEN not in card
    own = (export(random_checkpoint(tmp_path, "own"), tmp_path / "own-hf") / "README.md").read_text()
    assert f"vocabulary {VOCAB} (+1 mask token `{MASK_TOKEN}`, id {VOCAB})" in own


def test_the_card_of_an_import_says_it_was_trained_elsewhere(tmp_path):
    meta = {"eos_id": 0, "converted_from": "GSAI-ML/LLaDA-8B-Base", "tokens": 0, "source_iter_num": 1200}
    folder = export(random_checkpoint(tmp_path, "run", step=0, meta=meta), tmp_path / "hf")
    card = (folder / "README.md").read_text()
    assert "- Training budget: trained elsewhere (GSAI-ML/LLaDA-8B-Base, iter_num 1200); " \
           "0 diffusion training steps in sinkdlm" in card
    assert "none yet" not in card
    fresh = export(random_checkpoint(tmp_path, "fresh", step=0, meta={"eos_id": 0}), tmp_path / "fresh-hf")
    assert "- Training budget: none yet" in (fresh / "README.md").read_text()


def test_an_export_killed_between_its_two_renames_is_restored_not_deleted(tmp_path):
    """A kill after the earlier export was moved aside but before the new one took its place leaves the
    only copy of the earlier export in the hidden trash folder; the next export puts it back first."""
    ckpt = random_checkpoint(tmp_path, "run")
    out = export(ckpt, tmp_path / "hf")
    files = {p.name: p.read_bytes() for p in out.iterdir()}
    trash, tmp = tmp_path / f"{TRASH_PREFIX}hf", tmp_path / f"{TMP_PREFIX}hf"
    out.rename(trash)  # what the kill leaves: the earlier export aside, a half-written new one
    tmp.mkdir()
    (tmp / "model.safetensors").write_bytes(b"half")
    with pytest.raises(UserError, match="pass --overwrite"):  # the restored export is not replaced unasked
        export(ckpt, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == files
    export(ckpt, out, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no leftovers
