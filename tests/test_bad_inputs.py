"""Bad input to generate and analyze (issue 20): one line naming the file and the fix, exit 2, and
nothing lost: an existing output survives a refusal, a failure or an interrupt."""

import json
import math
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from sinkdlm.cli import main
from sinkdlm.errors import UserError
from sinkdlm.sample import SampleConfig
from tests.test_outputs import word_checkpoint

TOO_LONG = " ".join(["w5"] * 80)  # the tiny model's block_size is 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return word_checkpoint(tmp_path_factory.mktemp("ckpt"))


@pytest.fixture
def run(monkeypatch, capsys):
    """The CLI in process: (exit code, stderr)."""
    monkeypatch.setattr(sys, "argv", list(sys.argv))

    def call(*args) -> tuple[int, str]:
        code = main([str(a) for a in args])
        return code, capsys.readouterr().err
    return call


def generate(ckpt, *args):
    return ("generate", "--checkpoint", ckpt, "--gen-length", 4, "--steps", 4, *args)


def one_error_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "error:" in line]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---- text files that are not UTF-8 ---------------------------------------------------------------


@pytest.mark.parametrize("name, content", [("p.txt", b"w3 w4\nw5 \xff\n"),
                                           ("p.jsonl", b'{"prompt": "w3"}\n{"prompt": "w5 \xff"}\n')])
