"""The one way to write what must survive a crash: a temp name beside the target, fsync,
rename over the target, fsync the folder. A reader sees the old file or the new one, never
half of either.

Directories are staged the same way (:func:`atomic_directory`): the previous copy is kept as
``<name>.prev`` until the next successful write, and only a directory this module wrote
(it holds :data:`COMPLETE_MARKER`) is ever removed or replaced.
"""
from __future__ import annotations

import json
import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

COMPLETE_MARKER = ".haoping-complete"  # written last into a staged directory


def fsync_dir(path: str | Path) -> None:
    """Make a rename or create inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_file(path: str | Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_file(path: str | Path, write: Callable[[Path], None], mode: int | None = None,
                      durable: bool = True) -> Path:
    """Have ``write(temp_path)`` fill a new file, then rename it over ``path``; ``mode`` (e.g. 0o600)
    is set before any byte lands. ``durable=False`` skips the fsyncs: readers still see the old file
    or the new one whole, but a power loss may lose it (for files that are handed over, not kept)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{secrets.token_hex(4)}")
    os.close(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666 if mode is None else mode))
    try:
        write(tmp)
        if durable:
            fsync_file(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    if durable:
        fsync_dir(path.parent)
    return path


def atomic_write_bytes(path: str | Path, data: bytes, mode: int | None = None) -> Path:
    """Write ``data`` to ``path`` atomically (see :func:`atomic_write_file`)."""
    return atomic_write_file(path, lambda tmp: tmp.write_bytes(data), mode)


def atomic_write_text(path: str | Path, text: str, mode: int | None = None) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"), mode)


def atomic_write_json(path: str | Path, value, mode: int | None = None) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=2, ensure_ascii=False) + "\n", mode)


def fsync_tree(root: str | Path) -> None:
    """fsync every file and folder below ``root`` (files first, then their folders)."""
    for folder, _dirs, files in os.walk(root, topdown=False):
        for name in files:
            fsync_file(Path(folder) / name)
        fsync_dir(folder)


def is_complete(directory: str | Path) -> bool:
    """True for a directory :func:`atomic_directory` finished writing."""
    return (Path(directory) / COMPLETE_MARKER).is_file()


@contextmanager
def atomic_directory(target: str | Path) -> Iterator[Path]:
    """Yield an empty staging folder beside ``target``; when the block ends without an error,
    everything in it is fsynced, marked complete and renamed to ``target``. An existing
    complete ``target`` is kept as ``<target>.prev`` (the copy before it is dropped then).
    On an error the staging folder is removed and ``target`` is untouched.

    Raises FileExistsError when ``target`` (or its ``.prev``) exists but was not written here:
    nothing that this module did not write is ever replaced or deleted."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    previous = target.with_name(target.name + ".prev")
    for existing in (target, previous):
        if existing.exists() and not is_complete(existing):
            raise FileExistsError(f"{existing} exists and was not written by haoping; not replacing it")
    staging = target.with_name(f".{target.name}.staging-{secrets.token_hex(4)}")
    staging.mkdir()
    try:
        yield staging
        (staging / COMPLETE_MARKER).write_text("")
        fsync_tree(staging)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    if target.exists():
        if previous.exists():
            shutil.rmtree(previous)
        target.rename(previous)
    staging.rename(target)  # a crash just before this leaves <target>.prev: see latest_complete()
    fsync_dir(target.parent)


def latest_complete(target: str | Path) -> Path | None:
    """``target`` if it is complete, else its ``.prev`` if that is, else None."""
    target = Path(target)
    for candidate in (target, target.with_name(target.name + ".prev")):
        if is_complete(candidate):
            return candidate
    return None
