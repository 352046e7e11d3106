"""Cross-process locks for cached stages, so parallel sweep jobs (the joblib launcher, SLURM arrays on
a shared disk) that need the same model or sample store build it once: the first job trains or
samples while the others wait, then find it finished in the cache."""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


@contextlib.contextmanager
def exclusive(target: Path, lock_dir: Path) -> Iterator[None]:
    """Hold an exclusive lock for `target` (`<lock_dir>/<parent>-<name>.lock`, blocking) during the block."""
    target = Path(target)
    lock_path = Path(lock_dir) / f"{target.parent.name}-{target.name}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a+") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another job building %s", target)
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            handle.seek(0)
            handle.truncate()
            handle.write(str(os.getpid()))
            handle.flush()
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
