"""Verified checkpoints: one directory per checkpoint under a store folder, e.g.
``checkpoints/cycle-000040/``, written through :func:`haoping.atomic.atomic_directory` (a temp
name, every file fsynced, renamed, the folder fsynced) with a ``manifest.json`` that holds each
file's size and sha256.

Loading verifies the manifest and that every tensor is finite. A checkpoint that fails is
refused with one line naming the file and the reason and renamed aside (never deleted); the
previous good one is used instead. Only the newest ``keep`` are kept, and older ones are
deleted only after a newer one is complete and verified; nothing that is not a complete haoping
checkpoint is ever deleted.
"""
from __future__ import annotations

import hashlib
import json
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from haoping.atomic import COMPLETE_MARKER, atomic_directory, is_complete
from haoping.log import get_logger

log = get_logger(__name__)

MANIFEST = "manifest.json"
FORMAT = "haoping-checkpoint/1"
LABEL = re.compile(r"[A-Za-z0-9._-]{1,64}")
REFUSED_SUFFIX = ".refused-"


class CheckpointError(ValueError):
    """A checkpoint that must not be loaded; ``str()`` is one line naming the file and the reason."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path} refused: {reason}")
        self.path, self.reason = path, reason


def cycle_label(cycle: int) -> str:
    """The label of the checkpoint taken after ``cycle`` cycles, e.g. cycle-000040."""
    return f"cycle-{cycle:06d}"


def check_label(label: str) -> str:
    """``label`` when it is a plain folder name the store may create, else ValueError."""
    if not LABEL.fullmatch(label or "") or label.startswith(".") or REFUSED_SUFFIX in label:
        raise ValueError(f"label must match [A-Za-z0-9._-]{{1,64}} and not start with '.', got {label!r}")
    return label


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _payload_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.rglob("*") if p.is_file() and p.name not in (MANIFEST, COMPLETE_MARKER))


def write_manifest(directory: Path, sequence: int, extra: dict | None = None) -> dict:
    """Record every file's size and sha256; ``sequence`` orders checkpoints (newest: highest)."""
    files = {str(p.relative_to(directory)): {"size": p.stat().st_size, "sha256": _sha256(p)}
             for p in _payload_files(directory)}
    manifest = {"format": FORMAT, "sequence": int(sequence), "created": time.time(), "files": files,
                **(extra or {})}
    (directory / MANIFEST).write_text(json.dumps(manifest, indent=1))
    return manifest


