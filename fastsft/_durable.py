"""Durable publication of a directory: everything flushed to disk before the rename that makes it visible.

Used by the two things a crash must never leave half-written: checkpoints (fastsft.train.checkpoint) and
the tokenized data cache (fastsft.data.dataset). Standard library only, so any layer may import it.
"""

from __future__ import annotations

import os
from pathlib import Path


def fsync_path(path: Path) -> None:
    """Flush one file, or a directory's entries (a rename into it is then on disk), to disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(directory: Path) -> None:
    """Flush every file under `directory` and the directory itself (before the rename publishes it)."""
    for path in [*sorted(p for p in Path(directory).rglob("*") if p.is_file()), Path(directory)]:
        fsync_path(path)
