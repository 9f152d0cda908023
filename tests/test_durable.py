"""fastsft._durable: a file replaced atomically holds the old content or the new one, and nothing is left behind."""

import os

import pytest

from fastsft import _durable
from fastsft._durable import atomic_write_bytes, atomic_write_text


def test_atomic_write_text_creates_then_replaces_and_leaves_only_the_file(tmp_path):
    path = tmp_path / "config.yaml"
    atomic_write_text(path, "seed: 1\n")
    assert path.read_text(encoding="utf-8") == "seed: 1\n"
    atomic_write_text(path, "seed: 2\n# é, 中\n")
    assert path.read_text(encoding="utf-8") == "seed: 2\n# é, 中\n"
    assert sorted(os.listdir(tmp_path)) == ["config.yaml"]  # no hidden temporary sibling


def test_atomic_write_bytes_writes_exactly_the_bytes(tmp_path):
    path = tmp_path / "blob"
    data = bytes(range(256)) + b"\r\n"
    atomic_write_bytes(path, data)
    assert path.read_bytes() == data
    assert os.listdir(tmp_path) == ["blob"]


def test_the_file_gets_the_permissions_of_a_plain_write(tmp_path):
    (tmp_path / "plain").write_text("x")
    atomic_write_text(tmp_path / "atomic", "x")
    assert (tmp_path / "atomic").stat().st_mode == (tmp_path / "plain").stat().st_mode


def test_the_directory_is_flushed_after_the_rename(tmp_path, monkeypatch):
    flushed = []
    monkeypatch.setattr(_durable, "fsync_path", lambda path: flushed.append((path, path.joinpath("f").exists())))
    atomic_write_text(tmp_path / "f", "x")
    assert flushed == [(tmp_path, True)]  # the parent, once the file is in place


@pytest.mark.parametrize("failing", ["replace", "fsync"])
def test_a_failed_write_keeps_the_old_content_and_leaves_no_temporary_file(tmp_path, monkeypatch, failing):
    path = tmp_path / "config.yaml"
    path.write_text("old\n", encoding="utf-8")

    def boom(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, failing, boom)  # the rename, or flushing the written temporary file
    with pytest.raises(OSError, match="No space left"):
        atomic_write_text(path, "new\n")
    monkeypatch.undo()
    assert path.read_text(encoding="utf-8") == "old\n"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_an_interrupt_during_the_write_removes_the_temporary_file_too(tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", interrupted)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(tmp_path / "new.yaml", "x")
    monkeypatch.undo()
    assert os.listdir(tmp_path) == []  # neither the file nor its temporary sibling
