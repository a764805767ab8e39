"""LoRA and prefix tuning through peft: only adapter parameters are trainable, a ZO step (done here
with the zo2_ds.zo functions, as the engine does) moves the adapter and leaves the base weights
bit-identical, and the adapter saves and reloads in PEFT format."""

from __future__ import annotations

import json

import pytest
import torch

from zo2_ds.tasks import (
    MEZO_ADAPTER_DEFAULTS,
    apply_lora,
    apply_prefix_tuning,
    load_causal_lm,
    load_task_data,
    load_tokenizer,
    save_adapter,
    trainable_parameter_names,
)
from zo2_ds.tasks.encode import collate_candidates, collate_prompts, pad_token_id
from zo2_ds.tasks.objectives import candidate_scores, greedy_decode
from zo2_ds.zo import apply_update_, param_key, perturbed_into, projected_grad, z_seed

peft = pytest.importorskip("peft")

SIZES = dict(num_train=4, num_dev=2, num_test=4, seed=0)


def _zo_step(module, batch, *, seed: int, step: int, eps: float, lr: float) -> None:
    """One MeZO step on the requires_grad parameters: perturbed copies swapped in for the two
    forwards (the clean tensors are never written), then the update from the projected gradient."""
    params = [(n, p) for n, p in module.named_parameters() if p.requires_grad]
    seeds = {n: z_seed(seed, step, 0, param_key(n)) for n, _ in params}

    def loss_at(scale: float) -> torch.Tensor:
        clean = {n: p.data for n, p in params}
        for n, p in params:
            p.data = perturbed_into(torch.empty_like(p), clean[n], seeds[n], scale)
        try:
            with torch.no_grad():
                return module(**batch)
        finally:
            for n, p in params:
                p.data = clean[n]

    grad = projected_grad(loss_at(eps), loss_at(-eps), eps).item()
    for n, p in params:
        apply_update_(p.data, [seeds[n]], [grad], lr, 0.0)


def _snapshot(model, trainable: bool) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad == trainable}


def _assert_adapter_only_moves(model, data, *, eps: float, lr: float) -> None:
    base, adapter = _snapshot(model, trainable=False), _snapshot(model, trainable=True)
    wrapped = data.wrap_model(model)
    for step in range(3):
        _zo_step(wrapped, data.collate(data.train), seed=11, step=step, eps=eps, lr=lr)
    for n, p in model.named_parameters():
        if n in base:
            assert torch.equal(p, base[n]), f"base weight {n} changed"
        else:
            assert not torch.equal(p, adapter[n]), f"adapter weight {n} did not move"


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_lora_moves_only_the_adapter_and_saves_in_peft_format(arch, model_dirs, task_data_dir, tmp_path):
    tokenizer = load_tokenizer(model_dirs[arch])
    data = load_task_data("sst2", tokenizer, data_dir=task_data_dir, **SIZES)
    model = apply_lora(load_causal_lm(model_dirs[arch]).eval())
    names = trainable_parameter_names(model)
    assert names and all("lora_A" in n or "lora_B" in n for n in names)
    assert {n.split(".")[-4] for n in names} == {"q_proj", "v_proj"}  # MeZO's LoRA targets
    defaults = MEZO_ADAPTER_DEFAULTS["lora"]
    _assert_adapter_only_moves(model, data, eps=defaults["eps"], lr=defaults["lr"])

    save_adapter(model, tmp_path / "adapter")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["r"], config["lora_alpha"]) == ("LORA", 8, 16)
    reloaded = peft.PeftModel.from_pretrained(load_causal_lm(model_dirs[arch]).eval(), tmp_path / "adapter")
    batch = data.collate(data.test)
    with torch.no_grad():
        assert torch.equal(data.wrap_model(reloaded)(**batch), data.wrap_model(model)(**batch))


