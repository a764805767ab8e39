"""A word-level tokenizer built in-process from a word list (no download, fully deterministic)."""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, normalizers, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

__all__ = ["SPECIAL_TOKENS", "build_word_tokenizer"]

# OPT's special-token ids, so a tiny OPTConfig's defaults (pad 1, bos 2, eos 2) are right as they are.
SPECIAL_TOKENS = ("<s>", "<pad>", "</s>", "<unk>")


def build_word_tokenizer(words: Iterable[str]) -> PreTrainedTokenizerFast:
    """Lower-casing, whitespace/punctuation-splitting word tokenizer over ``words``.

    Ids are the special tokens first, then the distinct words in sorted order, so the same word list
    gives the same ids in every process. Every encoding starts with the BOS token ``</s>``, as OPT's
    does.
    """
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
