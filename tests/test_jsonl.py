import pytest

from sinkdlm.errors import UserError
from sinkdlm.jsonl import read_jsonl


def test_rows_with_line_numbers_and_clear_errors(tmp_path):
    good = tmp_path / "a.jsonl"
    good.write_text('{"prompt": "x"}\n\n{"prompt": "y", "extra": 1}\n')
    assert [(n, r["prompt"]) for n, r in read_jsonl(good, ["prompt"])] == [(1, "x"), (3, "y")]
    for text, match in [('{"prompt": 3}\n', r"a\.jsonl:1: expected .*'prompt'"), ("[1]\n", "a.jsonl:1"),
                        ("{oops\n", r"a\.jsonl:1: not valid JSON")]:
        good.write_text(text)
        with pytest.raises(UserError, match=match):
            list(read_jsonl(good, ["prompt"]))
    good.write_bytes(b'{"prompt": "\xff"}\n')
    with pytest.raises(UserError, match="not UTF-8"):
        list(read_jsonl(good, ["prompt"]))


@pytest.mark.parametrize("name", ["p.jsonl", "p.json", "P.JSONL"])
def test_generate_sft_and_corpora_agree_on_what_a_jsonl_file_is(tmp_path, name):
    """One suffix rule (sinkdlm.jsonl.is_jsonl, also SFT's): SFT read .json as JSON Lines while generate
    read it as plain lines and corpora skipped it; SFT alone missed an upper-case .JSONL."""
    import argparse

    from sinkdlm.commands.generate import read_prompts
    from sinkdlm.data.sources import corpus_files

    path = tmp_path / name
    path.write_text('{"prompt": "x", "text": "x"}\n')
    assert read_prompts(argparse.Namespace(prompt=None, input=str(path))) == ["x"]
    assert corpus_files(tmp_path) == [path]
