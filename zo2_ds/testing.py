"""Helpers for tests and examples: tiny HF models built from configs, DeepSpeed config builders, a free port.

Nothing here downloads anything; every model is a random-init transformers config.
"""

from __future__ import annotations

import copy
import os
import socket
from typing import Any

import torch

__all__ = ["tiny_causal_lm", "ds_config", "cpu_dist_env", "free_port", "run_ranks", "run_checks_in_triton_interpreter",
           "require_cuda", "TINY_ARCHS"]  # fmt: skip

TINY_ARCHS = ("opt", "gpt2", "llama", "qwen2", "mistral")


def tiny_causal_lm(
    arch: str = "opt",
    *,
    tied: bool = True,
    vocab_size: int = 96,
    hidden: int = 16,
    layers: int = 2,
    seed: int = 0,
    dtype: torch.dtype = torch.float32,
) -> torch.nn.Module:
    """A randomly initialised causal LM of the given architecture, small enough for CPU tests.

    Dropout is left at the architecture's default; the ZO engine runs its perturbed passes with dropout off.
    """
    import transformers as tf

    common = dict(vocab_size=vocab_size, tie_word_embeddings=tied)
    if arch == "opt":
        cfg = tf.OPTConfig(
            hidden_size=hidden,
            num_hidden_layers=layers,
            ffn_dim=2 * hidden,
            num_attention_heads=2,
            max_position_embeddings=64,
            word_embed_proj_dim=hidden,
            **common,
        )
        cls = tf.OPTForCausalLM
    elif arch == "gpt2":
        cfg = tf.GPT2Config(n_embd=hidden, n_layer=layers, n_head=2, n_positions=64, **common)
        cls = tf.GPT2LMHeadModel
    elif arch in ("llama", "qwen2", "mistral"):
        config_cls = {"llama": tf.LlamaConfig, "qwen2": tf.Qwen2Config, "mistral": tf.MistralConfig}[arch]
        cfg = config_cls(
            hidden_size=hidden,
            intermediate_size=2 * hidden,
            num_hidden_layers=layers,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
            **common,
        )
        cls = {"llama": tf.LlamaForCausalLM, "qwen2": tf.Qwen2ForCausalLM, "mistral": tf.MistralForCausalLM}[arch]
    else:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose from {', '.join(TINY_ARCHS)}")
    torch.manual_seed(seed)
    model = cls(cfg).to(dtype)
    return model


def ds_config(
    *,
    micro_batch: int = 2,
    grad_accum: int = 1,
    lr: float = 1e-3,
    weight_decay: float = 0.0,
    zo2: dict[str, Any] | None = None,
    scheduler: dict[str, Any] | None = None,
    dtype: str = "fp32",
    **extra: Any,
) -> dict[str, Any]:
    """A DeepSpeed config dict with a zo2 block (enabled unless zo2 says otherwise)."""
    cfg: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": grad_accum,
        "steps_per_print": 10**9,
        "optimizer": {"type": "SGD", "params": {"lr": lr, "weight_decay": weight_decay}},
        "zo2": {"enabled": True, **(zo2 or {})},
    }
    if scheduler is not None:
        cfg["scheduler"] = copy.deepcopy(scheduler)
    if dtype == "bf16":
        cfg["bf16"] = {"enabled": True}
    elif dtype == "fp16":
        cfg["fp16"] = {"enabled": True, "initial_scale_power": 0}
    elif dtype != "fp32":
        raise ValueError(f"dtype must be fp32, fp16 or bf16, got {dtype!r}")
    cfg.update(extra)
    return cfg


def free_port() -> int:
    """A TCP port free on 127.0.0.1 right now (for MASTER_PORT): the one helper tests and launchers use."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_dist_env(rank: int = 0, world_size: int = 1) -> dict[str, str]:
    """Environment for a single process outside any launcher: DeepSpeed on CPU over gloo."""
    env = {
        "DS_ACCELERATOR": "cpu",
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": os.environ.get("MASTER_PORT") or str(free_port()),
    }
    return env


def run_ranks(code: str, world_size: int, accelerator: str = "cpu", timeout_s: float = 300) -> None:
    """Run ``python -c code`` as ``world_size`` ranks of one job (torch.distributed's env variables set;
    gloo over the loopback on CPU) and wait for all of them; AssertionError with a rank's log tail if one
    fails."""
    import subprocess
    import sys

    port = str(free_port())
    procs = []
    for rank in range(world_size):
        env = dict(
            os.environ,
            DS_ACCELERATOR=accelerator,
            RANK=str(rank),
            LOCAL_RANK=str(rank),
            WORLD_SIZE=str(world_size),
            MASTER_ADDR="127.0.0.1",
            MASTER_PORT=port,
            GLOO_SOCKET_IFNAME="lo",
        )
        procs.append(
            subprocess.Popen(
                [sys.executable, "-c", code], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
            )
        )
    for p in procs:
        log, _ = p.communicate(timeout=timeout_s)
        assert p.returncode == 0, log[-3000:]


def run_checks_in_triton_interpreter(test_file: str, calls: str, timeout_s: float = 900) -> None:
    """Run ``calls`` (Python lines; ``ns`` holds the names of ``test_file``, ``torch`` is imported) in a fresh
    process under Triton's CPU interpreter (``TRITON_INTERPRET=1`` must be set before triton is imported);
    AssertionError with the log's tail unless it ends well."""
    import subprocess
    import sys
    from pathlib import Path

    code = f"import runpy, torch\nns = runpy.run_path({str(test_file)!r})\n{calls}\nprint('ok')\n"
    root = str(Path(__file__).resolve().parents[1])
    paths = [root, str(Path(test_file).resolve().parent), os.environ.get("PYTHONPATH", "")]  # its sibling tests too
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(paths)}
    env["TRITON_INTERPRET"] = "1"
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=timeout_s)
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-3000:]


def require_cuda(test: Any) -> Any:
    """Mark a test as needing CUDA (it is skipped elsewhere)."""
    import pytest

    return pytest.mark.cuda(test)
