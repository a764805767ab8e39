"""The one map from dtype names (command lines, configs) to torch dtypes. Imports nothing of zo2_ds."""

from __future__ import annotations

import torch

__all__ = ["DTYPES", "torch_dtype"]

DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_ALIASES = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16"}


def torch_dtype(name: str | torch.dtype, *, what: str = "dtype") -> torch.dtype:
    """``DTYPES[name]`` (also accepting torch's spellings, e.g. "bfloat16", or a torch.dtype);
    ``what`` names the setting in the error for anything else."""
    if isinstance(name, torch.dtype):
        if name not in DTYPES.values():
            raise ValueError(f"{what} {name} is not supported; choose one of {', '.join(DTYPES)}")
        return name
    key = _ALIASES.get(str(name).lower(), str(name).lower())
    if key not in DTYPES:
        raise ValueError(f"{what} {name!r} is not supported; choose one of {', '.join(DTYPES)}")
    return DTYPES[key]
