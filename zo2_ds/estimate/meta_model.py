"""The model to estimate, built on the meta device: a ``zo2_ds.bench`` shape name, a config.json or a model
directory (its config.json; no weights are read)."""

from __future__ import annotations

import contextlib
import dataclasses
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zo2_ds.bench.models import SHAPES, hf_config

__all__ = ["meta_model", "model_dims"]


def meta_model(model: str, dtype: torch.dtype, num_layers: int | None = None) -> nn.Module:
    """``model`` on the meta device, built in ``dtype``, its floating parameters cast to it (as DeepSpeed's
    fp16 / bf16 block casts them); ``num_layers``: keep only that many blocks (GPU memory does not depend on
    the number of streamed blocks). Raises ValueError naming ``model`` / ``num_layers`` and what is allowed."""
    if num_layers is not None and (not isinstance(num_layers, int) or num_layers < 1):
        raise ValueError(f"--num_layers: {num_layers!r} must be a positive integer")
    if model in SHAPES:
        shape = SHAPES[model]
        if num_layers is not None:
            shape = dataclasses.replace(shape, num_layers=num_layers)
        config, cls = hf_config(shape, use_cache=False)
        tied = shape.tied
    else:
        path = Path(model)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise ValueError(
                f"model: {model!r} is neither a zo2_ds.bench shape ({', '.join(sorted(SHAPES))}), "
                "a config.json file, nor a model directory holding one"
            )
        config, cls = _config_from_file(path), None
        if num_layers is not None:
            text = getattr(config, "get_text_config", lambda: config)()
            text.num_hidden_layers = num_layers
        tied = bool(getattr(config, "tie_word_embeddings", False))
    with _default_dtype(dtype), torch.device("meta"):
        if cls is not None:
            built = cls(config)
        else:
            from transformers import AutoModelForCausalLM

            built = AutoModelForCausalLM.from_config(config)
    if tied:
        built.tie_weights()
    # As DeepSpeed's fp16 / bf16 block: parameters cast, buffers kept as built (e.g. rotary inv_freq in fp32).
    for p in built.parameters():
        if p.is_floating_point():
            p.data = p.data.to(dtype)
    return built


def _config_from_file(path: Path) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"model: cannot read {str(path)!r} as a transformers config ({err})") from None


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype):
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(previous)


def model_dims(model: nn.Module) -> dict[str, int]:
    """The sizes that decide activations: hidden, ffn, vocab, heads, layers (from the HF config)."""
    cfg = model.config
    text = getattr(cfg, "get_text_config", lambda: cfg)()
    hidden = text.hidden_size  # HF maps GPT-2's n_embd / n_head / n_layer to these names
    ffn = getattr(text, "ffn_dim", None) or getattr(text, "intermediate_size", None) or getattr(text, "n_inner", None)
    return {
        "hidden": int(hidden),
        "ffn": int(ffn or 4 * hidden),
        "vocab": int(text.vocab_size),
        "heads": int(text.num_attention_heads),
        "layers": int(text.num_hidden_layers),
    }