def read_manifest(directory: Path) -> dict:
    path = Path(directory) / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(path, "missing") from None
    except (OSError, ValueError) as err:
        raise CheckpointError(path, f"unreadable ({err.__class__.__name__})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT or not isinstance(manifest.get("files"), dict):
        raise CheckpointError(path, f"not a {FORMAT} manifest")
    return manifest


def verify_checkpoint(directory: str | Path) -> dict:
    """The manifest when every file matches it and every tensor is finite; CheckpointError otherwise."""
    import torch
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    directory = Path(directory)
    if not is_complete(directory):
        raise CheckpointError(directory / COMPLETE_MARKER, "missing: the write did not finish")
    manifest = read_manifest(directory)
    for name, expected in manifest["files"].items():
        path = directory / name
        if not path.is_file():
            raise CheckpointError(path, "missing")
        size = path.stat().st_size
        if size != expected["size"]:
            raise CheckpointError(path, f"size {size} bytes, the manifest says {expected['size']}")
        if _sha256(path) != expected["sha256"]:
            raise CheckpointError(path, "sha256 differs from the manifest")
        if name.endswith(".safetensors"):
            try:
                tensors = load_file(path)
            except (SafetensorError, OSError, RuntimeError) as err:
                raise CheckpointError(path, f"unreadable safetensors ({err})") from None
            for key, tensor in tensors.items():
                if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
                    raise CheckpointError(path, f"tensor {key} has non-finite values")
    return manifest


def quarantine(directory: Path) -> Path:
    """Rename a refused checkpoint aside (never delete it): <name>.refused-<UTC time>."""
    aside = directory.with_name(f"{directory.name}{REFUSED_SUFFIX}{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}")
    n = 1
    while aside.exists():
        aside = aside.with_name(f"{aside.name}-{n}")
        n += 1
    directory.rename(aside)
    return aside


class CheckpointStore:
    """The checkpoint folders under ``root``: write, find the newest good one, prune."""

    def __init__(self, root: str | Path, keep: int = 3):
        if keep < 1:
            raise ValueError(f"keep must be >= 1, got {keep}")
        self.root, self.keep = Path(root), keep

    def path_of(self, label: str) -> Path:
        return self.root / check_label(label)

    @contextmanager
    def writing(self, label: str, sequence: int, extra: dict | None = None) -> Iterator[Path]:
        """Yield a staging folder to fill; on success it gets a manifest, is fsynced, renamed to
        ``root/label`` and verified. Call :meth:`prune` afterwards to drop old ones."""
        target = self.path_of(label)
        self.root.mkdir(parents=True, exist_ok=True)
        if target.is_symlink():
            raise FileExistsError(f"{target} is a symlink; not writing through it")
        with atomic_directory(target) as staging:
            yield staging
            write_manifest(staging, sequence, extra)
        previous = target.with_name(target.name + ".prev")
        verify_checkpoint(target)
        if is_complete(previous) and self._is_checkpoint(previous):
            shutil.rmtree(previous)  # same label written again; the new copy is verified

    def _is_checkpoint(self, directory: Path) -> bool:
        try:
            read_manifest(directory)
        except CheckpointError:
            return False
        return is_complete(directory) and not directory.is_symlink()

    def candidates(self) -> list[Path]:
        """Checkpoint folders, newest first (by manifest sequence, then creation time); ones whose
        manifest cannot be read come first so that they are refused before an older one is used."""
        if not self.root.is_dir():
            return []
        keyed = []
        for path in self.root.iterdir():
            if not path.is_dir() or path.is_symlink() or path.name.startswith(".") or REFUSED_SUFFIX in path.name \
                    or path.name.endswith(".prev"):
                continue
            try:
                manifest = read_manifest(path)
                keyed.append(((0, manifest["sequence"], manifest.get("created", 0)), path))
            except CheckpointError:
                keyed.append(((1, 0, 0), path))
        return [path for _, path in sorted(keyed, key=lambda item: item[0], reverse=True)]

    def newest_good(self) -> Path | None:
        """The newest checkpoint that verifies; each newer one that does not is logged in one
        line and moved aside."""
        for path in self.candidates():
            try:
                verify_checkpoint(path)
                return path
            except CheckpointError as err:
                aside = quarantine(path)
                log.error("%s; moved aside to %s", err, aside.name)
        return None

    def prune(self) -> list[Path]:
        """Delete complete checkpoints beyond the newest ``keep``; only after the newest verifies."""
        complete = [p for p in self.candidates() if self._is_checkpoint(p)]
        if not complete:
            return []
        verify_checkpoint(complete[0])
        removed = []
        for old in complete[self.keep:]:
            shutil.rmtree(old)
            removed.append(old)
        return removed


def policy_of(path: str | Path) -> Path:
    """The policy folder a path names: a run directory's newest good checkpoint's policy, a
    checkpoint's ``policy/``, or the path itself (a ``save_pretrained`` folder)."""
    path = Path(path)
    if (path / "checkpoints").is_dir():
        newest = CheckpointStore(path / "checkpoints").newest_good()
        if newest is None:
            raise CheckpointError(f"{path} has no good checkpoint under checkpoints/")
        return newest / "policy"
    if (path / "policy").is_dir():
        return path / "policy"
    return path


def checkpoint_interval(every_seconds: float, last_checkpoint_seconds: float, max_overhead: float) -> float:
    """Seconds between checkpoints by time: ``every_seconds`` (0: none by time), stretched so that
    writing them takes at most ``max_overhead`` of the run (a checkpoint of ``last_checkpoint_seconds``
    is followed by at least that / ``max_overhead`` seconds of training)."""
    if every_seconds <= 0:
        return 0.0
    if max_overhead <= 0:
        return every_seconds
    return max(every_seconds, last_checkpoint_seconds / max_overhead)
