"""The task routes end to end on CPU: launch/train.py with --task and --peft lora|prefix (base weights
bit-identical, adapter moved, saved adapter reloads, best checkpoint, monitor, plot), a generation
task's em/f1 evaluation and eval-only mode, and launch/train_trainer.py (HF Trainer). Tiny OPT +
in-process tokenizer saved with save_pretrained; local sst2/squad files.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_train import check, read_log, run_train

sys.path.insert(0, str(Path(__file__).resolve().parent / "tasks"))
from task_fixtures import _row, build_tokenizer, tiny_config, write_jsonl  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
peft = pytest.importorskip("peft")


@pytest.fixture(scope="module")
def local(tmp_path_factory) -> dict[str, Path]:
    """A tiny OPT with its tokenizer (save_pretrained), sst2 and squad data in the hub layout, and a
    DeepSpeed config with micro-batch 4 and a csv monitor (no output_path: train.py puts it in the run)."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("tasks_local")
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(tiny_config("opt", len(tokenizer))).save_pretrained(root / "opt")
    tokenizer.save_pretrained(root / "opt")
    for task, num_train, num_eval in (("sst2", 48, 16), ("squad", 24, 8)):
        write_jsonl(root / "data" / task / "train.jsonl", [_row(task, i) for i in range(num_train)])
        write_jsonl(root / "data" / task / "validation.jsonl", [_row(task, 100 + i) for i in range(num_eval)])
    config = {
        "train_micro_batch_size_per_gpu": 4,
        "steps_per_print": 10**6,
        "optimizer": {"type": "SGD", "params": {"lr": 1e-2}},
        "zo2": {"enabled": True, "eps": 1e-2},
        "csv_monitor": {"enabled": True, "job_name": "zo2"},
    }
    (root / "ds.json").write_text(json.dumps(config))
    return {"model": root / "opt", "data": root / "data", "config": root / "ds.json"}


def _task_args(local, out: Path, task: str = "sst2", *extra: str) -> list[str]:
    return [
        "--model_name_or_path",
        str(local["model"]),
        "--task",
        task,
        "--data_dir",
        str(local["data"]),
        "--max_train_examples",
        "24",
        "--max_eval_examples",
        "8",
        "--deepspeed_config",
        str(local["config"]),
        "--output_dir",
        str(out),
        *extra,
    ]


def _checkpoint_module(folder: Path) -> dict[str, torch.Tensor]:
    return torch.load(folder / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)["module"]


def _split_base_and_adapter(module_state: dict, base_state: dict) -> tuple[dict, dict]:
    """The checkpoint's base weights keyed as in the plain model (peft adds prefixes and .base_layer),
    and its adapter tensors."""
    adapter = {k: v for k, v in module_state.items() if "lora_" in k or "prompt_encoder" in k}
    rest = {k.replace(".base_layer", ""): v for k, v in module_state.items() if k not in adapter}
    base = {}
    for key in base_state:
        matches = [k for k in rest if k.endswith("." + key)]
        assert matches, f"{key} missing from the checkpoint"
        base[key] = rest[min(matches, key=len)]
    return base, adapter


def _assert_base_identical_adapter_moved(local, out: Path, moved) -> None:
    from transformers import AutoModelForCausalLM

    base_state = AutoModelForCausalLM.from_pretrained(local["model"]).state_dict()
    base, adapter = _split_base_and_adapter(_checkpoint_module(out / (out / "latest").read_text().strip()), base_state)
    for key, value in base_state.items():
        assert torch.equal(base[key], value), f"base weight {key} changed"
    assert adapter and moved(adapter), "the adapter did not move"
    return adapter


