"""What a checkpoint folder must hold: ``manifest.json`` records every file's size and sha256, the step, and
the model's fingerprint (its parameter names and shapes), so a damaged checkpoint, or one of another model, is
refused before DeepSpeed reads a byte of it, with an error that names the file and what is wrong."""

from __future__ import annotations

import hashlib
import json
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "MANIFEST_NAME",
    "CheckpointError",
    "model_fingerprint",
    "check_fingerprint",
    "write_manifest",
    "read_manifest",
    "verify_files",
]

MANIFEST_NAME = "manifest.json"
FORMAT = "zo2_ds.checkpoint/1"
_CHUNK_BYTES = 8 << 20


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: missing, damaged, incomplete, or of another model or run."""


def model_fingerprint(module: torch.nn.Module) -> dict[str, Any]:
    """Every parameter's name and shape (and dtype), and one sha256 over the names and shapes.

    Reads metadata only (no tensor data), so it is cheap with offloaded blocks too.
    """
    shapes = {name: list(p.shape) for name, p in module.named_parameters()}
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in module.parameters()})
    digest = hashlib.sha256(json.dumps(shapes, sort_keys=True).encode()).hexdigest()
    return {"sha256": digest, "num_tensors": len(shapes), "dtypes": dtypes, "shapes": shapes}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    buf = bytearray(_CHUNK_BYTES)
    view = memoryview(buf)
    with open(path, "rb", buffering=0) as f:
        while n := f.readinto(buf):
            h.update(view[:n])
    return h.hexdigest()


def _files(folder: Path) -> list[str]:
    found = []
    for root, _dirs, names in os.walk(folder):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), folder)
            if rel != MANIFEST_NAME:
                found.append(rel)
    return sorted(found)


def _digests(folder: Path, names: list[str]) -> dict[str, str]:
    # hashlib releases the GIL on large updates: a few threads hash several files at once.
    with ThreadPoolExecutor(max_workers=max(1, min(8, os.cpu_count() or 1, len(names)))) as pool:
        return dict(zip(names, pool.map(lambda rel: _sha256(folder / rel), names)))


def write_manifest(
    folder: str | os.PathLike, *, step: int, fingerprint: dict[str, Any], run_info: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Hash every file below ``folder`` and write ``folder/manifest.json`` (fsynced). Returns the manifest.

    The files must be complete and fsynced first; the manifest is the last file a checkpoint gets.
    """
    folder = Path(folder)
    names = _files(folder)
    digests = _digests(folder, names)
    manifest = {
        "format": FORMAT,
        "step": int(step),
        "saved_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "files": {rel: {"bytes": (folder / rel).stat().st_size, "sha256": digests[rel]} for rel in names},
        "model": fingerprint,
        "run_info": run_info or {},
    }
    with open(folder / MANIFEST_NAME, "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    return manifest


def read_manifest(folder: str | os.PathLike) -> dict[str, Any]:
    """The manifest of checkpoint ``folder``, or a :class:`CheckpointError` naming what is wrong with it."""
    path = Path(folder) / MANIFEST_NAME
    if not path.is_file():
        raise CheckpointError(
            f"{path} is missing: {Path(folder).name} is not a complete zo2_ds checkpoint (damaged, or written "
            "by an older version without manifests)"
        )
    try:
        manifest = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path} is damaged: it does not read as JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        found = manifest.get("format") if isinstance(manifest, dict) else type(manifest).__name__
        raise CheckpointError(f"{path}: format {found!r}, expected {FORMAT!r}")
    return manifest


def verify_files(folder: str | os.PathLike, manifest: dict[str, Any]) -> None:
    """Check every file the manifest lists: present, of its recorded size, with its recorded sha256.

    Sizes are checked first (cheap; a truncated file is named as such), then the contents are hashed.
    """
    folder = Path(folder)
    files = manifest["files"]
    for rel, record in files.items():
        path = folder / rel
        if not path.is_file():
            raise CheckpointError(f"{path} is missing (listed in {folder / MANIFEST_NAME})")
        size = path.stat().st_size
        if size != record["bytes"]:
            what = "truncated" if size < record["bytes"] else "longer than it was saved"
            raise CheckpointError(f"{path} is {what}: {size} bytes, the manifest records {record['bytes']}")
    digests = _digests(folder, list(files))
    for rel, record in files.items():
        if digests[rel] != record["sha256"]:
            raise CheckpointError(
                f"{folder / rel} is damaged: its contents changed since it was saved (sha256 {digests[rel][:12]}..., "
                f"the manifest records {record['sha256'][:12]}...)"
            )


def check_fingerprint(saved: dict[str, Any], current: dict[str, Any], where: str) -> None:
    """A :class:`CheckpointError` naming the first parameters that differ when ``saved`` is another model's."""
    if saved["sha256"] == current["sha256"]:
        return
    old, new = saved["shapes"], current["shapes"]
    missing = [n for n in new if n not in old]
    extra = [n for n in old if n not in new]
    reshaped = [f"{n} {old[n]} -> {new[n]}" for n in new if n in old and old[n] != new[n]]
    details = []
    if reshaped:
        details.append(f"shapes differ (checkpoint -> model): {', '.join(reshaped[:3])}")
    if missing:
        details.append(f"the model has parameters the checkpoint lacks: {', '.join(missing[:3])}")
    if extra:
        details.append(f"the checkpoint has parameters the model lacks: {', '.join(extra[:3])}")
    raise CheckpointError(
        f"{where} is a checkpoint of another model ({saved['num_tensors']} parameter tensors, this model has "
        f"{current['num_tensors']}): {'; '.join(details) or 'parameter order differs'}"
    )
