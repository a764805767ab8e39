"""The task system: MeZO's prompt-based tasks and the generated task of the default job, one way each
to describe a task (:class:`Task`), load its data, load a model, and train and evaluate on it.

    from zo2_ds.tasks import load_task_data, load_causal_lm, load_tokenizer
    tokenizer = load_tokenizer("facebook/opt-1.3b")
    data = load_task_data("sst2", tokenizer, data_dir="data/")   # 1000 / 500 / 1000, seed 0
    loss_module = data.wrap_model(model)                          # forward(**batch) -> scalar loss
    loss = loss_module(**data.collate(data.train[:16]))
    metrics = data.evaluate(model, data.test, batch_size=16, device="cpu")   # {"accuracy": ...}

The default job's task is built in too: ``load_task_data("synthetic_sentiment", build_word_tokenizer(
SENTIMENT.vocabulary))`` with ``build_tiny_opt``. See README.md in this folder for the task list and
how to add a task.
"""

from zo2_ds.tasks.adapters import (
    MEZO_ADAPTER_DEFAULTS,
    apply_lora,
    apply_prefix_tuning,
    save_adapter,
    trainable_parameter_names,
)
from zo2_ds.tasks.data import parse_data_files
from zo2_ds.tasks.definitions import TASKS, get_task, list_tasks
from zo2_ds.tasks.hf import (
    TinyOPTSpec,
    build_tiny_opt,
    build_word_tokenizer,
    check_model_source,
    load_causal_lm,
    load_tokenizer,
)
from zo2_ds.tasks.loader import MEZO_NUM_DEV, MEZO_NUM_TEST, MEZO_NUM_TRAIN, TaskData, load_task_data, resolve_task
from zo2_ds.tasks.metrics import exact_match, f1_score, normalize_answer
from zo2_ds.tasks.objectives import AnswerLM, CandidateCrossEntropy, NegativeF1
from zo2_ds.tasks.synthetic import SENTIMENT, generate_sentiment
from zo2_ds.tasks.task import Task, make_task, parse_label_words

__all__ = [
    "TASKS",
    "SENTIMENT",
    "Task",
    "TaskData",
    "MEZO_NUM_TRAIN",
    "MEZO_NUM_DEV",
    "MEZO_NUM_TEST",
    "get_task",
    "list_tasks",
    "load_task_data",
    "make_task",
    "parse_label_words",
    "parse_data_files",
    "resolve_task",
    "generate_sentiment",
    "CandidateCrossEntropy",
    "AnswerLM",
    "NegativeF1",
    "exact_match",
    "f1_score",
    "normalize_answer",
    "MEZO_ADAPTER_DEFAULTS",
    "apply_lora",
    "apply_prefix_tuning",
    "save_adapter",
    "trainable_parameter_names",
    "check_model_source",
    "load_causal_lm",
    "load_tokenizer",
    "build_tiny_opt",
    "build_word_tokenizer",
    "TinyOPTSpec",
]
