"""A real classification dataset, from the hub or local files, as a candidate-scoring task.

Sources (``load_raw_splits``):
- ``dataset``: a hub id (``"glue"`` with ``dataset_config="sst2"``, ``"stanfordnlp/sst2"``), a folder
  written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk`` (read with ``load_from_disk``),
  or a folder of data files (``load_dataset(folder)``);
- ``data_files``: local ``.jsonl`` / ``.json`` / ``.csv`` / ``.parquet`` files, each ``PATH`` (training
  data) or ``SPLIT=PATH`` (``train=a.jsonl validation=b.jsonl``).

Every row becomes ``template.format(**row)`` (e.g. ``"{sentence} It was"``) scored against one label
word per class (MeZO's prompt-based fine-tuning). Splits missing from the source are held out of the
training split with the seed: dev from "validation"/"dev" else train, test from "test" else train.
"""

from __future__ import annotations

import os
import random
from collections.abc import Sequence
from pathlib import Path

from zo2_ds.data.candidates import TaskData, TaskInfo

__all__ = ["load_raw_splits", "load_classification_task", "parse_label_words", "DATA_FILE_BUILDERS"]

DATA_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
DEV_SPLITS = ("validation", "dev", "valid")
TEXT_COLUMNS = ("sentence", "text", "content", "review")


def _parse_data_files(data_files: Sequence[str]) -> tuple[str, dict[str, list[str]]]:
    by_split: dict[str, list[str]] = {}
    builders = set()
    for item in data_files:
        split, sep, path = item.partition("=")
        if not sep:
            split, path = "train", item
        suffix = Path(path).suffix.lower()
        if suffix not in DATA_FILE_BUILDERS:
            raise ValueError(
                f"--data_files {item!r}: unsupported file type {suffix or '(none)'}; "
                f"use one of {sorted(DATA_FILE_BUILDERS)}, as PATH or SPLIT=PATH"
            )
        if not os.path.isfile(path):
            raise ValueError(f"--data_files {item!r}: no such file {path!r}")
        builders.add(DATA_FILE_BUILDERS[suffix])
        by_split.setdefault(split, []).append(path)
    if len(builders) != 1:
        raise ValueError(f"--data_files mixes file types {sorted(builders)}; give files of one type")
    if "train" not in by_split:
        raise ValueError(f"--data_files needs training data (PATH or train=PATH); got splits {sorted(by_split)}")
    return builders.pop(), by_split


def load_raw_splits(
    *, dataset: str | None = None, dataset_config: str | None = None, data_files: Sequence[str] | None = None
):
    """A ``datasets.DatasetDict`` from a hub id, a ``save_to_disk`` folder, a data folder, or files."""
    import datasets

    if data_files:
        if dataset:
            raise ValueError("give either --dataset or --data_files, not both")
        builder, by_split = _parse_data_files(data_files)
        return datasets.load_dataset(builder, data_files=by_split)
    if not dataset:
        raise ValueError("no data: give --dataset (hub id or local folder) or --data_files")
    path = Path(dataset)
    if path.is_dir() and any((path / marker).is_file() for marker in ("dataset_dict.json", "state.json")):
        loaded = datasets.load_from_disk(str(path))
        return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict(train=loaded)
    return datasets.load_dataset(dataset, dataset_config)


def parse_label_words(label_words: Sequence[str]) -> dict[str, str]:
    """``[" terrible", " great"]`` -> {"0": " terrible", "1": " great"};
    ``["negative= terrible", "positive= great"]`` -> {"negative": " terrible", "positive": " great"}."""
    if len(label_words) < 2:
        raise ValueError(f"--label_words needs one word per class (at least 2), got {list(label_words)}")
    if all("=" in w for w in label_words):
        return dict(w.split("=", 1) for w in label_words)
    if any("=" in w for w in label_words):
        raise ValueError(f"--label_words: use either all WORD or all LABEL=WORD entries, got {list(label_words)}")
    return {str(i): w for i, w in enumerate(label_words)}


