"""A zo2_ds.tasks task trained by the unchanged HF Trainer: the config-flag route (``import zo2_ds``).

    python launch/train_trainer.py --model_name_or_path facebook/opt-1.3b --task sst2 --data_dir data/ \
        --max_steps 2000 --learning_rate 1e-6 --eval_steps 500
    python launch/train_trainer.py --model_name_or_path facebook/opt-1.3b --task sst2 --peft lora \
        --learning_rate 1e-4 --deepspeed ds_configs/zo2_trainer.json

What makes the Trainer train with ZO is two lines: ``import zo2_ds`` and ``TrainingArguments(deepspeed=
<a config with a zo2 block>)`` (ds_configs/zo2_trainer.json: lr, batch size and schedule are "auto", filled
in by the Trainer; eps and seed are in its zo2 block). The rest is the task plumbing any Trainer needs:
- the task's collate as ``data_collator`` and ``remove_unused_columns=False`` (its keys are not the model's);
- the model is the task objective (``TaskData.wrap_model``) returning a ``ModelOutput`` with ``loss``:
  the Trainer reads ``outputs["loss"]``, the ZO engine ``outputs.loss``;
- ``evaluate`` scores the task (accuracy, or em/f1) on the dev split instead of the Trainer's eval loss.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--model_name_or_path", required=True, help="hub id or local save_pretrained folder")
    p.add_argument("--dtype", default="fp32", help="fp32, fp16 or bf16")
    p.add_argument("--task", default="sst2", help="a built-in task name (zo2_ds.tasks.list_tasks())")
    p.add_argument("--data_dir", default=None, help="local copy of the task's data (else data_files or the hub)")
    p.add_argument("--data_files", nargs="+", default=None, help="SPLIT=PATH ... (train=a.jsonl validation=b.jsonl)")
    p.add_argument("--num_train", type=int, default=None, help="train examples (MeZO: 1000)")
    p.add_argument("--num_dev", type=int, default=None, help="dev examples (MeZO: 500)")
    p.add_argument("--num_test", type=int, default=1000, help="test examples (MeZO: 1000)")
    p.add_argument("--peft", default=None, choices=["lora", "prefix"])
    p.add_argument("--lora_r", type=int, default=8)
    p.add_argument("--lora_alpha", type=int, default=16)
    p.add_argument("--prefix_tokens", type=int, default=5, help="virtual tokens of the prefix")
    p.add_argument("--deepspeed", default=str(REPO / "ds_configs" / "zo2_trainer.json"), help="config with zo2")
    p.add_argument("--output_dir", default="runs/trainer")
    p.add_argument("--max_steps", type=int, default=1000)
    p.add_argument("--learning_rate", type=float, default=1e-6)
    p.add_argument("--per_device_train_batch_size", type=int, default=16)
    p.add_argument("--eval_steps", type=int, default=0, help="steps between dev evaluations (0: at the end only)")
    p.add_argument("--eval_batch_size", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def build_trainer(args: argparse.Namespace):
    """``(trainer, task_data, lm)``: the Trainer over the task objective, the task, the (peft) causal LM."""
    import torch
    from torch import nn
    from transformers import Trainer, TrainingArguments
    from transformers.modeling_outputs import CausalLMOutput

    import zo2_ds  # noqa: F401  -- deepspeed.initialize (and so the Trainer) now honours the "zo2" block
    from zo2_ds import job
    from zo2_ds.tasks import load_causal_lm, load_task_data, load_tokenizer, parse_data_files

    ds_config = job.read_ds_config(args.deepspeed, peft=args.peft, flag="--deepspeed")  # before the model loads
    tokenizer = load_tokenizer(args.model_name_or_path)
    task_data = load_task_data(
        args.task,
        tokenizer,
        data_dir=args.data_dir,
        data_files=parse_data_files(args.data_files) if args.data_files else None,
        num_train=args.num_train,
        num_dev=args.num_dev,
        num_test=args.num_test,
        seed=args.seed,
    )
    lm = load_causal_lm(args.model_name_or_path, dtype=args.dtype).eval()  # dropout off, as MeZO
    if args.peft:
        lm = job.apply_adapter(lm, args)

    class TaskLoss(nn.Module):
        """The task objective as a Trainer model. Returns a ModelOutput (a dict with attributes), not a
        plain dict: the Trainer reads outputs["loss"], the ZO engine outputs.loss."""

        accepts_loss_kwargs = False  # the Trainer then passes no num_items_in_batch

        def __init__(self, objective: nn.Module):
            super().__init__()
            self.objective = objective

        def forward(self, **batch: torch.Tensor) -> CausalLMOutput:
            return CausalLMOutput(loss=self.objective(**batch))

    class TaskTrainer(Trainer):
        """evaluate() scores the task on its dev split: {"eval_accuracy"} or {"eval_em", "eval_f1"}."""

        def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval") -> dict:
            self.model_wrapped.eval()  # the ZO engine applies any pending (offloaded) update first
            examples = task_data.dev if eval_dataset is None else eval_dataset
            device = next(lm.parameters()).device
            values = task_data.evaluate(lm, examples, batch_size=args.eval_batch_size, device=device)
            metrics = {f"{metric_key_prefix}_{k}": v for k, v in values.items()}
            self.log(dict(metrics))  # log() adds the epoch to the dict it gets
            self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
            return metrics

    training_args = TrainingArguments(
        output_dir=args.output_dir,
        deepspeed=ds_config,
        max_steps=args.max_steps,
        learning_rate=args.learning_rate,
        lr_scheduler_type="constant",  # MeZO's schedule; the config's WarmupLR with 0 warmup steps is the same
        per_device_train_batch_size=args.per_device_train_batch_size,
        remove_unused_columns=False,  # the batch keys are the task objective's, not the LM's
        eval_strategy="steps" if args.eval_steps > 0 else "no",
        eval_steps=args.eval_steps or None,
        logging_steps=max(1, min(50, args.max_steps // 10)),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),
        disable_tqdm=True,
    )
    trainer = TaskTrainer(
        model=TaskLoss(task_data.wrap_model(lm)),
        args=training_args,
        train_dataset=task_data.train,
        eval_dataset=task_data.dev,
        data_collator=task_data.collate,
    )
    return trainer, task_data, lm


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    # Before deepspeed is imported (importing zo2_ds does): it picks its accelerator then.
    import torch

    if not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    from zo2_ds import job

    job.set_process_env(None)  # one-process rendezvous defaults
    trainer, task_data, lm = build_trainer(args)
    result = trainer.train()
    summary = {"task": task_data.task.name, "peft": args.peft, "steps": result.global_step}
    summary.update(trainer.evaluate(task_data.test, metric_key_prefix="test"))
    summary.update(trainer.evaluate(metric_key_prefix="dev"))
    summary["train_loss_last"] = next(
        (log["loss"] for log in reversed(trainer.state.log_history) if "loss" in log), None
    )
    if trainer.is_world_process_zero():
        os.makedirs(args.output_dir, exist_ok=True)
        job.save_hf_copy(lm, args.output_dir, task_data.tokenizer)
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2)
        print(json.dumps(summary))
    return summary


if __name__ == "__main__":
    main()
