"""Fixtures for the task tests: local data in each task's hub layout, an in-process tokenizer and
tiny OPT / Llama / Qwen2 / GPT-2 models saved with save_pretrained. Nothing is downloaded."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Tests never touch the network: everything is written locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from task_fixtures import ARCH_NAMES, TASK_NAMES, build_tokenizer, task_rows, tiny_config, write_jsonl  # noqa: E402


@pytest.fixture(scope="session")
def task_data_dir(tmp_path_factory) -> Path:
    """data/<task>/{train,validation}.jsonl for every built-in task."""
    root = tmp_path_factory.mktemp("task_data")
    for task in TASK_NAMES:
        for split in ("train", "validation"):
            write_jsonl(root / task / f"{split}.jsonl", task_rows(task, split))
    return root


@pytest.fixture(scope="session")
def model_dirs(tmp_path_factory) -> dict[str, Path]:
    """Tiny random models with their tokenizer, saved with save_pretrained; GPT-2's tokenizer adds
    no BOS (like the real one), the others do."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("models")
    dirs = {}
    for arch in ARCH_NAMES:
        tokenizer = build_tokenizer(add_bos=arch != "gpt2")
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(tiny_config(arch, len(tokenizer)))
        model.save_pretrained(root / arch)
        tokenizer.save_pretrained(root / arch)
        dirs[arch] = root / arch
    return dirs


@pytest.fixture(scope="session")
def opt_dir(model_dirs) -> Path:
    return model_dirs["opt"]


@pytest.fixture
def tokenizer(opt_dir):
    from zo2_ds.tasks import load_tokenizer

    return load_tokenizer(opt_dir)


@pytest.fixture
def opt_model(opt_dir):
    from zo2_ds.tasks import load_causal_lm

    return load_causal_lm(opt_dir).eval()
