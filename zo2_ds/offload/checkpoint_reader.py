"""Reading a safetensors checkpoint folder one tensor at a time, for :mod:`~zo2_ds.offload.materialize`.

Each tensor is read with safetensors' ``safe_open(...).get_tensor`` in a ``safe_open`` of its own: the
file is memory-mapped, and the mapped pages a read touches count in the process's RSS for as long as the
file stays open (a shard kept open while all its tensors are read would add the whole shard). So the
transient host memory of a read is the tensor's mapped pages plus the copy ``get_tensor`` returns, and
nothing of the model stays in pageable memory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["SafetensorsCheckpoint"]

_INDEX = "model.safetensors.index.json"
_SINGLE = "model.safetensors"
# Bytes per element of safetensors' dtype names (a dtype not listed counts as 8, the widest).
_ITEMSIZE = {"F64": 8, "I64": 8, "U64": 8, "F32": 4, "I32": 4, "U32": 4, "F16": 2, "BF16": 2, "I16": 2, "U16": 2}


class SafetensorsCheckpoint:
    """A folder written by ``save_pretrained``: ``config.json`` and ``model.safetensors`` or the shards
    ``model.safetensors.index.json`` maps tensors to."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = os.fspath(folder)
        self.base_prefix = ""  # the model's base_model_prefix, e.g. "model": keys may lack it (or it theirs)
        if not os.path.isdir(self.folder):
            raise ValueError(f"materialize: source {self.folder!r} is not a folder (nor a transformers config)")
        index_path, single = os.path.join(self.folder, _INDEX), os.path.join(self.folder, _SINGLE)
        if os.path.isfile(index_path):
            with open(index_path) as f:
                weight_map = json.load(f)["weight_map"]
            shards = sorted({os.path.join(self.folder, shard) for shard in weight_map.values()})
        elif os.path.isfile(single):
            shards = [single]
        else:
            raise ValueError(
                f"materialize: {self.folder!r} has neither {_SINGLE} nor {_INDEX}; save the model with "
                "save_pretrained (safe_serialization, the default) or pass a transformers config for random init"
            )
        self.shard_of: dict[str, str] = {}
        self.nbytes: dict[str, int] = {}
        for shard in shards:
            for key, (dtype, shape) in _header(shard).items():
                self.shard_of[key] = shard
                self.nbytes[key] = _ITEMSIZE.get(dtype, 8) * int(torch.Size(shape).numel())

    def config(self) -> Any:
        """The folder's transformers config."""
        from transformers import AutoConfig

        if not os.path.isfile(os.path.join(self.folder, "config.json")):
            raise ValueError(f"materialize: {self.folder!r} has no config.json")
        return AutoConfig.from_pretrained(self.folder)

    def max_transient_bytes(self) -> int:
        """Pageable host bytes a read may hold at once: the largest tensor's mapped pages and its copy."""
        return 2 * max(self.nbytes.values(), default=0)

    def key_for(self, names: Sequence[str], required: bool = True) -> str | None:
        """The checkpoint's key for a tensor the model calls ``names`` (several for tied parameters), also
        trying each without / with the base model prefix (a checkpoint of the base model, e.g. OPT's
        ``decoder.*``). Raises ValueError when it has none and ``required``."""
        prefix = f"{self.base_prefix}." if self.base_prefix else ""
        for name in names:
            tries = [name, name[len(prefix) :] if prefix and name.startswith(prefix) else prefix + name]
            for key in tries:
                if key in self.shard_of:
                    return key
        if required:
            raise ValueError(
                f"materialize: {self.folder!r} has no tensor for {' / '.join(names)}: it was not saved from this "
                "architecture (or needs transformers' key conversions, which materialize does not apply)"
            )
        return None

    def read(self, key: str) -> torch.Tensor:
        """Tensor ``key`` as stored, in pageable memory of its own (the file is closed again)."""
        from safetensors import safe_open

        with safe_open(self.shard_of[key], framework="pt") as f:
            return f.get_tensor(key)

    def read_into(self, key: str, out: torch.Tensor) -> None:
        """Copy tensor ``key`` into ``out``, converting to ``out``'s dtype."""
        tensor = self.read(key)
        self._check_shape(key, tensor.shape, out.shape)
        out.copy_(tensor)

    def read_bytes_into(self, key: str, like: torch.Tensor, start: int, out: torch.Tensor) -> None:
        """Bytes ``[start, start + out.numel())`` of tensor ``key`` converted to ``like``'s dtype (contiguous, of
        ``like``'s shape) into the uint8 tensor ``out``. Only the rows (first-dimension slices) holding those
        bytes are read from the file: a rank's shard of a block costs the reads of its own part."""
        from safetensors import safe_open

        end = start + out.numel()
        with safe_open(self.shard_of[key], framework="pt") as f:
            piece = f.get_slice(key)
            self._check_shape(key, torch.Size(piece.get_shape()), like.shape)
            if like.dim() == 0:
                first, tensor = 0, f.get_tensor(key)
            else:
                row_bytes = like[0].numel() * like.element_size()
                first = start // row_bytes
                tensor = piece[first : -(-end // row_bytes)]
                first *= row_bytes
        raw = tensor.to(like.dtype).contiguous().reshape(-1).view(torch.uint8)
        out.copy_(raw[start - first : end - first])

    def _check_shape(self, key: str, stored: torch.Size, expected: torch.Size) -> None:
        if stored != expected:
            raise ValueError(
                f"materialize: {key} in {self.folder!r} has shape {tuple(stored)}, the model expects "
                f"{tuple(expected)} (does config.json belong to these weights?)"
            )


def _header(path: str) -> dict[str, tuple[str, list[int]]]:
    """``key -> (dtype name, shape)`` from a safetensors file's header, without reading any tensor."""
    from safetensors import safe_open

    out = {}
    with safe_open(path, framework="pt") as f:
        for key in f.keys():
            piece = f.get_slice(key)
            out[key] = (piece.get_dtype(), piece.get_shape())
    return out