def test_lora_run_keeps_base_identical_saves_best_and_reloads(tmp_path, local):
    out = tmp_path / "lora"
    check(run_train(*_task_args(local, out, "sst2", "--peft", "lora", "--max_steps", "4", "--eval_every", "2")))
    # LoRA's B starts at zero: any non-zero B means the adapter moved.
    adapter = _assert_base_identical_adapter_moved(
        local, out, lambda a: any(v.abs().max() > 0 for k, v in a.items() if "lora_B" in k)
    )

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["peft"] == "lora" and metrics["steps"] == 4 and metrics["best_step"] in (2, 4)
    assert {"best_dev_accuracy", "eval_accuracy_best", "steps_per_second"} <= set(metrics)
    assert 0 < metrics["num_trainable_parameters"] < 5000
    log = read_log(out)
    assert [r["step"] for r in log] == [2, 4] and all("eval_accuracy" in r for r in log)
    # DeepSpeed's csv monitor got the dev metric next to its own series (x axis: samples).
    eval_csv = (out / "monitor" / "zo2" / "Eval_accuracy.csv").read_text().splitlines()
    assert eval_csv[0] == "step,accuracy" and [line.split(",")[0] for line in eval_csv[1:]] == ["8", "16"]

    # The adapter in PEFT format, at the end and with the best checkpoint; it reloads onto the base.
    from transformers import AutoModelForCausalLM

    best = out / (out / "best").read_text().strip()  # 'best' names the best-dev checkpoint folder
    assert (best / "mp_rank_00_model_states.pt").is_file() and (best / "adapter" / "adapter_config.json").is_file()
    assert (out / "best_adapter" / "adapter_config.json").is_file()
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["r"] == 8
    reloaded = peft.PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(local["model"]), out / "adapter")
    lora = {k: v for k, v in reloaded.state_dict().items() if "lora_" in k}
    assert len(lora) == len(adapter)
    saved = {k.split("base_model.model.")[-1]: v for k, v in adapter.items()}
    for key, value in lora.items():
        assert torch.equal(saved[key.split("base_model.model.")[-1]], value), key

    # launch/plot.py draws the run (train loss, eval_accuracy, lr) from its logs.
    plot = subprocess.run(
        [sys.executable, str(REPO / "launch" / "plot.py"), str(out)], capture_output=True, text=True, check=False
    )
    assert plot.returncode == 0, plot.stderr
    assert (out / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_prefix_run_then_eval_only_from_the_best_checkpoint(tmp_path, local):
    out = tmp_path / "prefix"
    check(run_train(*_task_args(local, out, "sst2", "--peft", "prefix", "--max_steps", "2", "--eval_every", "1")))

    def prefix_moved(adapter: dict) -> bool:  # against the prefix train.py starts from (same seed)
        from transformers import AutoModelForCausalLM

        from zo2_ds.tasks import apply_prefix_tuning

        fresh = apply_prefix_tuning(AutoModelForCausalLM.from_pretrained(local["model"]).eval(), seed=0)
        (value,) = adapter.values()
        return not torch.equal(value, fresh.prompt_encoder.default.embedding.weight)

    _assert_base_identical_adapter_moved(local, out, prefix_moved)
    assert json.loads((out / "adapter" / "adapter_config.json").read_text())["peft_type"] == "PREFIX_TUNING"
    metrics = json.loads((out / "metrics.json").read_text())
    check(
        run_train(
            *_task_args(local, out, "sst2", "--peft", "prefix", "--eval_only", "--resume", "--checkpoint_tag", "best")
        )
    )
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["eval_only"] and evaluated["steps"] == metrics["best_step"]
    assert evaluated["eval_accuracy"] == pytest.approx(metrics["eval_accuracy_best"])


def test_generation_task_reports_em_and_f1_in_training_and_eval_only(tmp_path, local):
    out = tmp_path / "squad"
    check(run_train(*_task_args(local, out, "squad", "--max_steps", "2", "--eval_every", "1", "--no_hf_save")))
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "squad"
    assert {"eval_f1_before", "eval_em_after", "eval_f1_after", "best_dev_f1", "eval_f1_best"} <= set(metrics)
    assert all({"eval_em", "eval_f1"} <= set(r) for r in read_log(out))
    assert not (out / "model").exists() and not (out / "best_model").exists()
    check(run_train(*_task_args(local, out, "squad", "--eval_only", "--resume")))
    evaluated = json.loads((out / "metrics.json").read_text())
    assert evaluated["eval_only"] and evaluated["steps"] == 2
    assert evaluated["eval_f1"] == pytest.approx(metrics["eval_f1_after"])
    assert {"eval_em", "dev_em", "dev_f1"} <= set(evaluated)


def test_hf_trainer_example_trains_a_task(tmp_path, local):
    spec = importlib.util.spec_from_file_location("zo2_ds_train_trainer", REPO / "launch" / "train_trainer.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out = tmp_path / "trainer"
    args = example.parse_args(
        [
            "--model_name_or_path",
            str(local["model"]),
            "--task",
            "sst2",
            "--data_dir",
            str(local["data"]),
            "--num_train",
            "24",
            "--num_dev",
            "8",
            "--num_test",
            "8",
            "--max_steps",
            "4",
            "--per_device_train_batch_size",
            "4",
            "--learning_rate",
            "1e-2",
            "--eval_steps",
            "2",
            "--output_dir",
            str(out),
        ]
    )
    trainer, task_data, lm = example.build_trainer(args)
    before = {n: p.detach().clone() for n, p in lm.named_parameters()}
    trainer.train()
    import zo2_ds

    assert isinstance(trainer.model_wrapped, zo2_ds.ZOEngine) and trainer.model_wrapped.global_steps == 4
    history = trainer.state.log_history
    assert len([h for h in history if "loss" in h]) >= 2
    assert [h["step"] for h in history if "eval_accuracy" in h] == [2, 4]
    assert any(not torch.equal(p, before[n]) for n, p in lm.named_parameters())
    assert all(p.grad is None for p in lm.parameters())
