"""Writes that a kill at any instant leaves either the old content or the new, never a mix.

Every file is written under a temporary name in its final folder (``.tmp-`` prefix), flushed and fsynced,
renamed over the final name (``os.replace`` is atomic on POSIX), and then the folder is fsynced so the
rename itself survives a power loss. Whatever a kill leaves behind carries the ``.tmp-`` prefix, which
:class:`~zo2_ds.checkpoint.RunDirectory` removes at the next start.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

__all__ = [
    "TMP_PREFIX",
    "fsync_dir",
    "fsync_tree",
    "write_bytes_atomic",
    "write_text_atomic",
    "write_json_atomic",
    "remove_tree",
]

TMP_PREFIX = ".tmp-"
"""Names starting with this are temporary: a staging checkpoint, a file being replaced, a tree being deleted."""


def fsync_dir(path: str | os.PathLike) -> None:
    """Make the entries of folder ``path`` (creations, renames, deletions) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_file(path: str | os.PathLike) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: str | os.PathLike) -> None:
    """fsync every file below ``path`` (whoever wrote it), then every folder, deepest first."""
    for root, _dirs, files in os.walk(path, topdown=False):
        for name in files:
            _fsync_file(os.path.join(root, name))
        fsync_dir(root)


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    """Replace the file ``path`` with ``data`` atomically and durably."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}.{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Replace the file ``path`` with ``text`` (UTF-8) atomically and durably."""
    write_bytes_atomic(path, text.encode())


def _jsonable(value: Any) -> Any:
    if hasattr(value, "item"):  # a one-element tensor or numpy scalar
        return value.item()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(f"write_json_atomic: {type(value).__name__} is not JSON serializable")


def write_json_atomic(path: str | os.PathLike, obj: Any, *, indent: int | None = 2) -> None:
    """Replace the file ``path`` with ``obj`` as JSON atomically and durably (e.g. ``metrics.json``).

    Tensors and numpy scalars are written as numbers. The text is built before the file is touched, so an
    object that cannot be serialised leaves the old file as it was.
    """
    text = json.dumps(obj, indent=indent, default=_jsonable)
    write_text_atomic(path, text + "\n")


def remove_tree(path: str | os.PathLike) -> None:
    """Delete the folder ``path`` so that no kill leaves it half deleted under its own name.

    It is first renamed to a ``.tmp-delete-`` name (atomic), then deleted; a kill during the deletion
    leaves only a temporary name, which the next start removes.
    """
    path = Path(path)
    doomed = path.with_name(f"{TMP_PREFIX}delete-{path.name}.{os.getpid()}")
    os.replace(path, doomed)
    fsync_dir(path.parent)
    shutil.rmtree(doomed)
