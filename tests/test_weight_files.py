"""Weights handed over as files in a folder a trainer and its co-located generators share."""
import hashlib
import os

import pytest

from haoping.weight_files import publish_weight_file, read_weight_file, weight_file_name


def _publish(directory, version: int, data: bytes):
    sha = hashlib.sha256(data).hexdigest()
    return publish_weight_file(directory, version, data, sha), sha


def test_a_published_file_reads_back_under_the_name_its_version_and_hash_give(tmp_path):
    data = os.urandom(1000)
    path, sha = _publish(tmp_path / "w", 3, data)
    assert path.name == weight_file_name(3, sha) == f"policy-v3-{sha[:16]}.safetensors"
    assert read_weight_file(tmp_path / "w", 3, sha, len(data), max_bytes=1000) == data
    assert oct(path.stat().st_mode & 0o777) == "0o600"
    assert [p.name for p in (tmp_path / "w").iterdir()] == [path.name]  # no temp file left


def test_a_version_is_written_once_and_only_the_newest_two_stay(tmp_path):
    first, _ = _publish(tmp_path, 1, b"one")
    inode = first.stat().st_ino
    assert _publish(tmp_path, 1, b"one")[0].stat().st_ino == inode  # not rewritten
    _publish(tmp_path, 2, b"two")
    third, _ = _publish(tmp_path, 3, b"three")
    assert sorted(p.name.split("-")[1] for p in tmp_path.iterdir()) == ["v2", "v3"]
    (tmp_path / "notes.txt").write_text("not ours")
    _publish(tmp_path, 4, b"four")
    assert sorted(p.name for p in tmp_path.iterdir() if not p.name.startswith("policy-v4")) == \
        ["notes.txt", third.name]


def test_reads_refuse_other_sizes_symlinks_missing_files_and_oversized_announcements(tmp_path):
    data = b"x" * 64
    path, sha = _publish(tmp_path / "w", 5, data)
    with pytest.raises(OSError, match="holds 64 bytes, 65 were announced"):
        read_weight_file(tmp_path / "w", 5, sha, 65, max_bytes=100)
    with pytest.raises(OSError, match="announced"):
        read_weight_file(tmp_path / "w", 5, sha, 64, max_bytes=63)
    with pytest.raises(FileNotFoundError):
        read_weight_file(tmp_path / "w", 6, sha, 64, max_bytes=100)
    target = tmp_path / "elsewhere"
    target.write_bytes(data)
    path.unlink()
    path.symlink_to(target)
    with pytest.raises(OSError):
        read_weight_file(tmp_path / "w", 5, sha, 64, max_bytes=100)


@pytest.mark.parametrize("version, sha", [(-1, "a" * 64), (1, "../" + "a" * 61), (1, "A" * 64), (1, "a" * 63),
                                          (1, "a" * 64 + "/x")])
def test_only_a_version_and_a_hex_sha256_make_a_name(version, sha):
    with pytest.raises(ValueError):
        weight_file_name(version, sha)
