"""What launch/train.py (and launch/train_trainer.py) need besides the training loop itself: the
command line, building the job, the DeepSpeed config, data-parallel batches, evaluation and the
best-dev checkpoint, the run's use of zo2_ds.checkpoint, and the run's records (log.jsonl, metrics.json).

    args = job.check_args(job.build_parser().parse_args())
    task = job.task_of(args)
    ds_config = job.resolve_ds_config(args.deepspeed_config, max_steps=args.max_steps, peft=args.peft)
    tokenizer = job.build_tokenizer(args, task)
    task_data = job.build_task_data(args, task, tokenizer)
    model = job.build_model(args, tokenizer)
"""

from zo2_ds.job.batching import ShardedBatches
from zo2_ds.job.build import (
    apply_adapter,
    build_model,
    build_task_data,
    build_tokenizer,
    hf_state_collector,
    save_hf_copy,
)
from zo2_ds.job.checkpoints import RUN_FILES, RunCheckpoints, open_run_dir, run_info_of, stop_exit_code
from zo2_ds.job.cli import DEFAULT_EVAL_EVERY, DEFAULT_LOG_EVERY, DEFAULT_MAX_STEPS, build_parser, check_args, task_of
from zo2_ds.job.ds_config import DEFAULT_DS_CONFIG, read_ds_config, resolve_ds_config
from zo2_ds.job.env import set_process_env
from zo2_ds.job.evaluation import BestKeeper, Evaluator, prefixed, run_figures
from zo2_ds.job.records import LossWindow, RunRecorder

__all__ = [
    "DEFAULT_DS_CONFIG",
    "DEFAULT_EVAL_EVERY",
    "DEFAULT_LOG_EVERY",
    "DEFAULT_MAX_STEPS",
    "BestKeeper",
    "Evaluator",
    "LossWindow",
    "RUN_FILES",
    "RunCheckpoints",
    "RunRecorder",
    "ShardedBatches",
    "apply_adapter",
    "build_model",
    "build_parser",
    "build_task_data",
    "build_tokenizer",
    "check_args",
    "open_run_dir",
    "prefixed",
    "read_ds_config",
    "resolve_ds_config",
    "run_figures",
    "run_info_of",
    "save_hf_copy",
    "hf_state_collector",
    "set_process_env",
    "stop_exit_code",
    "task_of",
]
