"""The zo2 config block: defaults, errors that name the key, and every shipped config."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from deepspeed.accelerator import get_accelerator
from deepspeed.runtime.config import DeepSpeedConfig

import zo2_ds
from zo2_ds.config import parse_zo2_config
from zo2_ds.testing import ds_config, tiny_causal_lm

CONFIG_DIR = Path(__file__).resolve().parent.parent / "ds_configs"
SHIPPED = sorted(CONFIG_DIR.glob("*.json"))


def test_defaults():
    cfg = parse_zo2_config({"zo2": {"enabled": True}})
    assert (cfg.eps, cfg.seed, cfg.num_perturbations, cfg.offload.enabled) == (1e-3, 0, 1, False)
    assert parse_zo2_config({}).enabled is False


@pytest.mark.parametrize(
    "block,message",
    [
        (
            {"epsilon": 1e-3},
            r"zo2\.epsilon: unknown key; allowed keys are: async_step, enabled, eps, kernels, lean_loss, "
            r"num_perturbations, offload, perturbation_parallel, seed, vocab_chunks$",
        ),
        ({"eps": 0}, r"zo2\.eps: Input should be greater than 0"),
        ({"eps": "small"}, r"zo2\.eps: Input should be a valid number"),
        ({"num_perturbations": 0}, r"zo2\.num_perturbations: Input should be greater than or equal to 1"),
        ({"seed": -1}, r"zo2\.seed: Input should be greater than or equal to 0"),
        ({"enabled": "yes"}, r"zo2\.enabled: Input should be a valid boolean"),
        (
            {"offload": {"enable": True}},
            r"zo2\.offload\.enable: unknown key; allowed keys are: blocks_attr, cuda_graphs, enabled, gather, "
            r"granularity, max_gpu_memory, num_resident_blocks, partition, prefetch_depth, prefetch_next_step, "
            r"stream_head, transfer_dtype, write_back_interval$",
        ),
        ({"offload": {"prefetch_depth": -1}}, r"zo2\.offload\.prefetch_depth: Input should be greater than or equal"),
        ({"offload": {"transfer_dtype": "fp8"}}, r"zo2\.offload\.transfer_dtype: Input should be 'auto', 'fp32'"),
        (
            {"offload": {"write_back_interval": 0}},
            r"zo2\.offload\.write_back_interval: Input should be greater than or equal to 1 \(got 0\); "
            r"or Input should be 'auto'$",
        ),
        ({"offload": {"write_back_interval": 17}}, r"zo2\.offload\.write_back_interval: Input should be less"),
        ({"lean_loss": "no"}, r"zo2\.lean_loss: Input should be a valid boolean"),
        ({"vocab_chunks": "yes"}, r"zo2\.vocab_chunks: Input should be a valid boolean.*; or Input should be .auto."),
        (
            {"kernels": "triton"},
            r"zo2\.kernels: Input should be 'auto', 'multi_tensor', 'per_tensor' or 'torch' \(got 'triton'\)",
        ),
        ({"offload": {"prefetch_next_step": 0}}, r"zo2\.offload\.prefetch_next_step: Input should be a valid boolean"),
    ],
)
def test_bad_blocks_name_the_key_and_what_is_allowed(block, message):
    with pytest.raises(ValueError, match=message):
        parse_zo2_config({"zo2": block})


def test_bad_block_fails_at_initialize():
    config = ds_config()
    config["zo2"]["num_perturbation"] = 2  # misspelt
    with pytest.raises(ValueError, match="zo2.num_perturbation: unknown key"):
        zo2_ds.initialize(model=tiny_causal_lm("opt"), config=config)


def test_block_must_be_an_object():
    with pytest.raises(ValueError, match="zo2: expected a JSON object"):
        parse_zo2_config({"zo2": True})


def test_config_path_is_accepted(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps(ds_config()))
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt"), config=str(path))
    assert isinstance(engine, zo2_ds.ZOEngine)


def test_missing_config_file_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.json"):
        zo2_ds.initialize(model=tiny_causal_lm("opt"), config=str(tmp_path / "nope.json"))


def test_every_shipped_config_is_valid():
    assert {p.name for p in SHIPPED} >= {"zo2.json", "zo2_bf16.json", "zo2_fp16.json", "zo2_dp.json"}
    for path in SHIPPED:
        raw = json.loads(path.read_text())
        if path.name == "zo2_trainer.json":
            continue  # "auto" values are the HF Trainer's to fill in; tests/test_trainer.py runs it
        zo = parse_zo2_config(raw)
        assert zo.enabled, path.name
        DeepSpeedConfig(raw)  # DeepSpeed's own validation of everything else


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.name)
def test_every_shipped_config_initializes(path, tmp_path, monkeypatch):
    raw = json.loads(path.read_text())
    if path.name == "zo2_trainer.json":
        pytest.skip("filled in and run by tests/test_trainer.py")
    accel = get_accelerator()
    if raw.get("fp16", {}).get("enabled") and not accel.is_fp16_supported():
        pytest.skip(f"fp16 is not supported by the {accel.device_name()} accelerator")
    if raw.get("zo2", {}).get("offload", {}).get("enabled") and accel.device_name() == "cpu":
        raw["zo2"]["offload"].pop("max_gpu_memory", None)
    monkeypatch.chdir(tmp_path)  # monitors write relative paths
    engine, optimizer, _, scheduler = zo2_ds.initialize(model=tiny_causal_lm("opt"), config=raw)
    assert isinstance(engine, zo2_ds.ZOEngine)
    ids = torch.randint(0, 96, (engine.train_micro_batch_size_per_gpu(), 8))
    engine.train()
    out = engine(input_ids=ids, labels=ids)
    engine.backward(out.loss)
    engine.step()
    assert engine.global_steps == 1
