"""Weights handed over as files in a folder a trainer and its co-located generators share."""
import os
from pathlib import Path

import pytest

from haoping.weight_files import new_tag, publish_weight_file, read_weight_file, weight_file_name


def _publish(directory, version: int, data: bytes, tag: str) -> Path:
    return publish_weight_file(directory, version, tag, lambda path: path.write_bytes(data))


def test_a_published_file_reads_back_under_the_name_its_version_and_tag_give(tmp_path):
    data, tag = os.urandom(1000), new_tag()
    path = _publish(tmp_path / "w", 3, data, tag)
    assert path.name == weight_file_name(3, tag) == f"policy-v3-{tag}.safetensors"
    assert read_weight_file(tmp_path / "w", 3, tag, len(data), max_bytes=1000) == data
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in (tmp_path / "w").iterdir()] == [path.name]  # no temp file left


def test_a_version_is_written_once_and_the_folder_keeps_this_trainers_newest_two(tmp_path):
    old_trainer, tag = new_tag(), new_tag()
    stale = _publish(tmp_path, 9, b"before a restart", old_trainer)
    first = _publish(tmp_path, 1, b"one", tag)
    assert not stale.exists()  # a trainer that ran before is gone
    inode = first.stat().st_ino
    assert _publish(tmp_path, 1, b"one", tag).stat().st_ino == inode  # not rewritten
    _publish(tmp_path, 2, b"two", tag)
    third = _publish(tmp_path, 3, b"three", tag)
    assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["v2", "v3"]
    (tmp_path / "notes.txt").write_text("not ours")
    _publish(tmp_path, 4, b"four", tag)
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("policy-v4")) == \
        ["notes.txt", third.name]


def test_what_a_killed_writer_left_half_written_is_removed_and_nothing_else(tmp_path):
    tag = new_tag()
    partial = tmp_path / f".policy-v3-{tag}.safetensors.tmp-0a1b2c3d"  # atomic_write_file's temp name
    partial.write_bytes(b"half")
    lookalike = tmp_path / ".policy-v3.tmp-notes"
    lookalike.write_text("not ours")
    path = _publish(tmp_path, 4, b"four", tag)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, lookalike.name])


def test_a_failed_write_leaves_no_file(tmp_path):
    def broken(path):
        path.write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        publish_weight_file(tmp_path, 1, new_tag(), broken)
    assert list(tmp_path.iterdir()) == []


def test_reads_refuse_other_sizes_symlinks_missing_files_and_oversized_announcements(tmp_path):
    data, tag = b"x" * 64, new_tag()
    path = _publish(tmp_path / "w", 5, data, tag)
    with pytest.raises(OSError, match="holds 64 bytes, 65 were announced"):
        read_weight_file(tmp_path / "w", 5, tag, 65, max_bytes=100)
    with pytest.raises(OSError, match="announced"):
        read_weight_file(tmp_path / "w", 5, tag, 64, max_bytes=63)
    with pytest.raises(FileNotFoundError):
        read_weight_file(tmp_path / "w", 6, tag, 64, max_bytes=100)
    target = tmp_path / "elsewhere"
    target.write_bytes(data)
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(OSError):
        read_weight_file(tmp_path / "w", 5, tag, 64, max_bytes=100)


@pytest.mark.parametrize("version, tag", [(-1, "a" * 16), (1, "../" + "a" * 13), (1, "A" * 16), (1, "a" * 15),
                                          (1, "a" * 16 + "/x"), (1, "")])
def test_only_a_version_and_a_16_hex_digit_tag_make_a_name(version, tag):
    with pytest.raises(ValueError):
        weight_file_name(version, tag)
