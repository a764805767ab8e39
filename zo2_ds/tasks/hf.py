"""Loading an HF causal LM and its tokenizer from a local folder or a hub id."""

from __future__ import annotations

import os

import torch
from torch import nn

__all__ = ["DTYPES", "load_causal_lm", "load_tokenizer"]

DTYPES: dict[str, torch.dtype] = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}


def load_causal_lm(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "fp32") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in fp32, fp16 or bf16 (weights on the CPU)."""
    from transformers import AutoModelForCausalLM

    if isinstance(dtype, str):
        if dtype.lower() not in DTYPES:
            raise ValueError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
        dtype = DTYPES[dtype.lower()]
    return AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), dtype=dtype)


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer saved with the model (``AutoTokenizer.from_pretrained``)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.fspath(name_or_path))
