"""The base directory rule and the atomic write's file permissions."""

import os
import stat

import pytest
import torch
from tritonchat.engine.checkpoint import model_path, save_checkpoint
from tritonchat.engine.paths import atomic_write, get_base_dir
from tritonchat.engine.tokenizer import Tokenizer


def test_base_dir_rule(tmp_path, monkeypatch):
    home, work = tmp_path / "home", tmp_path / "work"
    work.mkdir()
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(work)
    monkeypatch.delenv("TRITONCHAT_BASE_DIR", raising=False)
    assert get_base_dir() == str(home / ".cache" / "tritonchat")  # nothing here: the per-user default
    (work / ".tritonchat").mkdir()
    assert get_base_dir() == str(work / ".tritonchat")  # a checkout after `make demo`
    monkeypatch.setenv("TRITONCHAT_BASE_DIR", "elsewhere")
    assert get_base_dir() == str(work / "elsewhere")  # the variable wins, made absolute
    monkeypatch.setenv("TRITONCHAT_BASE_DIR", "")
    assert get_base_dir() == str(work / ".tritonchat")  # empty counts as unset
    assert not (home / ".cache").exists()  # nothing is created


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask():
    """Set the process umask for a test; the previous one is restored after it."""
    old = os.umask(0o022)
    yield lambda mask: os.umask(mask)
    os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o002, 0o077])
def test_atomic_write_respects_umask(tmp_path, umask, mask):
    umask(mask)
    path = tmp_path / "sub" / "file.bin"
    atomic_write(path, lambda f: f.write(b"one"))
    assert path.read_bytes() == b"one" and mode(path) == 0o666 & ~mask
    atomic_write(path, lambda f: f.write(b"two"))  # replacing keeps the rule
    assert path.read_bytes() == b"two" and mode(path) == 0o666 & ~mask
    assert os.listdir(path.parent) == ["file.bin"]


def test_atomic_write_failure_keeps_the_old_file(tmp_path):
    path = tmp_path / "file.bin"
    atomic_write(path, lambda f: f.write(b"old"))

    def fail(f):
        f.write(b"half")
        raise RuntimeError("disk gone")

    with pytest.raises(RuntimeError):
        atomic_write(path, fail)
    assert path.read_bytes() == b"old" and os.listdir(tmp_path) == ["file.bin"]


def test_checkpoint_and_tokenizer_files_are_readable_by_others(tmp_path, umask):
    umask(0o022)
    save_checkpoint(tmp_path / "ckpt", 1, {"w": torch.ones(2)}, {"m": torch.zeros(2)}, {"step": 1})
    tok = Tokenizer.train_from_iterator(["hello world, hello there"] * 4, 270)
    tok.save(tmp_path / "tokenizer")
    files = [p for d in ("ckpt", "tokenizer") for p in (tmp_path / d).iterdir()]
    assert len(files) == 5 and model_path(tmp_path / "ckpt", 1) in files
    assert {p.name: mode(p) for p in files} == {p.name: 0o644 for p in files}
