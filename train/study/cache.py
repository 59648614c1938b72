"""Finished-run cache: one JSON file per run, named by the hash of the run's configuration.

A run is identified by sha256(canonical JSON of its trainer config without the fields that cannot
change its result, plus CACHE_SCHEMA)[:16]. Records are written atomically (temporary file in the
same folder, fsync, os.replace), so a study killed at any moment leaves either the whole record or
none, and a restarted study skips every run whose record exists.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_SCHEMA = 1
# Fields that say where output goes or how chatty the trainer is, never what it computes.
NON_RESULT_FIELDS = frozenset({"out", "resume", "quiet", "checkpoint_every", "workers", "tensorboard"})


def config_hash(config: dict[str, Any]) -> str:
    """16 hex digits of sha256 over the sorted-key JSON of `config` minus NON_RESULT_FIELDS."""
    kept = {k: v for k, v in config.items() if k not in NON_RESULT_FIELDS}
    text = json.dumps({"schema": CACHE_SCHEMA, "config": kept}, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def write_json_atomic(path: Path, payload: Any) -> None:
    """Write `payload` as JSON to `path` so that readers see the old file or the whole new one."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(payload, f, indent=1, sort_keys=True, default=str)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class ResultCache:
    """Run records under `root/<hash>.json`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def path(self, key: str) -> Path:
        """Where the record of run `key` lives."""
        return self.root / f"{key}.json"

    def get(self, key: str) -> dict[str, Any] | None:
        """The record of run `key`, or None when it has not finished."""
        path = self.path(key)
        if not path.exists():
            return None
        try:
            record = json.loads(path.read_text())
        except json.JSONDecodeError as exc:
            raise ValueError(f"cache file {path} is not valid JSON ({exc}); delete it to re-run that run") from exc
        if record.get("key") != key:
            raise ValueError(f"cache file {path} holds run {record.get('key')!r}, not {key!r}")
        return record

    def put(self, key: str, record: dict[str, Any]) -> None:
        """Store the finished run's record atomically."""
        write_json_atomic(self.path(key), {**record, "key": key})

    def keys(self) -> list[str]:
        """Hashes of every finished run."""
        return sorted(p.stem for p in self.root.glob("*.json"))
