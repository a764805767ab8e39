"""Reading a task's raw rows through ``datasets`` and sampling them with MeZO's protocol.

Sources, in order of precedence:

1. ``data_files``: a path, or ``{split: path or [paths]}``; jsonl/json, csv or parquet. A single
   path is the train split.
2. ``data_dir``: a local copy of the hub layout, looked for in ``data_dir/<task name>``,
   ``data_dir/<hub config>`` (e.g. ``wsc.fixed``) and ``data_dir`` itself. Either a folder written
   by ``DatasetDict.save_to_disk``, or split files named ``<split>.jsonl`` / ``.json`` / ``.csv`` /
   ``.parquet`` or ``<split>-*.parquet`` (the hub's parquet export).
3. The hub, by the task's ``hub`` name (needs a network).

Splits: the task's train split (``train``) gives the train and dev sets, its eval split
(``validation``; ``valid``, ``dev`` or ``test`` are accepted for local files) the test set. Without
an eval split, the test set is drawn from the train rows left over after train and dev.
A generated task (``Task.generate``) reads none of these (``loader.load_task_data``).
"""

from __future__ import annotations

import glob
import json
import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from zo2_ds.tasks.task import Task

__all__ = ["RawSplit", "load_raw_splits", "mezo_sample", "check_columns", "parse_data_files"]

logger = logging.getLogger(__name__)

_EXTENSIONS = {".jsonl": "json", ".json": "json", ".csv": "csv", ".parquet": "parquet"}
_EVAL_ALIASES = ("valid", "dev", "test")


@dataclass
class RawSplit:
    rows: object  # a datasets.Dataset
    source: str  # where the rows came from, for error messages


def _builder_for(paths: Sequence[str]) -> str:
    builders = set()
    for path in paths:
        ext = os.path.splitext(path)[1].lower()
        if ext not in _EXTENSIONS:
            raise ValueError(f"data file {path!r}: unsupported extension {ext!r}; use jsonl, json, csv or parquet")
        builders.add(_EXTENSIONS[ext])
    if len(builders) != 1:
        raise ValueError(f"data files {list(paths)} of one split mix formats; use one of jsonl, csv, parquet")
    return builders.pop()


def _has_rows(path: str, builder: str) -> bool:
    if builder == "parquet":
        import pyarrow.parquet as pq

        return pq.ParquetFile(path).metadata.num_rows > 0
    with open(path, encoding="utf-8") as f:
        lines = (line for line in f if line.strip())
        if builder == "csv":
            next(lines, None)  # the header
        return next(lines, None) is not None


def _load_files(files: Mapping[str, Sequence[str]]) -> dict[str, RawSplit]:
    import datasets

    splits = {}
    for split, paths in files.items():
        for path in paths:
            if not os.path.isfile(path):
                raise FileNotFoundError(f"data file for split {split!r} not found: {path}")
        builder = _builder_for(paths)
        # datasets fails on an empty file with an obscure error (StopIteration, "no data"): say it plainly.
        if not any(_has_rows(p, builder) for p in paths):
            raise ValueError(f"split {split!r} is empty: {', '.join(paths)} holds no rows")
        try:
            rows = datasets.load_dataset(builder, data_files={split: list(paths)}, split=split)
        except Exception:
            if builder == "json":
                _raise_on_bad_json_line(paths)  # datasets' own error buries the line in a traceback
            raise
        splits[split] = RawSplit(rows, ", ".join(paths))
    return splits


