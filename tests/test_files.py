"""Files are written atomically and with the umask's usual mode (checkpoints were 0600)."""

import os
import stat

import pytest

from sinkdlm.files import atomic_open, atomic_write

UMASK = 0o022  # a common umask: files 0644


@pytest.fixture
def umask_022():
    old = os.umask(UMASK)
    yield 0o666 & ~UMASK
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_atomic_write_replaces_whole_files_with_the_umask_mode(tmp_path, umask_022):
    path = tmp_path / "results.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_bytes() == b"new" and mode(path) == umask_022
    assert [p.name for p in tmp_path.iterdir()] == ["results.json"]  # no temporary file left


def test_a_failed_write_leaves_the_old_file(tmp_path):
    path = tmp_path / "cache.jsonl"
    atomic_write(path, "kept\n")
    with pytest.raises(RuntimeError), atomic_open(path) as f:
        f.write("half")
        raise RuntimeError("killed")
    assert path.read_text() == "kept\n" and [p.name for p in tmp_path.iterdir()] == ["cache.jsonl"]


def test_checkpoint_files_get_the_umask_mode(tmp_path, umask_022):
    """safetensors' save_file creates 0600 files: other users of a shared run folder could not read them."""
    from sinkdlm.checkpoint import save_checkpoint
    from sinkdlm.config import Config
    from sinkdlm.model import DLM
    from tests.conftest import tiny

    ckpt = save_checkpoint(tmp_path / "run", 1, DLM(tiny()).state_dict(), Config(model=tiny()), {"eos_id": 0},
                           trainer_state={"step": 1})
    modes = {p.name: oct(mode(p)) for p in ckpt.iterdir()}
    assert set(modes.values()) == {oct(umask_022)}, modes
