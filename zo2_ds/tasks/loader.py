"""``load_task_data``: a task's sampled, tokenized splits plus its collate, wrapper and evaluation."""

from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from zo2_ds.tasks.data import check_columns, load_raw_splits, mezo_sample
from zo2_ds.tasks.definitions import get_task
from zo2_ds.tasks.encode import collate_candidates, collate_prompts, encode_rows, pad_token_id, stop_token_ids
from zo2_ds.tasks.metrics import accuracy, qa_metrics
from zo2_ds.tasks.objectives import AnswerLM, CandidateCrossEntropy, NegativeF1, candidate_scores, greedy_decode
from zo2_ds.tasks.task import Objective, Task, make_task, with_overrides

__all__ = ["TaskData", "load_task_data", "resolve_task", "MEZO_NUM_TRAIN", "MEZO_NUM_DEV", "MEZO_NUM_TEST"]

logger = logging.getLogger(__name__)

# MeZO's sample sizes (train / dev / test), the defaults for a task read from a dataset.
MEZO_NUM_TRAIN, MEZO_NUM_DEV, MEZO_NUM_TEST = 1000, 500, 1000


def _to(batch: Mapping[str, Any], device: torch.device | str | None) -> dict[str, Any]:
    return {k: v.to(device) if isinstance(v, torch.Tensor) and device is not None else v for k, v in batch.items()}