def _raise_on_bad_json_line(paths: Sequence[str]) -> None:
    """A ValueError naming the file and line of the first line that is not one JSON object."""
    for path in (p for p in paths if p.lower().endswith(".jsonl")):
        with open(path, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                problem = _json_object_problem(line)
                if problem is not None:
                    raise ValueError(f"{path}:{line_no}: {problem}")


def _json_object_problem(line: str) -> str | None:
    if not line.strip():
        return None  # blank lines are skipped by datasets too
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        return f"not valid JSON ({err.msg})"
    return None if isinstance(record, dict) else f"each line must be one JSON object, got {type(record).__name__}"


def parse_data_files(items: Sequence[str], *, flag: str = "--data_files") -> dict[str, list[str]]:
    """``["a.jsonl", "validation=b.jsonl"]`` (PATH is the train split, SPLIT=PATH any split) as
    ``{"train": ["a.jsonl"], "validation": ["b.jsonl"]}``; unknown types and missing files name ``flag``."""
    by_split: dict[str, list[str]] = {}
    for item in items:
        split, sep, path = item.partition("=")
        if not sep:
            split, path = "train", item
        suffix = os.path.splitext(path)[1].lower()
        if suffix not in _EXTENSIONS:
            raise ValueError(
                f"{flag} {item!r}: unsupported file type {suffix or '(none)'}; use one of "
                f"{', '.join(sorted(_EXTENSIONS))}, as PATH or SPLIT=PATH"
            )
        if not os.path.isfile(path):
            raise ValueError(f"{flag} {item!r}: no such file {path!r}")
        by_split.setdefault(split, []).append(path)
    return by_split


def _split_files(folder: str) -> dict[str, list[str]]:
    found: dict[str, list[str]] = {}
    for path in sorted(glob.glob(os.path.join(folder, "*"))):
        name, ext = os.path.splitext(os.path.basename(path))
        if ext.lower() not in _EXTENSIONS or not os.path.isfile(path):
            continue
        split = name.split("-")[0] if ext.lower() == ".parquet" else name
        found.setdefault(split, []).append(path)
    return found


def _load_dir(task: Task, data_dir: str) -> dict[str, RawSplit]:
    if not os.path.isdir(data_dir):
        raise FileNotFoundError(f"data_dir not found: {data_dir}")
    candidates = [os.path.join(data_dir, task.name)]
    if task.hub is not None and task.hub[1]:
        candidates.append(os.path.join(data_dir, task.hub[1]))
    candidates.append(data_dir)
    for folder in candidates:
        if any(os.path.isfile(os.path.join(folder, marker)) for marker in ("dataset_dict.json", "state.json")):
            import datasets

            loaded = datasets.load_from_disk(folder)  # a DatasetDict, or one Dataset: the train split
            if isinstance(loaded, datasets.Dataset):
                loaded = {task.train_split: loaded}
            return {split: RawSplit(loaded[split], f"{folder} [{split}]") for split in loaded}
        files = _split_files(folder) if os.path.isdir(folder) else {}
        if task.train_split in files:
            return _load_files(files)
    raise FileNotFoundError(
        f"no data for task {task.name!r} under {data_dir}: looked in {candidates} for a save_to_disk folder or "
        f"'{task.train_split}.jsonl|csv|parquet' and '{task.eval_split}.jsonl|csv|parquet'"
    )


def _load_hub(task: Task) -> dict[str, RawSplit]:
    if task.hub is None:
        raise ValueError(f"task {task.name!r} has no hub dataset; pass data_files or data_dir")
    import datasets

    path, config = task.hub
    try:
        loaded = datasets.load_dataset(path, config)
    except Exception as err:  # network, auth, missing dataset: all need the same advice
        raise RuntimeError(
            f"could not load {path!r} (config {config!r}) for task {task.name!r} from the Hugging Face hub: {err}. "
            f"Without a network, pass data_dir= a local copy (train.jsonl / validation.jsonl, csv, parquet, "
            "or a save_to_disk folder)."
        ) from err
    return {split: RawSplit(loaded[split], f"hub {path}/{config or ''} [{split}]") for split in loaded}


def load_raw_splits(
    task: Task,
    *,
    data_dir: str | None = None,
    data_files: str | Mapping[str, str | Sequence[str]] | None = None,
) -> tuple[RawSplit, RawSplit | None]:
    """The task's (train, eval) raw splits; eval is None when the source has no eval split."""
    if data_files is not None:
        if isinstance(data_files, (str, os.PathLike)):
            data_files = {task.train_split: [os.fspath(data_files)]}
        files = {k: [v] if isinstance(v, (str, os.PathLike)) else list(v) for k, v in data_files.items()}
        splits = _load_files({k: [os.fspath(p) for p in v] for k, v in files.items()})
    elif data_dir is not None:
        splits = _load_dir(task, os.fspath(data_dir))
    else:
        splits = _load_hub(task)
    if task.train_split not in splits:
        raise ValueError(f"task {task.name!r}: no {task.train_split!r} split among {sorted(splits)}")
    eval_split = next((s for s in (task.eval_split, *_EVAL_ALIASES) if s in splits and s != task.train_split), None)
    for split in (task.train_split, eval_split):
        if split is not None and len(splits[split].rows) == 0:
            raise ValueError(f"task {task.name!r}: split {split!r} from {splits[split].source} is empty")
    return splits[task.train_split], splits[eval_split] if eval_split else None


def check_columns(task: Task, split: RawSplit) -> None:
    """Raise a ValueError naming the first column ``task`` needs that ``split`` lacks."""
    have = split.rows.column_names
    for column in task.columns:
        if column not in have:
            raise ValueError(
                f"task {task.name!r}: column {column!r} missing from {split.source} (columns there: {', '.join(have)})"
            )


def mezo_sample(
    num_train_rows: int,
    num_eval_rows: int | None,
    *,
    num_train: int,
    num_dev: int,
    num_test: int | None,
    seed: int,
) -> tuple[list[int], list[int], list[int], bool]:
    """Row indices (train, dev, test, test_from_train) as MeZO samples them.

    MeZO (``sample_subset`` under ``temp_seed``): ``permutation(len(train))[:num_train + num_dev]``
    with numpy seeded by ``seed``; dev is the *last* ``num_dev`` of those, train the rest (so when
    the train split is short, dev stays full and train shrinks). The test set is
    ``permutation(len(eval))[:num_test]`` with the same seed. ``num_test=None`` takes all of it.
    Without an eval split the test rows are the next ``num_test`` of the train permutation.
    """
    if num_train < 0 or num_dev < 0 or (num_test is not None and num_test < 0):
        raise ValueError(f"sample sizes must be >= 0, got train={num_train} dev={num_dev} test={num_test}")
    perm = np.random.RandomState(seed).permutation(num_train_rows).tolist()
    chosen = perm[: num_train + num_dev]
    if len(chosen) < num_train + num_dev:
        logger.warning(
            "only %d training rows for num_train=%d + num_dev=%d: dev keeps %d, train gets %d",
            num_train_rows,
            num_train,
            num_dev,
            num_dev,
            max(len(chosen) - num_dev, 0),
        )
    if len(chosen) <= num_dev:
        raise ValueError(
            f"{num_train_rows} training rows leave nothing for training after num_dev={num_dev}; lower num_dev "
            "(--num_dev, or --max_eval_examples, on the command line)"
        )
    dev = chosen[len(chosen) - num_dev :]
    train = chosen[: len(chosen) - num_dev]
    if num_eval_rows is not None:
        test = np.random.RandomState(seed).permutation(num_eval_rows).tolist()[:num_test]
        return train, dev, test, False
    rest = perm[len(chosen) :]
    test = rest[:num_test]
    if not test and num_test != 0:
        raise ValueError(
            f"no eval split and no training rows left for a test set ({num_train_rows} rows, "
            f"num_train={num_train}, num_dev={num_dev}); add a validation file or lower num_train"
        )
    return train, dev, test, True
