"""Model builders: the tiny randomly initialised OPT of the default job, and pretrained HF loading."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, OPTConfig, OPTForCausalLM

__all__ = ["TinyOPTSpec", "build_tiny_opt", "load_pretrained", "DTYPES"]

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True, kw_only=True)
class TinyOPTSpec:
    """Shape of the default model. Small on purpose: ZO-SGD's progress per step falls with the number
    of parameters, and the default job must visibly learn in a few CPU minutes."""

    hidden_size: int = 16
    num_layers: int = 1
    num_heads: int = 2
    ffn_dim: int = 32
    max_positions: int = 32
    init_std: float = 0.2
    """OPT's 0.02 leaves the adjective's trace in the answer position's hidden state so faint that ZO
    noise swamps its gradient for thousands of steps (dev accuracy <= 0.73 after 4000 steps in our
    sweeps); 0.1 reached 0.91 and 0.2 0.995 in 4000 steps at the same lr."""
    enable_bias: bool = True
    layer_norm_affine: bool = True
    """Kept: without biases and LayerNorm gains a step is cheaper but learning stalled (0.55 at 2000 steps)."""


def build_tiny_opt(vocab_size: int, *, spec: TinyOPTSpec = TinyOPTSpec(), seed: int = 0) -> OPTForCausalLM:
    """A randomly initialised OPT (pre-LayerNorm, tied head, no dropout) built from an OPTConfig."""
    config = OPTConfig(
        vocab_size=vocab_size,
        hidden_size=spec.hidden_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        ffn_dim=spec.ffn_dim,
        max_position_embeddings=spec.max_positions,
        word_embed_proj_dim=spec.hidden_size,
        dropout=0.0,
        attention_dropout=0.0,
        layerdrop=0.0,
        init_std=spec.init_std,
        enable_bias=spec.enable_bias,
        layer_norm_elementwise_affine=spec.layer_norm_affine,
    )
    # The initial weights are a function of the seed alone, so every rank builds the same model.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = OPTForCausalLM(config)
    return model


def load_pretrained(name_or_path: str, *, dtype: str = "fp32"):
    """``(model, tokenizer)`` from a hub id or a local ``save_pretrained`` folder, ready for left padding."""
    if dtype not in DTYPES:
        raise ValueError(f"--dtype {dtype!r} is not supported; choose one of {sorted(DTYPES)}")
    tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        if tokenizer.eos_token_id is None:
            raise ValueError(f"tokenizer of {name_or_path!r} has neither a pad nor an eos token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=DTYPES[dtype])
    return model, tokenizer
