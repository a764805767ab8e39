"""The causal LM and tokenizer a task runs on: loaded from a hub id or a ``save_pretrained`` folder, or,
for the generated task of the default job, built in-process (a tiny random OPT and a word tokenizer).

Nothing here downloads anything unless given a hub id.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from zo2_ds.dtypes import torch_dtype

__all__ = [
    "SPECIAL_TOKENS",
    "TinyOPTSpec",
    "build_tiny_opt",
    "build_word_tokenizer",
    "check_model_source",
    "load_causal_lm",
    "load_tokenizer",
]

# OPT's special-token ids, so a tiny OPTConfig's defaults (pad 1, bos 2, eos 2) are right as they are.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")
_TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "tokenizer.model", "spiece.model")
_WEIGHT_FILES = (
    "model.safetensors",
    "pytorch_model.bin",
    "model.safetensors.index.json",
    "pytorch_model.bin.index.json",
)


def check_model_source(name_or_path: str | os.PathLike, *, weights: bool = True) -> None:
    """Raise a ValueError naming what is wrong with a local model folder (missing, or lacking its
    config, weights or tokenizer files) before transformers turns it into a misleading hub error.
    A hub id (``org/name`` that is not a local path) passes: the hub has the last word on those."""
    path = os.fspath(name_or_path)
    if not os.path.exists(path):
        looks_local = os.path.isabs(path) or path.startswith((".", "~")) or path.count("/") > 1 or path.endswith("/")
        if looks_local:
            raise ValueError(f"--model_name_or_path {path!r}: no such folder")
        return
    if not os.path.isdir(path):
        raise ValueError(f"--model_name_or_path {path!r} is a file; give the folder save_pretrained wrote")
    present = set(os.listdir(path))
    wanted = [("config.json", ("config.json",)), ("a tokenizer (e.g. tokenizer.json)", _TOKENIZER_FILES)]
    if weights:
        wanted.append(("weights (model.safetensors or pytorch_model.bin)", _WEIGHT_FILES))
    missing = [what for what, names in wanted if not present & set(names)]
    if missing:
        raise ValueError(
            f"--model_name_or_path {path!r} lacks {', '.join(missing)}: it should hold what "
            "model.save_pretrained() and tokenizer.save_pretrained() write"
        )


def load_tokenizer(name_or_path: str | os.PathLike):
    """The tokenizer saved with the model, left-padding, with a pad token (its eos) when it has none."""
    from transformers import AutoTokenizer

    check_model_source(name_or_path, weights=False)
    tokenizer = AutoTokenizer.from_pretrained(os.fspath(name_or_path))
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(name_or_path: str | os.PathLike, *, dtype: str | torch.dtype = "fp32") -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained`` in fp32, fp16 or bf16 (weights on the CPU)."""
    from transformers import AutoModelForCausalLM

    dtype = torch_dtype(dtype, what="--dtype")
    check_model_source(name_or_path)
    return AutoModelForCausalLM.from_pretrained(os.fspath(name_or_path), dtype=dtype)


def build_word_tokenizer(words: Iterable[str]):
    """Lower-casing, whitespace/punctuation-splitting word tokenizer over ``words`` (no download).

    Ids are the special tokens first, then the distinct words in sorted order, so the same word list
    gives the same ids in every process. Every encoding starts with the BOS token ``</s>``, as OPT's
    does; padding is on the left.
    """
    from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
    from tokenizers.models import WordLevel
    from transformers import PreTrainedTokenizerFast

    vocab_words = sorted({w.lower() for w in words} - set(SPECIAL_TOKENS))
    vocab = {tok: i for i, tok in enumerate([*SPECIAL_TOKENS, *vocab_words])}
    core = Tokenizer(WordLevel(vocab=vocab, unk_token="<unk>"))
    core.normalizer = normalizers.Lowercase()
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="</s> $A", pair="</s> $A $B", special_tokens=[("</s>", vocab["</s>"])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        bos_token="</s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        padding_side="left",
    )


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


def build_tiny_opt(vocab_size: int, *, spec: TinyOPTSpec = TinyOPTSpec(), seed: int = 0) -> nn.Module:
    """A randomly initialised OPT (pre-LayerNorm, tied head, no dropout) built from an OPTConfig."""
    from transformers import OPTConfig, OPTForCausalLM

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
        return OPTForCausalLM(config)
