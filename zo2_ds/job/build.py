"""Building a job from its checked arguments (``cli.check_args``): the tokenizer, the task's data, the
model (with its adapter), and the HF-format copy a run leaves next to its checkpoints.

The order is the launcher's: tokenizer, then data (its errors name files and rows), then the model,
the one expensive step, last.
"""

from __future__ import annotations

import os
from argparse import Namespace
from typing import Any

from torch import nn

from zo2_ds.tasks import (
    MEZO_NUM_TEST,
    Task,
    TaskData,
    apply_lora,
    apply_prefix_tuning,
    build_tiny_opt,
    build_word_tokenizer,
    load_causal_lm,
    load_task_data,
    load_tokenizer,
    parse_data_files,
    save_adapter,
)

__all__ = [
    "build_tokenizer",
    "build_task_data",
    "build_model",
    "has_safetensors",
    "apply_adapter",
    "save_hf_copy",
    "hf_state_collector",
]


def build_tokenizer(args: Namespace, task: Task):
    """The model's tokenizer, or without ``--model_name_or_path`` a word tokenizer of the generated task."""
    if args.model_name_or_path is None:
        return build_word_tokenizer(task.vocabulary)
    return load_tokenizer(args.model_name_or_path)


def build_task_data(args: Namespace, task: Task, tokenizer) -> TaskData:
    """The task's sampled, tokenized splits from the source the flags name (else the task's own)."""
    data_dir = args.data_dir
    if args.dataset is not None and os.path.isdir(args.dataset):
        data_dir = args.dataset  # a save_to_disk folder or a folder of split files
    return load_task_data(
        task,
        tokenizer,
        data_dir=data_dir,
        data_files=parse_data_files(args.data_files) if args.data_files else None,
        num_train=args.num_train,
        num_dev=args.num_dev,
        num_test=MEZO_NUM_TEST if args.num_test is None else args.num_test,
        seed=args.seed,
        max_length=args.max_length,
    )


def build_model(args: Namespace, tokenizer, *, offload: dict | None = None) -> nn.Module:
    """The causal LM (a tiny random OPT without ``--model_name_or_path``), wrapped in its adapter with
    ``--peft`` (then only the adapter has ``requires_grad``, and that is all the ZO engine perturbs).

    With ``offload`` (the config's ``zo2.offload`` block, when enabled) and a local folder of safetensors
    weights, the blocks are read one tensor at a time straight into their pinned host homes
    (:func:`zo2_ds.offload.materialize`): the model never exists whole in pageable memory, and the engine
    adopts those homes without a copy. With ``partition`` "node" (or "auto", the default) and more than one
    rank per node each rank reads and pins only its shard of every streamed unit (torch.distributed must be
    initialized: train.py does it first)."""
    if args.model_name_or_path is None:
        model = build_tiny_opt(len(tokenizer), seed=args.seed)
    elif offload and has_safetensors(args.model_name_or_path):
        from deepspeed.accelerator import get_accelerator

        from zo2_ds.offload import materialize
        from zo2_ds.offload.materialize import materialize_layout

        if get_accelerator().device_name() != "cpu":  # the parts outside the blocks go to this rank's device
            get_accelerator().set_device(int(os.environ.get("LOCAL_RANK", "0")))
        layout = materialize_layout(offload)
        rank0 = os.environ.get("RANK", "0") == "0"
        if rank0:
            part = layout["partition"]
            each = "" if part is None else f" (each of a node's {part.num_ranks} ranks its 1/{part.num_ranks} shard)"
            print(f"zo2: reading {args.model_name_or_path} block by block into pinned host memory{each}", flush=True)
        show = rank0 and not args.no_progress
        model = materialize(args.model_name_or_path, dtype=args.dtype, progress=show, **layout)
    else:
        model = load_causal_lm(args.model_name_or_path, dtype=args.dtype)
    return apply_adapter(model, args) if args.peft else model


def has_safetensors(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a local folder with safetensors weights (what ``materialize`` reads)."""
    names = ("model.safetensors", "model.safetensors.index.json")
    return os.path.isdir(path) and any(os.path.isfile(os.path.join(path, n)) for n in names)


def apply_adapter(model: nn.Module, args: Namespace) -> nn.Module:
    """``model`` in a LoRA (``--lora_r``, ``--lora_alpha``) or prefix (``--prefix_tokens``) adapter."""
    try:
        import peft  # noqa: F401
    except ImportError:
        raise ValueError(f"--peft {args.peft} needs peft: pip install 'zo2_ds[peft]'") from None
    model.eval()  # no dropout (MeZO); the engine switches it off in the perturbed passes anyway
    if args.peft == "lora":
        return apply_lora(model, r=args.lora_r, alpha=args.lora_alpha)
    return apply_prefix_tuning(model, num_virtual_tokens=args.prefix_tokens, seed=args.seed)


def save_hf_copy(model: nn.Module, folder: str | os.PathLike, tokenizer: Any = None, state_dict: Any = None) -> str:
    """The weights in Hugging Face format next to a DeepSpeed checkpoint, for use without zo2_ds:
    ``<folder>/adapter`` (PEFT format, ``PeftModel.from_pretrained(base, path)``) for a peft model,
    else ``<folder>/model`` (``save_pretrained``, with the tokenizer when there is one). Returns the path.
    ``state_dict``: the model's, gathered beforehand by every rank (see :func:`hf_state_collector`)."""
    if hasattr(model, "peft_config"):
        path = os.path.join(folder, "adapter")
        save_adapter(model, path, state_dict=state_dict)
        return path
    from transformers.utils import logging as hf_logging

    path = os.path.join(folder, "model")
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # its "Writing model shards" bar at every checkpoint is noise
    try:
        model.save_pretrained(path, state_dict=state_dict)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    if tokenizer is not None:
        tokenizer.save_pretrained(path)
    return path


def hf_state_collector(engine: Any, model: nn.Module) -> Any:
    """What every rank must run before rank 0 writes the HF copy: ``model.state_dict`` when the blocks' host
    masters are partitioned over the ranks (``zo2.offload.partition``: reading them whole is a collective,
    so rank 0 alone would wait for ever), with only rank 0 keeping the gathered weights; else None (rank 0
    reads the weights alone)."""
    from zo2_ds.offload.partition import kept_gathered

    store = getattr(engine, "zo_offload_store", None)
    if store is None or store.partition is None:
        return None

    def collect() -> dict:
        with kept_gathered(engine.global_rank == 0):
            return model.state_dict()

    return collect
