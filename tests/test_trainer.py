"""The config-flag route through the HF Trainer (and so accelerate): unchanged Trainer code trains with ZO."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch.utils.data import Dataset

import zo2_ds  # noqa: F401  (the import is the one line a Trainer user adds)
from zo2_ds.testing import tiny_causal_lm


class RandomTokens(Dataset):
    def __init__(self, n: int, seq: int = 12, vocab: int = 96):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, seq), generator=gen)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def test_hf_trainer_trains_with_zo(tmp_path):
    from transformers import Trainer, TrainingArguments

    model = tiny_causal_lm("opt")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    # The shipped Trainer config: "auto" values are filled in by the Trainer.
    ds = json.loads((Path(__file__).resolve().parent.parent / "ds_configs" / "zo2_trainer.json").read_text())
    args = TrainingArguments(
        output_dir=str(tmp_path),
        per_device_train_batch_size=4,
        gradient_accumulation_steps=2,
        max_steps=4,
        learning_rate=1e-2,
        warmup_steps=1,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        deepspeed=ds,
        use_cpu=True,
        disable_tqdm=True,
    )
    trainer = Trainer(model=model, args=args, train_dataset=RandomTokens(64))
    result = trainer.train()

    engine = trainer.model_wrapped
    assert isinstance(engine, zo2_ds.ZOEngine)
    assert engine.global_steps == 4 and engine.gradient_accumulation_steps() == 2
    assert result.global_step == 4
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert len(losses) == 4 and all(0 < loss < 10 for loss in losses)
    assert all(p.grad is None for p in model.parameters())
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters())
    assert len(engine.optimizer.state) == 0
