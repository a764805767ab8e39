"""Random-init models of real shapes, built on the device, and the batches the benchmarks feed them.

A 13B model built on the CPU with HF's default init takes minutes; here the module tree is made with
init skipped, directly on the target device and in the target dtype, and the weights are drawn there
(normal(0, 0.02) for matrices, ones for norm scales, zeros for biases). The head is tied to the
embedding exactly where the real model ties it (OPT); HF's ``no_init_weights`` skips the tying that
``post_init`` would do, so it is redone here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from zo2_ds.dtypes import DTYPES

__all__ = ["ModelShape", "SHAPES", "DTYPES", "build_model", "hf_config", "make_batch", "block_list", "parameter_bytes"]


@dataclass(frozen=True)
class ModelShape:
    """The config fields that decide a model's cost. ``ffn_size`` 0 means 4 x ``hidden_size``."""

    name: str
    family: str  # "opt", "llama" or "qwen2"
    hidden_size: int
    num_layers: int
    num_heads: int
    vocab_size: int
    tied: bool
    num_kv_heads: int = 0  # 0: as many as num_heads
    ffn_size: int = 0
    max_positions: int = 2048

    @property
    def ffn(self) -> int:
        return self.ffn_size or 4 * self.hidden_size


SHAPES = {
    s.name: s
    for s in (
        ModelShape("opt-125m", "opt", 768, 12, 12, 50272, True),
        ModelShape("opt-1.3b", "opt", 2048, 24, 32, 50272, True),
        ModelShape("opt-6.7b", "opt", 4096, 32, 32, 50272, True),
        ModelShape("opt-13b", "opt", 5120, 40, 40, 50272, True),
        ModelShape("opt-30b", "opt", 7168, 48, 56, 50272, True),
        ModelShape("opt-66b", "opt", 9216, 64, 72, 50272, True),
        ModelShape("opt-175b", "opt", 12288, 96, 96, 50272, True),
        ModelShape("llama-2-7b", "llama", 4096, 32, 32, 32000, False, ffn_size=11008, max_positions=4096),
        ModelShape("qwen2.5-7b", "qwen2", 3584, 28, 28, 152064, False, num_kv_heads=4, ffn_size=18944),
        # CPU smoke runs: seconds, not minutes.
        ModelShape("tiny", "opt", 64, 4, 4, 1000, True, max_positions=256),
        ModelShape("tiny-llama", "llama", 64, 4, 4, 1000, False, num_kv_heads=2, ffn_size=128, max_positions=256),
    )
}


def hf_config(shape: ModelShape, use_cache: bool) -> tuple[Any, type]:
    import transformers as tf

    sizes = {"hidden_size": shape.hidden_size, "num_hidden_layers": shape.num_layers, "vocab_size": shape.vocab_size}
    sizes.update(num_attention_heads=shape.num_heads, max_position_embeddings=shape.max_positions)
    common = {**sizes, "tie_word_embeddings": shape.tied, "use_cache": use_cache}
    if shape.family == "opt":  # no dropout: the ZO passes run without it anyway, and timings stay comparable
        extra = {"ffn_dim": shape.ffn, "word_embed_proj_dim": shape.hidden_size, "dropout": 0.0}
        return tf.OPTConfig(**common, **extra, attention_dropout=0.0, layerdrop=0.0), tf.OPTForCausalLM
    extra = {"intermediate_size": shape.ffn, "num_key_value_heads": shape.num_kv_heads or shape.num_heads}
    if shape.family == "llama":
        return tf.LlamaConfig(**common, **extra), tf.LlamaForCausalLM
    if shape.family == "qwen2":
        return tf.Qwen2Config(**common, **extra), tf.Qwen2ForCausalLM
    raise ValueError(f"family: {shape.family!r} is not one of 'opt', 'llama', 'qwen2'")


def build_model(
    name: str, device: torch.device | str, dtype: torch.dtype = torch.float16, *, use_cache: bool = False
) -> torch.nn.Module:
    """A random-init causal LM of the named shape (``SHAPES``), allocated and initialised on ``device``.

    ``use_cache`` is off as for training: with it on, every forward also builds a KV cache.
    """
    from transformers.initialization import no_init_weights

    if name not in SHAPES:
        raise ValueError(f"model: {name!r} is not one of {sorted(SHAPES)}")
    shape = SHAPES[name]
    config, cls = hf_config(shape, use_cache)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with no_init_weights(), torch.device(device):
            model = cls(config)
    finally:
        torch.set_default_dtype(previous)
    if shape.tied:
        model.tie_weights()
    gen = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.02, generator=gen)
            else:
                p.fill_(1.0 if pname.endswith("weight") else 0.0)
    return model


def make_batch(name: str, batch_size: int, seq_len: int, device: torch.device | str) -> dict[str, torch.Tensor]:
    """Random token ids (seeded, the same for every run) as a causal-LM training batch with labels."""
    shape = SHAPES[name]
    if seq_len > shape.max_positions:
        raise ValueError(f"seq_len: {seq_len} is over {name}'s {shape.max_positions} positions")
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, shape.vocab_size, (batch_size, seq_len), generator=gen).to(device)
    return {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids), "labels": input_ids}


def block_list(model: torch.nn.Module) -> torch.nn.ModuleList:
    """The decoder blocks of a model built by :func:`build_model`."""
    inner = model.model
    return inner.decoder.layers if hasattr(inner, "decoder") else inner.layers


def parameter_bytes(module: torch.nn.Module) -> int:
    """Bytes of the distinct parameters of ``module`` (a tied tensor counts once)."""
    return sum(p.numel() * p.element_size() for p in module.parameters())
