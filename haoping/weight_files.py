"""Weights handed over as a file in a folder the trainer and a co-located generator share.

The trainer writes its policy as a safetensors file once per version into
``--local-weights-dir``; a generator started with the same folder reads it from there instead
of receiving it over gRPC. The name is ``policy-v<version>-<tag>.safetensors``: the tag is 16 hex
digits the trainer draws when it starts, so a restarted trainer never reuses an old file's name.
The trainer announces version, tag and size; the generator checks the tag's form and builds the
path under its own folder flag, so nothing a caller sends names a path.

The file becomes visible whole (temp name, rename) and is never rewritten, so a reader sees a
complete file or none. It is not fsynced: it is a hand-over, not state; a crash loses nothing the
trainer cannot write again. It is not hashed either: it never crossed a network. The generator
still checks every tensor (shapes, dtypes, finite values) before serving it.
"""
from __future__ import annotations

import os
import re
import secrets
from pathlib import Path
from typing import Callable

from haoping.atomic import atomic_write_file

NAME = re.compile(r"policy-v(\d{1,20})-([0-9a-f]{16})\.safetensors")
# what atomic_write_file leaves of such a file when its writer is killed mid-write
PARTIAL = re.compile(r"\.policy-v\d{1,20}-[0-9a-f]{16}\.safetensors\.tmp-[0-9a-f]{8}")
TAG = re.compile(r"[0-9a-f]{16}")
KEEP = 2  # the newest versions kept: the current one, and the one a slow reader may still open


def new_tag() -> str:
    """A trainer's tag for the files it writes (see the module docstring)."""
    return secrets.token_hex(8)


def weight_file_name(version: int, tag: str) -> str:
    """The file of policy ``version`` written by the trainer whose tag is ``tag``."""
    if version < 0 or not TAG.fullmatch(tag):
        raise ValueError(f"no weight file name for version {version} and tag {tag[:80]!r}")
    return f"policy-v{version}-{tag}.safetensors"


def publish_weight_file(directory: str | Path, version: int, tag: str, write: Callable[[Path], None],
                        keep: int = KEEP) -> Path:
    """Have ``write(path)`` write policy ``version`` into ``directory`` unless its file is there
    already; keep this tag's newest ``keep`` versions and drop every other weight file (those of
    trainers that ran before: one live trainer per folder), and what a killed writer left half
    written. → its path"""
    directory = Path(directory)
    path = directory / weight_file_name(version, tag)
    if not path.exists():
        directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        atomic_write_file(path, write, mode=0o600, durable=False)
    entries = list(directory.iterdir())
    for partial in (p for p in entries if PARTIAL.fullmatch(p.name)):
        partial.unlink(missing_ok=True)  # the caller holds the folder's only writer: no write is under way
    files = [(int(m.group(1)), m.group(2), p) for p in entries if (m := NAME.fullmatch(p.name))]
    newest = set(sorted(v for v, t, _ in files if t == tag)[-keep:]) | {version}
    for file_version, file_tag, old in files:
        if file_tag != tag or file_version not in newest:
            old.unlink(missing_ok=True)
    return path


def read_weight_file(directory: str | Path, version: int, tag: str, size: int, max_bytes: int) -> bytearray:
    """The bytes of the file :func:`publish_weight_file` wrote for ``version`` and ``tag``, which
    must be ``size`` bytes long (at most ``max_bytes``). ValueError for a malformed tag; OSError
    when the file is missing, unreadable, a symlink or of another size."""
    if size > max_bytes:
        raise OSError(f"a weight file of {size} bytes was announced; this policy's fit in {max_bytes}")
    path = Path(directory) / weight_file_name(version, tag)
    fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as f:
        actual = os.fstat(f.fileno()).st_size
        if actual != size:
            raise OSError(f"{path} holds {actual} bytes, {size} were announced")
        data = bytearray(size)
        if f.readinto(data) != size:
            raise OSError(f"{path} was cut short while being read")
    return data