def _single_token_ids(tokenizer, words: dict[str, str]) -> list[int]:
    ids = []
    for label, word in words.items():
        tokens = tokenizer(word, add_special_tokens=False)["input_ids"]
        if len(tokens) != 1:
            raise ValueError(
                f"--label_words: {word!r} (label {label}) is {len(tokens)} tokens for this tokenizer; candidate "
                "scoring needs one token per label word (a leading space often helps: ' great')"
            )
        ids.append(tokens[0])
    return ids


def _format_row(template: str, row: dict, text_column: str | None) -> str:
    fields = row if text_column is None else {**row, "text": row[text_column]}
    try:
        return template.format_map(fields)
    except KeyError as exc:
        raise ValueError(
            f"--template {template!r} names column {exc} that the data lacks; columns: {sorted(row)}"
        ) from None


def load_classification_task(
    tokenizer,
    *,
    dataset: str | None = None,
    dataset_config: str | None = None,
    data_files: Sequence[str] | None = None,
    template: str = "{text} It was",
    label_words: Sequence[str] = (" terrible", " great"),
    text_column: str | None = None,
    label_column: str = "label",
    max_train_examples: int | None = None,
    max_eval_examples: int | None = None,
    max_length: int = 256,
    seed: int = 0,
) -> TaskData:
    """Load, split, sample and tokenize a classification dataset. ``{text}`` in the template is the
    text column (``text_column`` or the first of sentence/text/content/review the data has)."""
    raw = load_raw_splits(dataset=dataset, dataset_config=dataset_config, data_files=data_files)
    if "train" not in raw:
        raise ValueError(f"the dataset has no 'train' split; it has {sorted(raw)}")
    columns = raw["train"].column_names
    if text_column is None:
        text_column = next((c for c in TEXT_COLUMNS if c in columns), None)
        if text_column is None and "{text}" in template:
            raise ValueError(f"no text column among {list(TEXT_COLUMNS)}; pass --text_column (columns: {columns})")
    elif text_column not in columns:
        raise ValueError(f"--text_column {text_column!r} is not a column; columns: {columns}")
    if label_column not in columns:
        raise ValueError(f"--label_column {label_column!r} is not a column; columns: {columns}")
    words = parse_label_words(label_words)
    candidate_ids = _single_token_ids(tokenizer, words)
    label_index = {label: i for i, label in enumerate(words)}

    rng = random.Random(seed)
    train_rows = list(raw["train"])
    rng.shuffle(train_rows)
    dev_name = next((s for s in DEV_SPLITS if s in raw), None)
    eval_size = max_eval_examples or max(1, len(train_rows) // 10)

    def held_out(split: str | None) -> list[dict]:
        nonlocal train_rows
        if split is not None and split in raw:
            rows = [r for r in raw[split] if str(r[label_column]) in label_index]  # hub test splits carry -1
            if rows:
                rng.shuffle(rows)
                return rows
        rows, train_rows = train_rows[:eval_size], train_rows[eval_size:]
        return rows

    dev_rows, test_rows = held_out(dev_name), held_out("test")

    def encode(rows: list[dict], limit: int | None) -> list[dict]:
        examples = []
        for row in rows[:limit]:
            label = str(row[label_column])
            if label not in label_index:
                raise ValueError(
                    f"label {row[label_column]!r} has no label word; --label_words covers {sorted(label_index)}"
                )
            prompt = _format_row(template, row, text_column)
            ids = tokenizer(prompt)["input_ids"][-max_length:]  # keep the end: the answer position
            examples.append(
                {"text": prompt, "input_ids": ids, "candidate_ids": candidate_ids, "label": label_index[label]}
            )
        return examples

    name = dataset or ",".join(data_files or ())
    info = TaskInfo(name=name, metric="accuracy", label_words=tuple(words.values()), template=template)
    return TaskData(
        task=info,
        train=encode(train_rows, max_train_examples),
        dev=encode(dev_rows, max_eval_examples),
        test=encode(test_rows, max_eval_examples),
        pad_token_id=tokenizer.pad_token_id,
        tokenizer=tokenizer,
    )
