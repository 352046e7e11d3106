"""Checksums of written files, recorded when a file is written and verified when it is read.

A record is `{"bytes", "sha256"}` (sample-store shards, checkpoint files). Reading checks the size
every time and re-hashes a file the first time this process reads it, or when its size or mtime
(ns) differ from when this process last hashed (or wrote) it, or always with `full=True`: a file
overwritten in place with the same size is caught by the next process that reads it. The mtime
stays in memory, not in the record, so that identical content gives identical records.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

# (st_dev, st_ino) -> (bytes, mtime_ns, sha256) of the files this process hashed: keyed by inode so
# that a file renamed into place (atomic writes) stays verified.
_hashed: dict[tuple[int, int], tuple[int, int, str]] = {}


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def record_file(path: Path) -> dict[str, Any]:
    """Hash a file just written (before it is renamed into place) and return its record."""
    status = os.stat(path)
    sha256 = file_sha256(path)
    _hashed[(status.st_dev, status.st_ino)] = (status.st_size, status.st_mtime_ns, sha256)
    return {"bytes": status.st_size, "sha256": sha256}


def check_file(path: Path, record: dict[str, Any], full: bool = False) -> str | None:
    """None if `path` still holds what `record` says, else what differs (to put in an error message)."""
    try:
        status = os.stat(path)
    except FileNotFoundError:
        return "is missing"
    if status.st_size != record["bytes"]:
        return f"has {status.st_size} bytes, {record['bytes']} were written (truncated or overwritten)"
    key, seen = (status.st_dev, status.st_ino), (status.st_size, status.st_mtime_ns, record["sha256"])
    if not full and _hashed.get(key) == seen:
        return None
    sha256 = file_sha256(path)
    if sha256 != record["sha256"]:
        return "does not match the sha256 recorded when it was written (changed on disk since)"
    _hashed[key] = seen
    return None
