"""The command line of launch/train.py: its flags, their defaults, and the checks that name a bad one.

Everything here is cheap (no model, no data, no DeepSpeed config): a mistake in the arguments is
reported before anything is loaded. Which task the flags describe is decided here too:

- ``--task NAME``: a built-in task (``zo2_ds.tasks.list_tasks()``); ``--template`` / ``--label_words``
  replace its own; ``--dataset`` / ``--data_files`` / ``--data_dir`` replace where its rows come from.
- ``--template`` (+ ``--label_words`` for classification) with ``--dataset`` / ``--data_files`` /
  ``--data_dir``: a task you define over your data's columns (named by ``--task``, if given).
- none of these: the default job, the generated ``synthetic_sentiment`` task on a tiny random OPT.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace

from zo2_ds.dtypes import DTYPES
from zo2_ds.tasks import SENTIMENT, Task, get_task, list_tasks, make_task, resolve_task

__all__ = [
    "DEFAULT_MAX_STEPS",
    "DEFAULT_EVAL_EVERY",
    "DEFAULT_LOG_EVERY",
    "DEFAULT_SAVE_STEPS",
    "DEFAULT_SAVE_TOTAL_LIMIT",
    "build_parser",
    "check_args",
    "task_of",
]

# Tuned for the default job (tiny OPT, generated sentiment): held-out accuracy 0.5 -> ~1.0 in 6000 steps.
DEFAULT_MAX_STEPS = 6000
DEFAULT_EVAL_EVERY = 500
DEFAULT_LOG_EVERY = 50
# A checkpoint every 500 steps (a few minutes of the default job on a CPU); the newest 2 are kept, plus the best.
DEFAULT_SAVE_STEPS = 500
DEFAULT_SAVE_TOTAL_LIMIT = 2


def build_parser(description: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--deepspeed_config", default=None, help="DeepSpeed JSON config with a zo2 block (default: built in)"
    )
    p.add_argument("--deepspeed", action="store_true", help="accepted for DeepSpeed launcher compatibility")
    p.add_argument("--local_rank", type=int, default=None, help="set by the deepspeed launcher")
    m = p.add_argument_group("model (none: a tiny random OPT, for the generated task only)")
    m.add_argument("--model_name_or_path", default=None, help="hub id or local save_pretrained folder")
    m.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    t = p.add_argument_group("task (none of these: the default job, the generated synthetic_sentiment task)")
    t.add_argument("--task", default=None, help=f"a built-in task ({', '.join(list_tasks())}) or your task's name")
    t.add_argument("--template", default=None, help='prompt template over the columns, e.g. "{sentence} It was"')
    t.add_argument(
        "--label_words", nargs="+", default=None, help="one per class: terrible great, or 0:terrible 1:great"
    )
    t.add_argument("--label_column", default=None, help="label column of a task you define (default: label)")
    t.add_argument("--text_column", default=None, help=argparse.SUPPRESS)  # removed: name the column in --template
    d = p.add_argument_group("data (a built-in task: its hub dataset unless one of these is given)")
    d.add_argument("--dataset", default=None, help="hub dataset id, or a save_to_disk / data folder")
    d.add_argument("--dataset_config", default=None, help="hub dataset configuration name (e.g. sst2 of glue)")
    d.add_argument("--data_files", nargs="+", default=None, help="local .jsonl/.csv/.parquet files: PATH or SPLIT=PATH")
    d.add_argument("--data_dir", default=None, help="a folder with the hub layout (DIR/<task>/train.jsonl ...)")
    d.add_argument("--num_train", "--max_train_examples", type=int, default=None, help="train examples (MeZO: 1000)")
    d.add_argument("--num_dev", type=int, default=None, help="dev examples, sampled from train (MeZO: 500)")
    d.add_argument("--num_test", type=int, default=None, help="test examples, from the eval split (MeZO: 1000)")
    d.add_argument("--max_eval_examples", type=int, default=None, help="sets both --num_dev and --num_test")
    d.add_argument("--max_length", type=int, default=256, help="tokens per sequence (the prompt's end is kept)")
    a = p.add_argument_group("adapters (peft; only the adapter is perturbed and updated)")
    a.add_argument("--peft", default=None, choices=["lora", "prefix"], help="train a LoRA or prefix adapter")
    a.add_argument("--lora_r", type=int, default=8)
    a.add_argument("--lora_alpha", type=int, default=16)
    a.add_argument("--prefix_tokens", type=int, default=5, help="virtual tokens of the prefix")
    r = p.add_argument_group("run")
    r.add_argument("--output_dir", default="runs/zo2_default")
    r.add_argument("--max_steps", type=int, default=None, help=f"optimizer steps (default {DEFAULT_MAX_STEPS})")
    r.add_argument("--eval_every", type=int, default=None, help="steps between dev evaluations (0: only at the end)")
    r.add_argument("--log_every", type=int, default=None, help=f"steps per log.jsonl record ({DEFAULT_LOG_EVERY})")
    r.add_argument("--eval_batch_size", type=int, default=64)
    r.add_argument("--seed", type=int, default=0, help="data order, model init and the generated task")
    r.add_argument(
        "--overwrite_output_dir", action="store_true", help="replace the previous run in --output_dir (else refused)"
    )
    r.add_argument(
        "--save_steps", type=int, default=DEFAULT_SAVE_STEPS, help="steps between checkpoints (0: only at the end)"
    )
    r.add_argument(
        "--save_total_limit",
        type=int,
        default=DEFAULT_SAVE_TOTAL_LIMIT,
        help="keep the newest this many checkpoints, plus the best (0: keep all)",
    )
    r.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in --output_dir")
    r.add_argument(
        "--checkpoint_tag", default=None, help="with --resume: load this one instead (best, checkpoint-500, 500)"
    )
    r.add_argument("--eval_only", action="store_true", help="evaluate (the checkpoint with --resume) and exit")
    r.add_argument(
        "--save_best",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="keep the best checkpoint by dev metric in <output_dir>/best (with --eval_every > 0)",
    )
    r.add_argument("--no_hf_save", action="store_true", help="no HF-format copy (model/ or adapter/) of the weights")
    r.add_argument("--no_progress", action="store_true", help="no tqdm bar")
    return p


def check_args(args: argparse.Namespace) -> argparse.Namespace:
    """Fill in the defaults that depend on other flags and raise a ValueError naming any bad flag."""
    if args.text_column is not None:
        raise ValueError(
            f"--text_column was removed: name the column in --template, e.g. --template '{{{args.text_column}}} It was'"
        )
    if args.checkpoint_tag and not args.resume:
        raise ValueError("--checkpoint_tag selects the checkpoint --resume loads; add --resume")
    sources = [f"--{f}" for f in ("dataset", "data_files", "data_dir") if getattr(args, f) is not None]
    if len(sources) > 1:
        raise ValueError(f"give one data source, not {' and '.join(sources)}")
    if args.dataset_config is not None and args.dataset is None:
        raise ValueError("--dataset_config names a configuration of a hub --dataset; add --dataset")
    if args.resume and args.overwrite_output_dir:
        raise ValueError("--resume and --overwrite_output_dir exclude each other: continue the run, or replace it")
    bounds = (("max_steps", 1), ("eval_every", 0), ("log_every", 1), ("eval_batch_size", 1))
    for flag, minimum in (*bounds, ("save_steps", 0), ("save_total_limit", 0)):
        value = getattr(args, flag)
        if value is not None and value < minimum:
            raise ValueError(f"--{flag} must be >= {minimum}, got {value}")
    for flag in ("num_train", "num_dev", "num_test", "max_eval_examples"):
        value = getattr(args, flag)
        if value is not None and value < (1 if flag == "num_train" else 0):
            raise ValueError(f"--{flag} must be >= {1 if flag == 'num_train' else 0}, got {value}")
    if args.max_eval_examples is not None:
        if args.num_dev is not None or args.num_test is not None:
            raise ValueError("--max_eval_examples sets both --num_dev and --num_test; give either, not both")
        args.num_dev = args.num_test = args.max_eval_examples
    args.max_steps = args.max_steps or DEFAULT_MAX_STEPS
    args.eval_every = DEFAULT_EVAL_EVERY if args.eval_every is None else args.eval_every
    args.log_every = args.log_every or DEFAULT_LOG_EVERY
    task_of(args)  # the task's flags are checked now, not after the model has loaded
    return args


def task_of(args: argparse.Namespace) -> Task:
    """The task the flags describe (see the module docstring), or a ValueError naming the flags."""
    sources = [f"--{f}" for f in ("dataset", "data_files", "data_dir") if getattr(args, f) is not None]
    builtin = _builtin(args.task)
    if builtin is None and args.template is None:
        if args.task is not None:
            get_task(args.task)  # the unknown-task error, listing the known ones
        if sources or args.label_words is not None:
            raise ValueError(
                f"{' '.join(sources) or '--label_words'} without --task: give --task NAME for a built-in task "
                f"({', '.join(list_tasks())}), or --template (and --label_words) to define your own"
            )
        if args.model_name_or_path is not None:
            raise ValueError("--model_name_or_path needs a task: --task NAME, or --template with your data")
        builtin = SENTIMENT
    if builtin is not None:
        if args.label_column is not None:
            raise ValueError(f"--label_column applies to a task you define; {builtin.name!r} reads its own columns")
        task = resolve_task(builtin, template=args.template, label_words=args.label_words)
    else:
        if not sources:
            raise ValueError("--template defines a task over your data: add --dataset, --data_files or --data_dir")
        name = args.task or args.dataset or "custom"
        task = make_task(name, args.template, args.label_words, label_column=args.label_column or "label")
    if args.dataset is not None and not os.path.isdir(args.dataset):
        task = replace(task, hub=(args.dataset, args.dataset_config))  # a hub id: where load_dataset finds it
    if task.generate is not None and sources:
        raise ValueError(f"task {task.name!r} is generated in-process; it reads no {' or '.join(sources)}")
    if args.model_name_or_path is None and (task.generate is None or task != SENTIMENT):
        raise ValueError(
            f"task {task.name!r} needs --model_name_or_path (the built-in tiny model's tokenizer only knows "
            f"the words of the generated task{', with its own template and label words' if task.generate else ''})"
        )
    return task


def _builtin(name: str | None) -> Task | None:
    if name is None:
        return None
    try:
        return get_task(name)
    except ValueError:
        return None
