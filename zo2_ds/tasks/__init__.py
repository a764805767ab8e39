"""MeZO's prompt-based tasks: declarative definitions, loading, objectives and evaluation.

    from zo2_ds.tasks import load_task_data
    data = load_task_data("sst2", tokenizer, data_dir="data/")   # 1000 / 500 / 1000, seed 0
    loss_module = data.wrap_model(model)                          # forward(**batch) -> scalar loss
    loss = loss_module(**data.collate(data.train[:16]))
    metrics = data.evaluate(model, data.test, batch_size=16, device="cpu")   # {"accuracy": ...}

See README.md in this folder for the task list and how to add a task.
"""

from zo2_ds.tasks.adapters import (
    MEZO_ADAPTER_DEFAULTS,
    apply_lora,
    apply_prefix_tuning,
    save_adapter,
    trainable_parameter_names,
)
from zo2_ds.tasks.definitions import TASKS, Task, get_task, list_tasks, make_task, parse_label_words
from zo2_ds.tasks.hf import load_causal_lm, load_tokenizer
from zo2_ds.tasks.loader import TaskData, load_task_data, resolve_task
from zo2_ds.tasks.metrics import exact_match, f1_score, normalize_answer
from zo2_ds.tasks.objectives import AnswerLM, CandidateCrossEntropy, NegativeF1

__all__ = [
    "TASKS",
    "Task",
    "TaskData",
    "get_task",
    "list_tasks",
    "load_task_data",
    "make_task",
    "parse_label_words",
    "resolve_task",
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
    "load_causal_lm",
    "load_tokenizer",
]
