"""Prompt-based classification by candidate scoring (MeZO's formulation), shared by every task here.

An example is a prompt ending where the answer goes, plus one single-token label word per class:

    {"input_ids": [...], "candidate_ids": [id(" terrible"), id(" great")], "label": 1}

The loss is cross-entropy over the label words' logits at the last prompt position, and the prediction
is the label word with the largest logit. Batches are LEFT-padded so that the answer position is the
last column for every row; the model then only projects that one position onto the vocabulary
(``logits_to_keep=1``), which keeps the head's cost and memory independent of the prompt length.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import nn

__all__ = ["TaskInfo", "TaskData", "CandidateScorer", "collate_left_padded", "accuracy"]


@dataclass(frozen=True, kw_only=True)
class TaskInfo:
    """What a task is called and which metric ``evaluate`` reports."""

    name: str
    metric: str = "accuracy"
    label_words: tuple[str, ...] = ()
    template: str = ""


def collate_left_padded(examples: Sequence[dict], *, pad_token_id: int) -> dict[str, torch.Tensor]:
    """Stack examples into the keyword arguments of :meth:`CandidateScorer.forward`."""
    if not examples:
        raise ValueError("cannot collate an empty list of examples")
    width = max(len(ex["input_ids"]) for ex in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, ex in enumerate(examples):
        ids = ex["input_ids"]
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return {
        "input_ids": input_ids,
        "attention_mask": attention_mask,
        "candidate_ids": torch.tensor([ex["candidate_ids"] for ex in examples], dtype=torch.long),
        "labels": torch.tensor([ex["label"] for ex in examples], dtype=torch.long),
    }


class CandidateScorer(nn.Module):
    """Wraps a causal LM so that ``forward(**batch)`` is the scalar candidate cross-entropy.

    Holds no state besides the wrapped model (a submodule, so DeepSpeed and the ZO engine see every
    parameter under ``model.``) and needs no autograd, so it runs unchanged under ``torch.no_grad``.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def candidate_logits(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits of each example's label words at its answer position, shape (batch, num_candidates)."""
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
        last = out.logits[:, -1, :]
        return last.gather(1, candidate_ids.to(last.device)).float()

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        candidate_ids: torch.Tensor,
        labels: torch.Tensor,
    ) -> torch.Tensor:
        logits = self.candidate_logits(input_ids, attention_mask, candidate_ids)
        return nn.functional.cross_entropy(logits, labels.to(logits.device))


def _to_device(batch: dict[str, torch.Tensor], device: torch.device | str) -> dict[str, torch.Tensor]:
    return {key: value.to(device) for key, value in batch.items()}


@torch.no_grad()
def accuracy(
    scorer: CandidateScorer,
    examples: Sequence[dict],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    *,
    batch_size: int,
    device: torch.device | str,
) -> float:
    """Fraction of examples whose highest-scoring label word is the gold one."""
    if not examples:
        raise ValueError("cannot evaluate on an empty list of examples")
    num_correct = 0
    for start in range(0, len(examples), batch_size):
        batch = _to_device(collate(list(examples[start : start + batch_size])), device)
        logits = scorer.candidate_logits(**batch)
        num_correct += int((logits.argmax(dim=-1) == batch["labels"]).sum())
    return num_correct / len(examples)


@dataclass(kw_only=True)
class TaskData:
    """A tokenized candidate-scoring task: splits, a collate function, the model wrapper, the metric.

    Same interface as ``zo2_ds.tasks``' task data, so the launcher treats both alike.
    """

    task: TaskInfo
    train: list[dict]
    dev: list[dict]
    test: list[dict]
    pad_token_id: int
    tokenizer: Any = field(default=None, repr=False)
    """Saved next to the HF copy of the model (launch/train.py), when given."""
    collate: Callable[[list[dict]], dict[str, torch.Tensor]] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.collate = partial(collate_left_padded, pad_token_id=self.pad_token_id)

    def wrap_model(self, model: nn.Module) -> CandidateScorer:
        return model if isinstance(model, CandidateScorer) else CandidateScorer(model)

    def evaluate(
        self, model: nn.Module, examples: Sequence[dict], *, batch_size: int, device: torch.device | str
    ) -> dict[str, float]:
        """``{"accuracy": ...}`` for an HF causal LM or its :class:`CandidateScorer` wrapper."""
        was_training = model.training
        model.eval()
        try:
            return {
                "accuracy": accuracy(
                    self.wrap_model(model), examples, self.collate, batch_size=batch_size, device=device
                )
            }
        finally:
            model.train(was_training)
