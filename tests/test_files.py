"""teacher/files.py: the one atomic-write helper (files, streamed files, folders), one temporary name."""

from __future__ import annotations

import os

import pytest

from teacher.files import FOLDER_MARKER, atomic_file, atomic_folder, temp_path, write_atomic


def test_temp_path_convention(tmp_path):
    assert temp_path(tmp_path / "a.json") == tmp_path / f".a.json.tmp-{os.getpid()}"


def test_write_atomic_text_and_bytes(tmp_path):
    path = tmp_path / "a.txt"
    write_atomic(path, "héllo\n")
    assert path.read_text() == "héllo\n"
    write_atomic(path, b"\x00\x01")
    assert path.read_bytes() == b"\x00\x01"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_write_atomic_failure_keeps_the_old_file_and_no_temporary(tmp_path):
    path = tmp_path / "a.txt"
    write_atomic(path, "old")
    with pytest.raises(TypeError):
        write_atomic(path, 3)                                  # not bytes or text
    assert path.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt"]


def test_atomic_file_streams_through_the_temporary(tmp_path):
    path = tmp_path / "t.bin"
    with atomic_file(path) as tmp:
        assert tmp == temp_path(path)
        tmp.write_bytes(b"data")
        assert not path.exists()
    assert path.read_bytes() == b"data" and not tmp.exists()
    with pytest.raises(RuntimeError):
        with atomic_file(path) as tmp:
            tmp.write_bytes(b"partial")
            raise RuntimeError("writer died")
    assert path.read_bytes() == b"data" and not tmp.exists()


def test_atomic_folder_replaces_or_keeps(tmp_path):
    folder = tmp_path / "out"
    with atomic_folder(folder) as tmp:
        assert tmp == temp_path(folder)
        (tmp / "a").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_folder(folder) as tmp:
            (tmp / "b").write_text("2")
            raise RuntimeError("crash")
    assert sorted(p.name for p in folder.iterdir()) == [FOLDER_MARKER, "a"]
    with atomic_folder(folder) as tmp:
        (tmp / "c").write_text("3")
    assert sorted(p.name for p in folder.iterdir()) == [FOLDER_MARKER, "c"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
