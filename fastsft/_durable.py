"""Durable publication: everything flushed to disk before the rename that makes it visible.

A crash (or a kill) must never leave a half-written checkpoint (fastsft.train.checkpoint), tokenized data
cache (fastsft.data.dataset) or file such as a run's config.yaml: readers see the old state or the new one.
Standard library only, so any layer may import it.
"""

from __future__ import annotations

import os
import secrets
import shutil
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


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Replace the file at `path` with `data`, or create it, so that nobody ever sees a part of it.

    The bytes go to a hidden sibling first (same directory, hence same file system: the rename is atomic),
    which is flushed to disk before os.replace puts it in place; then the directory is flushed, so the
    rename itself survives a power loss. On any failure the sibling is removed and `path` keeps its old content.
    """
    path = Path(path)
    # pid and a random suffix: two writers of the same file (processes or threads) never share a sibling.
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        with open(tmp, "xb") as file:  # created with the umask's permissions, like a plain write
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:  # KeyboardInterrupt too: never leave the sibling behind
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    """`atomic_write_bytes` of `text` encoded as UTF-8."""
    atomic_write_bytes(path, text.encode("utf-8"))


def retire(path: Path) -> None:
    """Remove the directory `path` with one rename first (a hidden `.<name>.retired-<pid>` sibling, then the
    deletion): readers never see it half-deleted, and a kill mid-deletion leaves only the hidden sibling."""
    path = Path(path)
    retired = path.with_name(f".{path.name}.retired-{os.getpid()}")
    os.replace(path, retired)
    shutil.rmtree(retired, ignore_errors=True)


def publish_dir(staging: Path, final: Path) -> None:
    """Make the finished directory `staging` visible as `final` (replacing an existing `final`) so that readers
    see all of it or none of it: its files and itself flushed to disk, the old copy retired, one rename, the
    parent flushed (the rename survives a power loss). `staging` must be a sibling of `final`."""
    staging, final = Path(staging), Path(final)
    fsync_tree(staging)
    if final.exists():
        retire(final)
    os.replace(staging, final)
    fsync_path(final.parent)
