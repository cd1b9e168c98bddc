"""The atomic-write helper: whole files or nothing, previous directory kept, foreign ones untouched."""
import os

import pytest

from haoping.atomic import (COMPLETE_MARKER, atomic_directory, atomic_write_bytes, atomic_write_json,
                            atomic_write_text, latest_complete)


def test_file_write_replaces_whole_and_leaves_no_temp(tmp_path):
    target = tmp_path / "a.json"
    atomic_write_text(target, "old")
    atomic_write_json(target, {"k": 1})
    assert target.read_text() == '{\n  "k": 1\n}\n'
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_file_mode_is_set(tmp_path):
    target = atomic_write_bytes(tmp_path / "token", b"secret", mode=0o600)
    assert os.stat(target).st_mode & 0o777 == 0o600


def test_failed_file_write_keeps_the_old_file(tmp_path, monkeypatch):
    target = tmp_path / "a.txt"
    atomic_write_text(target, "old")

    def broken_replace(*_):
        raise OSError("disk gone")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_text(target, "new")
    assert target.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["a.txt"]


def test_directory_keeps_previous_and_marks_complete(tmp_path):
    target = tmp_path / "model"
    for value in ("1", "2", "3"):
        with atomic_directory(target) as staging:
            (staging / "w").write_text(value)
    assert (target / "w").read_text() == "3"
    assert (tmp_path / "model.prev" / "w").read_text() == "2"
    assert (target / COMPLETE_MARKER).exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model", "model.prev"]


def test_directory_error_leaves_target_untouched(tmp_path):
    target = tmp_path / "model"
    with atomic_directory(target) as staging:
        (staging / "w").write_text("good")
    with pytest.raises(RuntimeError):
        with atomic_directory(target) as staging:
            (staging / "w").write_text("half")
            raise RuntimeError("crash while writing")
    assert (target / "w").read_text() == "good"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_foreign_directory_is_never_replaced(tmp_path):
    foreign = tmp_path / "data"
    foreign.mkdir()
    (foreign / "precious").write_text("x")
    with pytest.raises(FileExistsError):
        with atomic_directory(foreign) as staging:
            (staging / "w").write_text("1")
    assert (foreign / "precious").read_text() == "x"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_latest_complete_falls_back_to_prev(tmp_path):
    target = tmp_path / "model"
    assert latest_complete(target) is None
    for value in ("1", "2"):
        with atomic_directory(target) as staging:
            (staging / "w").write_text(value)
    (target / COMPLETE_MARKER).unlink()  # as if a crash hit between the two renames
    assert latest_complete(target) == tmp_path / "model.prev"