def test_prefix_init_from_activations_equals_a_real_prefix(model_dirs):
    """With the prefix set from the model's own keys/values for 5 random tokens, the prefixed model
    on x gives the base model's logits on (tokens + x)."""
    base = load_causal_lm(model_dirs["llama"]).eval()  # GQA: 1 key/value head, 2 query heads
    tokens = torch.randint(0, base.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    x = torch.tensor([[1, 40, 41, 42, 43, 44]])
    with torch.no_grad():
        expected = base(input_ids=torch.cat([tokens, x], dim=1)).logits[:, 5:]
        model = apply_prefix_tuning(base, num_virtual_tokens=5, seed=3)
        got = model(input_ids=x, attention_mask=torch.ones_like(x)).logits
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ["opt", "llama"])
def test_prefix_moves_only_the_prefix_and_saves_in_peft_format(arch, model_dirs, task_data_dir, tmp_path):
    tokenizer = load_tokenizer(model_dirs[arch])
    data = load_task_data("rte", tokenizer, data_dir=task_data_dir, **SIZES)
    model = apply_prefix_tuning(load_causal_lm(model_dirs[arch]).eval())
    assert trainable_parameter_names(model) == ["prompt_encoder.default.embedding.weight"]
    assert (
        model.prompt_encoder.default.embedding.weight.shape[0] == MEZO_ADAPTER_DEFAULTS["prefix"]["num_virtual_tokens"]
    )

    # Left padding with a prefix: a batch scores as its sequences do one at a time.
    batch = collate_candidates(data.test, pad_id=pad_token_id(tokenizer))
    batch.pop("labels")
    with torch.no_grad():
        batched = candidate_scores(model, **batch)
        for i, ex in enumerate(data.test):
            single = collate_candidates([ex], pad_id=pad_token_id(tokenizer))
            single.pop("labels")
            torch.testing.assert_close(candidate_scores(model, **single)[0], batched[i], atol=1e-5, rtol=1e-5)

    defaults = MEZO_ADAPTER_DEFAULTS["prefix"]
    _assert_adapter_only_moves(model, data, eps=defaults["eps"], lr=defaults["lr"])
    save_adapter(model, tmp_path / "prefix")
    config = json.loads((tmp_path / "prefix" / "adapter_config.json").read_text())
    assert (config["peft_type"], config["num_virtual_tokens"]) == ("PREFIX_TUNING", 5)
    reloaded = peft.PeftModel.from_pretrained(load_causal_lm(model_dirs[arch]).eval(), tmp_path / "prefix")
    batch = data.collate(data.test)
    with torch.no_grad():
        torch.testing.assert_close(data.wrap_model(reloaded)(**batch), data.wrap_model(model)(**batch))
    assert 0.0 <= data.evaluate(model, data.test, batch_size=2)["accuracy"] <= 1.0


def test_save_adapter_needs_a_peft_model(opt_model, tmp_path):
    with pytest.raises(TypeError, match="peft model"):
        save_adapter(opt_model, tmp_path)


@pytest.mark.parametrize("arch", ["llama", "opt"])
def test_prefix_model_decodes_as_with_a_real_prefix(arch, model_dirs):
    tokenizer, base = load_tokenizer(model_dirs[arch]), load_causal_lm(model_dirs[arch]).eval()
    tokens = torch.randint(0, base.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(3))
    prompts = [tokenizer(p)["input_ids"] for p in ("Where is the cat? The", "Passage: The dog scored 3 points")]
    kw = dict(max_new_tokens=6, stop_ids=[tokenizer.eos_token_id], pad_id=pad_token_id(tokenizer))
    with torch.no_grad():
        expected = [greedy_decode(base, torch.tensor([tokens[0].tolist() + p]), None, tokenizer, **kw) for p in prompts]
        without_prefix = [greedy_decode(base, torch.tensor([p]), None, tokenizer, **kw) for p in prompts]
        model = apply_prefix_tuning(base, seed=3)
        batch = collate_prompts([{"prompt_ids": p, "uid": i} for i, p in enumerate(prompts)], pad_id=kw["pad_id"])
        got = greedy_decode(model, batch["input_ids"], batch["attention_mask"], tokenizer, **kw)
    assert got == [e[0] for e in expected]
    assert got != [w[0] for w in without_prefix]