@dataclass
class TaskData:
    """A task's tokenized train / dev / test examples and what a training loop needs from them.

    ``collate(examples)`` builds the kwargs of ``wrap_model(model).forward``; the loss it returns
    is the task's objective (candidate cross-entropy, answer-token LM loss, or -F1).
    ``evaluate(model, examples, ...)`` scores the raw (or peft) model: accuracy, or em and f1.
    """

    task: Task
    train: list[dict]
    dev: list[dict]
    test: list[dict]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    tokenizer: Any

    @property
    def pad_id(self) -> int:
        return pad_token_id(self.tokenizer)

    def wrap_model(self, model: nn.Module) -> nn.Module:
        """The module whose ``forward(**collate(batch))`` is the scalar training loss."""
        if self.task.objective == "candidates":
            return CandidateCrossEntropy(model)
        if self.task.objective == "answer_lm":
            return AnswerLM(model)
        answers = {ex["uid"]: ex["answers"] for split in (self.train, self.dev, self.test) for ex in split}
        return NegativeF1(
            model,
            self.tokenizer,
            answers,
            max_new_tokens=self.task.max_new_tokens,
            stop_ids=stop_token_ids(self.tokenizer),
            pad_id=self.pad_id,
        )

    def evaluate(
        self, model: nn.Module, examples: Sequence[dict], *, batch_size: int, device: torch.device | str | None = None
    ) -> dict[str, float]:
        """{"accuracy": ...} for classification, {"em": ..., "f1": ...} for generation.

        Classification predicts the candidate with the highest mean token log-probability;
        generation decodes greedily up to ``task.max_new_tokens`` tokens, stopping at a newline.
        The model runs in eval mode (restored afterwards) and without autograd.
        """
        if not examples:
            raise ValueError(f"task {self.task.name!r}: nothing to evaluate (empty example list)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                if self.task.is_generation:
                    return self._evaluate_generation(model, examples, batch_size, device)
                return self._evaluate_candidates(model, examples, batch_size, device)
        finally:
            model.train(was_training)

    def _evaluate_candidates(self, model, examples, batch_size, device) -> dict[str, float]:
        predictions: list[int] = []
        for start in range(0, len(examples), batch_size):
            batch = collate_candidates(examples[start : start + batch_size], pad_id=self.pad_id)
            batch.pop("labels")
            scores = candidate_scores(model, **_to(batch, device))
            predictions.extend(scores.argmax(-1).tolist())
        return {"accuracy": accuracy(predictions, [ex["gold"] for ex in examples])}

    def _evaluate_generation(self, model, examples, batch_size, device) -> dict[str, float]:
        predictions: list[str] = []
        stops = stop_token_ids(self.tokenizer)
        for start in range(0, len(examples), batch_size):
            batch = _to(collate_prompts(examples[start : start + batch_size], pad_id=self.pad_id), device)
            predictions.extend(
                greedy_decode(
                    model,
                    batch["input_ids"],
                    batch["attention_mask"],
                    self.tokenizer,
                    max_new_tokens=self.task.max_new_tokens,
                    stop_ids=stops,
                    pad_id=self.pad_id,
                )
            )
        return qa_metrics(predictions, [ex["answers"] for ex in examples])


def resolve_task(
    task: str | Task,
    *,
    template: str | None = None,
    label_words: str | Mapping[Any, str] | list[str] | None = None,
    objective: Objective | None = None,
) -> Task:
    """A built-in task (with overrides), a Task as given, or a user task from a template."""
    if isinstance(task, Task):
        return with_overrides(task, template=template, label_words=label_words, objective=objective)
    try:
        builtin = get_task(task)
    except ValueError:
        if template is None:
            raise
        return make_task(task, template, label_words, objective=objective)
    return with_overrides(builtin, template=template, label_words=label_words, objective=objective)


def load_task_data(
    task: str | Task,
    tokenizer,
    *,
    data_dir: str | os.PathLike | None = None,
    data_files: str | Mapping[str, str | Sequence[str]] | None = None,
    template: str | None = None,
    label_words: str | Mapping[Any, str] | list[str] | None = None,
    num_train: int | None = None,
    num_dev: int | None = None,
    num_test: int | None = MEZO_NUM_TEST,
    seed: int = 0,
    max_length: int = 256,
    objective: Objective | None = None,
) -> TaskData:
    """Load, sample (MeZO's protocol) and tokenize a task.

    task: a built-in name (``list_tasks()``), a :class:`Task`, or any name together with
        ``template`` (and ``label_words`` for classification) to define a task over your own
        ``data_files``; a template or label words given with a built-in task replace its own.
    data_dir / data_files: local data (see ``zo2_ds.tasks.data``); neither means the hub.
    num_train, num_dev, num_test, seed: MeZO's sampling (see ``mezo_sample``). num_train and
        num_dev None: MeZO's 1000 and 500 for a dataset task, all rows of a generated task (whose
        rows are used in order: the first ``num_*`` of each split). num_test: 1000 by default, None
        for all of the eval split. A task with few training rows caps num_dev (CB, COPA: 100) as
        MeZO's script does.
    max_length: tokens per sequence; longer prompts lose tokens on the left.
    objective: override the task's training objective ("candidates", "answer_lm", "neg_f1").
    """
    task = resolve_task(task, template=template, label_words=label_words, objective=objective)
    if task.generate is not None:
        if data_dir is not None or data_files is not None:
            raise ValueError(f"task {task.name!r} is generated in-process; it reads no data_dir or data_files")
        return _generated_task_data(task, tokenizer, seed, (num_train, num_dev, num_test), max_length)
    num_train = MEZO_NUM_TRAIN if num_train is None else num_train
    num_dev = MEZO_NUM_DEV if num_dev is None else num_dev
    if task.max_num_dev is not None and num_dev > task.max_num_dev:
        logger.warning("task %s: num_dev=%d capped to %d (MeZO's setting)", task.name, num_dev, task.max_num_dev)
        num_dev = task.max_num_dev
    train_split, eval_split = load_raw_splits(task, data_dir=data_dir, data_files=data_files)
    check_columns(task, train_split)
    if eval_split is not None:
        check_columns(task, eval_split)
    train_idx, dev_idx, test_idx, test_from_train = mezo_sample(
        len(train_split.rows),
        None if eval_split is None else len(eval_split.rows),
        num_train=num_train,
        num_dev=num_dev,
        num_test=num_test,
        seed=seed,
    )
    if test_from_train:
        logger.warning(
            "task %s: no eval split; the %d test examples come from unused train rows", task.name, len(test_idx)
        )
    test_split = train_split if test_from_train else eval_split

    def encode_split(split, indices, first_uid):  # uids run across all three sets: -F1 finds answers by uid
        rows = [split.rows[i] for i in indices]
        return encode_rows(
            task, rows, tokenizer, max_length=max_length, source=split.source, first_uid=first_uid, row_ids=indices
        )

    train = encode_split(train_split, train_idx, 0)
    dev = encode_split(train_split, dev_idx, len(train))
    test = encode_split(test_split, test_idx, len(train) + len(dev))
    return _task_data(task, tokenizer, train, dev, test)


def _generated_task_data(task: Task, tokenizer, seed: int, sizes: tuple, max_length: int) -> TaskData:
    """A generated task's splits, whole or their first ``sizes`` (train, dev, test) rows, in order."""
    rows = task.generate(seed)
    encoded, first_uid = [], 0
    for split, size in zip(("train", "dev", "test"), sizes):
        source = f"the generated {split} split (seed {seed})"
        encoded.append(
            encode_rows(task, rows[split][:size], tokenizer, max_length=max_length, source=source, first_uid=first_uid)
        )
        first_uid += len(encoded[-1])
    return _task_data(task, tokenizer, *encoded)


def _task_data(task: Task, tokenizer, train: list[dict], dev: list[dict], test: list[dict]) -> TaskData:
    pad_id = pad_token_id(tokenizer)
    if task.objective == "neg_f1":
        collate = functools.partial(collate_prompts, pad_id=pad_id)
    else:
        collate = functools.partial(collate_candidates, pad_id=pad_id, target_only=task.objective == "answer_lm")
    return TaskData(task=task, train=train, dev=dev, test=test, collate=collate, tokenizer=tokenizer)
