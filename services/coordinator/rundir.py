"""A run's directory across restarts: its saved config (checked on resume), ``cycles.jsonl``
holding each cycle index once, and the name a ``--fresh`` run gets.

    runs/<name>/config.json              the run's flags, written once
    runs/<name>/cycles.jsonl             one line per cycle, each index once
    runs/<name>/cycles.superseded.jsonl  lines from after a checkpoint, redone since
    runs/<name>/checkpoints/cycle-NNNNNN verified checkpoints (haoping.checkpoint)
"""
from __future__ import annotations

import json
from pathlib import Path

from haoping.atomic import atomic_write_json, atomic_write_text

# flags that may differ when a run is continued; every other flag must match the saved config
MAY_CHANGE = frozenset({
    "name", "runs_dir", "fresh", "cycles", "max_seconds", "score_timeout", "rpc_timeout", "service_wait_seconds",
    "checkpoint_every", "checkpoint_every_seconds", "checkpoint_max_overhead", "keep_checkpoints",
    "max_restarts_per_hour", "warm_spares",
    "max_kl", "min_distinct2_ratio", "max_repetition_rate", "trainer_nproc", "trainer_fsdp", "trainer_address",
    "generator_addresses", "scorer_address", "metrics_address", "device",
    "auth_token_file", "tls_ca", "tls_cert", "tls_key",
})


class ConfigMismatch(ValueError):
    pass


def fresh_name(runs_dir: Path, name: str) -> str:
    """``name`` if no run uses it yet, else the first free ``name-2``, ``name-3``, ..."""
    candidate, n = name, 1
    while (runs_dir / candidate).exists():
        n += 1
        candidate = f"{name}-{n}"
    return candidate


def settings_of(args) -> dict:
    return {k: v for k, v in vars(args).items() if k != "func"}


def save_config(run_dir: Path, args) -> None:
    atomic_write_json(run_dir / "config.json", settings_of(args))


def resumed_settings(run_dir: Path, args, defaults: dict) -> dict:
    """The saved config, with the flags that may change taken from ``args``. A flag given now
    (differing from its default) that differs from the saved value raises ConfigMismatch."""
    saved = json.loads((run_dir / "config.json").read_text(encoding="utf-8"))
    current = settings_of(args)
    refused = [name for name, value in current.items()
               if name not in MAY_CHANGE and name in saved and value != defaults.get(name)
               and _comparable(value) != _comparable(saved[name])]
    if refused:
        flags = ", ".join(f"--{n.replace('_', '-')} {current[n]!r} (the run has {saved[n]!r})" for n in refused)
        raise ConfigMismatch(f"{run_dir.name} was started with other settings: {flags}; continue it without "
                             "them, or start a new run with --fresh")
    merged = {**current, **{k: v for k, v in saved.items() if k not in MAY_CHANGE}}
    return merged


def _comparable(value):
    return list(value) if isinstance(value, tuple) else value


class CycleLog:
    """``cycles.jsonl``: appended a line per cycle; :meth:`rewind` keeps each index once."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / "cycles.jsonl"
        self.superseded = run_dir / "cycles.superseded.jsonl"

    def records(self) -> list[dict]:
        records = []
        for line in self._lines():
            try:
                records.append(json.loads(line))
            except ValueError:
                continue  # a line cut short by a crash; rewind() moves it aside
        return records

    def _lines(self) -> list[str]:
        if not self.path.exists():
            return []
        return [line for line in self.path.read_text(encoding="utf-8").splitlines() if line.strip()]

    def rewind(self, next_cycle: int) -> int:
        """Keep the lines of cycles before ``next_cycle`` (the first of each index); move the
        rest to cycles.superseded.jsonl. Returns how many moved."""
        kept, moved, seen = [], [], set()
        for line in self._lines():
            try:
                index = json.loads(line)["cycle"]
            except (ValueError, KeyError, TypeError):
                index = None
            if isinstance(index, int) and index < next_cycle and index not in seen:
                kept.append(line)
                seen.add(index)
            else:
                moved.append(line)
        if moved:
            with open(self.superseded, "a", encoding="utf-8") as out:
                out.write("".join(line + "\n" for line in moved))
            atomic_write_text(self.path, "".join(line + "\n" for line in kept))
        return len(moved)

    def append(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
