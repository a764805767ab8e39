"""Raw rows -> tokenized examples -> batches (the kwargs of the wrapped model's forward).

Tokenization follows MeZO's ``encode_prompt``: the prompt and each "prompt + candidate" string
are tokenized whole, and a candidate's tokens are the last ``len(full) - len(prompt)`` tokens of
its full sequence. That keeps every tokenizer's behaviour at the boundary (a leading space merged
into the word, SentencePiece's "▁", a newline) exactly as it is in running text.

An example's candidate c is scored on the row ``full_c[:-1]``: its tokens are predicted by the
row's last ``len(tokens_c)`` positions. Candidates whose rows are identical share one row; this is
what makes single-token label words cost one sequence per example, not one per candidate.
Rows are left-padded, so every candidate's tokens sit at the end of its row and the model only
needs the logits of the last few positions.

Over-long sequences lose tokens from the left of the prompt (keeping a leading BOS), as MeZO does.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

import torch

from zo2_ds.tasks.task import Task, label_key

__all__ = ["encode_rows", "collate_candidates", "collate_prompts", "pad_token_id", "stop_token_ids"]

logger = logging.getLogger(__name__)


def pad_token_id(tokenizer) -> int:
    """The id used for padding (any id works: padded positions are masked)."""
    for tid in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if tid is not None:
            return int(tid)
    return 0


def stop_token_ids(tokenizer) -> list[int]:
    """Greedy decoding stops at a newline or EOS (MeZO's ``eos_token="\\n"``)."""
    ids = tokenizer.encode("\n", add_special_tokens=False)
    stops = [ids[-1]] if ids else []
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in stops:
        stops.append(int(tokenizer.eos_token_id))
    return stops


def _render(task: Task, fields: dict[str, Any], source: str, index: int) -> str:
    try:
        prompt = task.template.format(**fields)
    except KeyError as err:
        raise ValueError(
            f"task {task.name!r}: template field {err.args[0]!r} is neither a column of {source} nor derived by "
            f"the task (row {index} has: {', '.join(sorted(fields))})"
        ) from None
    return prompt.strip(" ")


def _separator(prompt: str) -> str:
    return "" if not prompt or prompt[-1].isspace() else " "


def _truncate(ids: list[int], max_length: int, bos_id: int | None) -> list[int]:
    if len(ids) <= max_length:
        return ids
    if bos_id is not None and ids and ids[0] == bos_id:
        return ids[:1] + ids[len(ids) - (max_length - 1) :]
    return ids[len(ids) - max_length :]


def _answer_targets(task: Task, fields: dict[str, Any], source: str, index: int) -> tuple[list[str], list[int]]:
    """(candidate texts, indices of the correct ones) of a classification row."""
    label = fields.get(task.label_column)
    if task.label_words is not None:
        words = list(task.label_words.values())
        key = label_key(label)
        if key not in task.label_words:
            raise ValueError(
                f"task {task.name!r}: label {label!r} of row {index} in {source} is not among the label words "
                f"{dict(task.label_words)}"
            )
        return words, [list(task.label_words).index(key)]
    texts = [str(t).strip(" ") for t in fields[task.candidates_field]]
    golds = label if isinstance(label, (list, tuple)) else [label]
    if not texts or not golds or any(not isinstance(g, int) or not 0 <= g < len(texts) for g in golds):
        raise ValueError(
            f"task {task.name!r}: label {label!r} of row {index} in {source} is not among its {len(texts)} candidates"
        )
    return texts, [int(g) for g in golds]


def _encode_continuations(
    tokenizer, prompt: str, continuations: Sequence[str], max_length: int, where: str
) -> tuple[list[list[int]], list[int], list[list[int]]]:
    encoded = tokenizer([prompt, *[prompt + c for c in continuations]], add_special_tokens=True)["input_ids"]
    num_prompt = len(encoded[0])
    rows: list[list[int]] = []
    row_of: dict[tuple[int, ...], int] = {}
    cand_rows, cand_tokens = [], []
    for cont, full in zip(continuations, encoded[1:]):
        num_answer = len(full) - num_prompt
        if num_answer <= 0:
            raise ValueError(f"{where}: candidate {cont!r} adds no tokens to the prompt")
        full = _truncate(list(full), max_length, tokenizer.bos_token_id)
        if num_answer >= len(full):
            raise ValueError(f"{where}: candidate {cont!r} ({num_answer} tokens) does not fit max_length={max_length}")
        row = tuple(full[:-1])
        if row not in row_of:
            row_of[row] = len(rows)
            rows.append(list(row))
        cand_rows.append(row_of[row])
        cand_tokens.append(full[-num_answer:])
    return rows, cand_rows, cand_tokens


def encode_rows(
    task: Task,
    rows: Sequence[dict[str, Any]],
    tokenizer,
    *,
    max_length: int,
    source: str,
    first_uid: int = 0,
    row_ids: Sequence[int] | None = None,
) -> list[dict[str, Any]]:
    """Tokenized examples. Keys: uid, prompt, candidates (continuation strings), gold (correct
    candidate indices), target (the one trained on), rows, cand_rows, cand_tokens; generation
    examples also carry answers (gold strings) and prompt_ids (the prompt to decode from).
    ``row_ids``: the rows' indices in ``source``, for error messages."""
    if task.is_generation and max_length <= task.max_new_tokens:
        raise ValueError(f"max_length={max_length} leaves no room for the prompt and {task.max_new_tokens} new tokens")
    examples = []
    for n, row in enumerate(rows):
        i = row_ids[n] if row_ids is not None else n
        where = f"task {task.name!r}, row {i} of {source}"
        fields = task.fields(row)
        prompt = _render(task, fields, source, i)
        sep = _separator(prompt)
        example: dict[str, Any] = {"uid": first_uid + n, "prompt": prompt}
        if task.is_generation:
            answers = [a for a in fields[task.answers_field] if a.strip()]
            if not answers:
                raise ValueError(f"{where}: no non-empty gold answer")
            prompt_ids = tokenizer(prompt, add_special_tokens=True)["input_ids"]
            example["prompt_ids"] = _truncate(
                list(prompt_ids), max_length - task.max_new_tokens, tokenizer.bos_token_id
            )
            example["answers"] = answers
            texts, gold = [answers[0].strip() + task.answer_suffix], [0]
        else:
            texts, gold = _answer_targets(task, fields, source, i)
        continuations = [sep + t for t in texts]
        example["rows"], example["cand_rows"], example["cand_tokens"] = _encode_continuations(
            tokenizer, prompt, continuations, max_length, where
        )
        example.update(candidates=continuations, gold=gold, target=gold[0])
        examples.append(example)
    num_cut = sum(max(len(r) for r in ex["rows"]) + 1 >= max_length for ex in examples)
    if num_cut:
        logger.warning(
            "task %s, %s: %d of %d examples reach max_length=%d and may have lost prompt tokens on the left "
            "(MeZO uses 2048 for its long-context tasks)",
            task.name,
            source,
            num_cut,
            len(examples),
            max_length,
        )
    return examples


def _left_pad(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    # Padded as Python lists, then one tensor each: collate runs every step, and many small tensors
    # (one per row) cost more than the model's forward on a small model.
    width = max(len(s) for s in seqs)
    ids = [[pad_id] * (width - len(s)) + list(s) for s in seqs]
    mask = [[0] * (width - len(s)) + [1] * len(s) for s in seqs]
    return torch.tensor(ids, dtype=torch.long), torch.tensor(mask, dtype=torch.long)


def collate_candidates(examples: Sequence[dict[str, Any]], *, pad_id: int, target_only: bool = False) -> dict[str, Any]:
    """Batch tensors for candidate scoring.

    input_ids, attention_mask [R, T]: the distinct rows, left-padded.
    cand_row [B, C]: row of each candidate; cand_tokens, cand_token_mask [B, C, L]: its tokens,
    right-aligned (position k is predicted by row position T - L + k); cand_mask [B, C]: real
    candidates; labels [B]: the index trained on. ``target_only`` keeps just the target candidate
    (C = 1), for the answer-LM objective. R differs from B: slice examples, not these tensors.
    """
    if not examples:
        raise ValueError("cannot collate an empty batch")
    rows: list[list[int]] = []
    per_example = []
    for ex in examples:
        chosen = [ex["target"]] if target_only else range(len(ex["cand_tokens"]))
        local: dict[int, int] = {}
        entries = []
        for c in chosen:
            r = ex["cand_rows"][c]
            if r not in local:
                local[r] = len(rows)
                rows.append(ex["rows"][r])
            entries.append((local[r], ex["cand_tokens"][c]))
        per_example.append(entries)
    num_cands = max(len(e) for e in per_example)
    max_tokens = max(len(t) for e in per_example for _, t in e)
    no_tokens = [0] * max_tokens
    cand_row, cand_tokens, cand_token_mask, cand_mask = [], [], [], []
    for entries in per_example:
        missing = num_cands - len(entries)
        cand_row.append([r for r, _ in entries] + [0] * missing)
        cand_tokens.append([no_tokens[len(t) :] + list(t) for _, t in entries] + [no_tokens] * missing)
        cand_token_mask.append(
            [[False] * (max_tokens - len(t)) + [True] * len(t) for _, t in entries] + [[False] * max_tokens] * missing
        )
        cand_mask.append([True] * len(entries) + [False] * missing)
    input_ids, attention_mask = _left_pad(rows, pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "cand_row": torch.tensor(cand_row, dtype=torch.long),
        "cand_tokens": torch.tensor(cand_tokens, dtype=torch.long),
        "cand_token_mask": torch.tensor(cand_token_mask, dtype=torch.bool),
        "cand_mask": torch.tensor(cand_mask, dtype=torch.bool),
        "labels": torch.tensor([0 if target_only else ex["target"] for ex in examples], dtype=torch.long),
    }


def collate_prompts(examples: Sequence[dict[str, Any]], *, pad_id: int) -> dict[str, Any]:
    """Left-padded prompts for greedy decoding, with each example's uid (to find its answers)."""
    if not examples:
        raise ValueError("cannot collate an empty batch")
    input_ids, attention_mask = _left_pad([ex["prompt_ids"] for ex in examples], pad_id)
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "uid": torch.tensor([ex["uid"] for ex in examples], dtype=torch.long),
    }