def test_generate_names_the_line_and_byte_of_an_input_that_is_not_utf8(ckpt, tmp_path, run, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    code, err = run(*generate(ckpt, "--input", path))
    offset = content.index(b"\xff")
    assert code == 2 and f"{path}:2: byte {offset} (0xff) is not UTF-8" in one_error_line(err)
    assert "iconv" in err


def test_analyze_names_a_latin1_text_file(ckpt, tmp_path, run):
    path = tmp_path / "latin1.txt"
    path.write_bytes("w3 café".encode("latin-1"))
    code, err = run("analyze", "--checkpoint", ckpt, "--text", path, "--out", tmp_path / "report")
    assert code == 2 and f"{path}:1: byte 6 (0xe9) is not UTF-8" in one_error_line(err)
    assert not (tmp_path / "report").exists()


def test_the_byte_offset_is_the_files_not_a_read_buffers(tmp_path):
    """Text-mode reading decodes in 8 KiB chunks and reported the offset within the chunk."""
    from sinkdlm.jsonl import read_jsonl, read_text

    path = tmp_path / "big.jsonl"
    head = b'{"prompt": "w3"}\n' * 1000
    path.write_bytes(head + b'{"prompt": "\xe9"}\n')
    with pytest.raises(UserError, match=rf"big.jsonl:1001: byte {len(head) + 12} \(0xe9\)"):
        list(read_jsonl(path, ["prompt"]))
    with pytest.raises(UserError, match=rf"big.jsonl:1001: byte {len(head) + 12} "):
        read_text(path)


# ---- a checkpoint's tokenizer.json that is not a tokenizer ------------------------------------------


@pytest.mark.parametrize("content", ['{"version": "1.0", "model": {"type": "BPE"', '{"hello": "world"}', "[1, 2]"])
def test_a_damaged_tokenizer_json_is_named(ckpt, tmp_path, run, content):
    import shutil

    damaged = tmp_path / "run" / ckpt.name
    shutil.copytree(ckpt, damaged)
    (damaged / "tokenizer.json").write_text(content)
    for command in (generate(damaged, "--prompt", "w3"), ("export", "--checkpoint", damaged, "--out", tmp_path / "hf")):
        code, err = run(*command)
        line = one_error_line(err)
        assert code == 2 and f"tokenizer file {damaged / 'tokenizer.json'} is not a readable tokenizer" in line
        assert "copy the tokenizer of its training data there" in line


def test_a_damaged_tokenizer_of_prepared_data_is_named(tiny_data, tmp_path):
    import shutil

    from sinkdlm.data.shards import PackedData

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    packed = PackedData(data)
    (data / packed.meta["tokenizer_file"]).write_text("{")
    with pytest.raises(UserError, match=r"tokenizer file .* is not a readable tokenizer .*; prepare the data again"):
        _ = packed.tokenizer


# ---- output paths ------------------------------------------------------------------------------------


def test_generate_refuses_a_folder_as_output(ckpt, tmp_path, run):
    code, err = run(*generate(ckpt, "--prompt", "w3", "--output", tmp_path))
    assert code == 2 and f"--output {tmp_path} is a folder" in one_error_line(err)


def test_analyze_refuses_a_file_as_report_folder(ckpt, tmp_path, run):
    taken = tmp_path / "notes.txt"
    taken.write_text("mine\n")
    for out in (taken, taken / "report"):
        code, err = run("analyze", "--checkpoint", ckpt, "--prompt", "w3", "--out", out, "--steps", 4,
                        "--gen-length", 4)
        assert code == 2 and f"{taken} is a file, not a folder" in one_error_line(err)
    assert taken.read_text() == "mine\n"


def test_generate_keeps_an_existing_output_unless_told_to_overwrite(ckpt, tmp_path, run):
    out = tmp_path / "out.jsonl"
    out.write_text("earlier results\n")
    code, err = run(*generate(ckpt, "--prompt", "w3", "--output", out))
    assert code == 2 and "already exists; pass --overwrite" in one_error_line(err)
    assert out.read_text() == "earlier results\n"
    assert run(*generate(ckpt, "--prompt", "w3", "--output", out, "--overwrite"))[0] == 0
    assert json.loads(out.read_text())["prompt"] == "w3"


@pytest.mark.parametrize("name, rows, where", [
    ("p.txt", ["w3", "w4", "", TOO_LONG], "prompt 3 (PATH:4)"),
    ("p.jsonl", [json.dumps({"prompt": p}) for p in ("w3", "w4", TOO_LONG)], "prompt 3 (PATH:3)")])
def test_every_prompt_is_checked_before_any_is_generated(ckpt, tmp_path, run, monkeypatch, name, rows, where):
    """The too-long third prompt was found after two batches, named "prompt 0" (its index in its batch),
    and the output file had already been emptied."""
    import sinkdlm.sample

    def no_generation(*args, **kwargs):
        raise AssertionError("generated before checking every prompt")

    path, out = tmp_path / name, tmp_path / "out.jsonl"
    path.write_text("\n".join(rows) + "\n")
    out.write_text("earlier results\n")
    monkeypatch.setattr(sinkdlm.sample, "generate", no_generation)
    code, err = run(*generate(ckpt, "--input", path, "--batch-size", 1, "--output", out, "--overwrite"))
    line = one_error_line(err)
    assert code == 2 and where.replace("PATH", str(path)) + ": 80 prompt tokens" in line
    assert out.read_text() == "earlier results\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([name, "out.jsonl"])  # no temporary file


def test_an_interrupted_generate_leaves_no_half_file(ckpt, tmp_path, run, monkeypatch):
    import sinkdlm.sample

    real, calls = sinkdlm.sample.generate, []

    def interrupted_after_one_batch(*args, **kwargs):
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(sinkdlm.sample, "generate", interrupted_after_one_batch)
    out = tmp_path / "out.jsonl"
    code, _ = run(*generate(ckpt, "--prompt", "w3", "--prompt", "w4", "--batch-size", 1, "--output", out))
    assert code == 130 and list(tmp_path.iterdir()) == []


# ---- sampler settings --------------------------------------------------------------------------------


@pytest.mark.parametrize("bad, match", [
    (dict(temperature=math.nan), "temperature=nan must be a finite number >= 0"),
    (dict(temperature=math.inf), "temperature=inf must be a finite number >= 0"),
    (dict(guidance=math.inf), "guidance=inf must be a finite number >= 0"),
    (dict(guidance=math.nan), "guidance=nan must be a finite number >= 0"),
    (dict(guidance=-0.5), "guidance=-0.5 must be a finite number >= 0"),  # was silently off (guided: > 0)
    (dict(gen_length=4, steps=8), r"steps=8 is more than gen_length=4.*pass steps <= 4"),
    (dict(gen_length=8, block_length=4, steps=10), r"steps=10 is more than gen_length=8"),
])
def test_sampler_settings_refuse_values_that_were_accepted_without_a_word(bad, match):
    with pytest.raises(UserError, match=match):
        SampleConfig(**bad)


@pytest.mark.parametrize("args, match", [
    (["--guidance", "inf"], "guidance=inf must be a finite number"),
    (["--steps", "8"], "steps=8 is more than gen_length=4")])
def test_generate_and_eval_gsm8k_refuse_them_in_one_line(ckpt, tmp_path, run, args, match):
    import re

    code, err = run(*generate(ckpt, "--prompt", "w3", *args))
    assert code == 2 and re.search(match, one_error_line(err))
    code, err = run("eval-gsm8k", "--checkpoint", ckpt, "--data", "synthetic", "--limit", 1, "--gen-length", 4,
                    "--steps", 4, "--out", tmp_path / "gsm8k", *args)
    assert code == 2 and re.search(match, one_error_line(err))


# ---- weights that are not finite -----------------------------------------------------------------------


def test_nan_weights_are_refused_naming_the_tensor(ckpt, tmp_path, run):
    import shutil

    from sinkdlm.checkpoint import load_model

    broken = tmp_path / "run" / ckpt.name
    shutil.copytree(ckpt, broken)
    weights = load_file(str(broken / "model.safetensors"))
    name = sorted(weights)[-1]
    weights[name].view(-1)[0] = torch.nan
    save_file(weights, str(broken / "model.safetensors"))
    with pytest.raises(UserError, match=rf"tensor {name} holds NaN or inf values"):
        load_model(broken)
    code, err = run(*generate(broken, "--prompt", "w3"))
    assert code == 2 and f"tensor {name} holds NaN or inf" in one_error_line(err)
