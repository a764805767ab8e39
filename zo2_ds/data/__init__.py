"""The embedded default task and the launcher's building blocks.

- :func:`load_default_task`: a generated sentiment task with an in-process word tokenizer (no download);
- :func:`build_tiny_opt` / :func:`load_pretrained`: the default model, or a real HF causal LM;
- :func:`load_classification_task`: a hub or local classification dataset as the same kind of task;
- :class:`TaskData` / :class:`CandidateScorer`: the task interface shared with ``zo2_ds.tasks``
  (splits, ``collate``, ``wrap_model`` giving ``forward(**batch) -> scalar loss``, ``evaluate``);
- :class:`ShardedBatches`: data-parallel batches as a pure function of (seed, step, rank);
- :class:`RunRecorder`: ``log.jsonl`` and ``metrics.json`` in the output folder.
"""

from zo2_ds.data.batching import ShardedBatches
from zo2_ds.data.builders import DTYPES, TinyOPTSpec, build_tiny_opt, load_pretrained
from zo2_ds.data.candidates import CandidateScorer, TaskData, TaskInfo, collate_left_padded
from zo2_ds.data.hf_data import load_classification_task, load_raw_splits
from zo2_ds.data.metrics import RunRecorder
from zo2_ds.data.sentiment import DEFAULT_TASK_NAME, load_default_task
from zo2_ds.data.tokenizer import build_word_tokenizer

__all__ = [
    "DEFAULT_TASK_NAME",
    "DTYPES",
    "CandidateScorer",
    "RunRecorder",
    "ShardedBatches",
    "TaskData",
    "TaskInfo",
    "TinyOPTSpec",
    "build_tiny_opt",
    "build_word_tokenizer",
    "collate_left_padded",
    "load_classification_task",
    "load_default_task",
    "load_pretrained",
    "load_raw_splits",
]
