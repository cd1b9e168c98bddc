"""Weights handed over as a file in a folder the trainer and a co-located generator share.

The trainer writes its serialized policy (the safetensors bytes it would stream) once per
version into ``--local-weights-dir``; a generator started with the same folder reads it from
there instead of receiving it over gRPC. The file's name follows from the policy version and the
sha256 the trainer announces, so nothing a caller sends names a path: both sides compute it.

The file becomes visible whole (temp name, rename) and is never rewritten, so a reader sees a
complete file or none. It is not fsynced: it is a hand-over, not state; a crash loses nothing the
trainer cannot write again. It is not hashed on read either: it never crossed a network, and a
file of another content would carry another name. The generator still checks every tensor (shapes,
dtypes, finite values) before serving it.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

from haoping.atomic import atomic_write_bytes

NAME = re.compile(r"policy-v(\d{1,20})-([0-9a-f]{16})\.safetensors")
KEEP = 2  # the newest versions kept: the current one, and the one a slow reader may still open


def weight_file_name(version: int, sha256: str) -> str:
    """The file of policy ``version`` whose bytes hash to ``sha256`` (hex)."""
    if version < 0 or not re.fullmatch(r"[0-9a-f]{64}", sha256):
        raise ValueError(f"no weight file name for version {version} and sha256 {sha256[:80]!r}")
    return f"policy-v{version}-{sha256[:16]}.safetensors"


def publish_weight_file(directory: str | Path, version: int, data: bytes, sha256: str, keep: int = KEEP) -> Path:
    """Write ``data`` (policy ``version``, hashing to ``sha256``) into ``directory`` unless that
    file is there already; drop all but the newest ``keep`` versions' files. → its path"""
    directory = Path(directory)
    path = directory / weight_file_name(version, sha256)
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_bytes(path, data, mode=0o600, durable=False)
    files = sorted(((int(m.group(1)), p) for p in directory.iterdir() if (m := NAME.fullmatch(p.name))),
                   key=lambda item: item[0])
    newest = {v for v, _ in files[-keep:]} | {version}
    for file_version, old in files:
        if file_version not in newest:
            old.unlink(missing_ok=True)
    return path


def read_weight_file(directory: str | Path, version: int, sha256: str, size: int, max_bytes: int) -> bytearray:
    """The bytes of the file :func:`publish_weight_file` wrote for ``version`` and ``sha256``, which
    must be ``size`` bytes long (at most ``max_bytes``). OSError when it is missing, unreadable, a
    symlink or of another size."""
    if size > max_bytes:
        raise OSError(f"a weight file of {size} bytes was announced; this policy's fit in {max_bytes}")
    path = Path(directory) / weight_file_name(version, sha256)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise OSError(f"{path} holds {actual} bytes, {size} were announced")
        data = bytearray(size)
        if f.readinto(data) != size:
            raise OSError(f"{path} was cut short while being read")
    return data
