"""The objectives and evaluation: batched candidate scoring equals scoring each sequence alone (four
architectures, left padding, shared rows), the losses, metrics on known predictions, dtypes, -F1."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from task_fixtures import ARCH_NAMES, task_rows
from torch import nn

from zo2_ds.tasks import get_task, load_causal_lm, load_task_data, load_tokenizer
from zo2_ds.tasks.encode import collate_candidates, collate_prompts, encode_rows, pad_token_id, stop_token_ids
from zo2_ds.tasks.metrics import accuracy, exact_match, f1_score, normalize_answer, qa_metrics
from zo2_ds.tasks.objectives import AnswerLM, CandidateCrossEntropy, NegativeF1, candidate_scores, greedy_decode

SIZES = dict(num_train=4, num_dev=2, num_test=4, seed=0)


def _mixed_examples(tokenizer):
    """SST-2 (single-token label words, shared row) and COPA (multi-token, one row per candidate)
    examples of different lengths, so padding and both row layouts are exercised together."""
    sst2 = encode_rows(get_task("sst2"), task_rows("sst2", "train")[:3], tokenizer, max_length=256, source="t")
    copa = encode_rows(get_task("copa"), task_rows("copa", "train")[:3], tokenizer, max_length=256, source="t")
    return sst2 + copa


@torch.no_grad()
def _reference_scores(model, tokenizer, example) -> list[float]:
    """Mean log-prob of each candidate's tokens, one unpadded sequence at a time."""
    scores = []
    for cont, tokens in zip(example["candidates"], example["cand_tokens"]):
        ids = torch.tensor([tokenizer(example["prompt"] + cont)["input_ids"]])
        log_probs = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
        n = len(tokens)
        scores.append(log_probs[-n - 1 : -1].gather(-1, ids[0, -n:, None]).mean().item())
    return scores


@pytest.mark.parametrize("arch", ARCH_NAMES)
def test_batched_scores_equal_single_sequences(arch, model_dirs):
    tokenizer, model = load_tokenizer(model_dirs[arch]), load_causal_lm(model_dirs[arch]).eval()
    examples = _mixed_examples(tokenizer)
    batch = collate_candidates(examples, pad_id=pad_token_id(tokenizer))
    assert batch["input_ids"].shape[0] == 3 + 6  # 1 shared row per SST-2 example, 2 rows per COPA one
    with torch.no_grad():
        labels = batch.pop("labels")
        scores = candidate_scores(model, **batch)
        loss = CandidateCrossEntropy(model)(**batch, labels=labels)
    reference = torch.tensor([_reference_scores(model, tokenizer, ex) for ex in examples])
    torch.testing.assert_close(scores, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(loss, F.cross_entropy(reference, labels), atol=1e-5, rtol=1e-5)


def test_answer_lm_is_token_mean_nll_of_the_gold_answer(tokenizer, opt_model):
    examples = encode_rows(get_task("squad"), task_rows("squad", "train")[:3], tokenizer, max_length=256, source="t")
    batch = collate_candidates(examples, pad_id=pad_token_id(tokenizer), target_only=True)
    with torch.no_grad():
        loss = AnswerLM(opt_model)(**batch)
        nll, count = 0.0, 0
        for ex in examples:
            ids = torch.tensor([tokenizer(ex["prompt"] + ex["candidates"][0])["input_ids"]])
            n = len(ex["cand_tokens"][0])
            log_probs = torch.log_softmax(opt_model(input_ids=ids).logits[0], dim=-1)
            nll -= log_probs[-n - 1 : -1].gather(-1, ids[0, -n:, None]).sum().item()
            count += n
    assert loss.item() == pytest.approx(nll / count, rel=1e-5)


def test_wrapper_keeps_model_as_submodule_and_is_stateless(tokenizer, opt_model, task_data_dir):
    data = load_task_data("rte", tokenizer, data_dir=task_data_dir, **SIZES)
    wrapped = data.wrap_model(opt_model)
    names = [n for n, _ in wrapped.named_parameters()]
    assert names == ["model." + n for n, _ in opt_model.named_parameters()]
    batch = data.collate(data.train)
    with torch.no_grad():
        first, second = wrapped(**batch), wrapped(**batch)
    assert torch.equal(first, second) and first.dtype == torch.float32


class _BiasLM(nn.Module):
    """Logits that are the same at every position: a fixed preference over the vocabulary."""

    def __init__(self, vocab_size: int, favoured: int):
        super().__init__()
        self.register_buffer("bias", torch.zeros(vocab_size))
        self.bias[favoured] = 20.0

    def forward(self, input_ids, attention_mask=None, position_ids=None, logits_to_keep=0):
        width = logits_to_keep or input_ids.shape[1]
        return SimpleNamespace(logits=self.bias.expand(input_ids.shape[0], width, -1))


def test_accuracy_on_known_predictions(tokenizer, task_data_dir):
    data = load_task_data("sst2", tokenizer, data_dir=task_data_dir, num_train=2, num_dev=2, num_test=None)
    (great,) = tokenizer.encode(" great", add_special_tokens=False)
    (terrible,) = tokenizer.encode(" terrible", add_special_tokens=False)
    share_positive = sum(ex["gold"] == [1] for ex in data.test) / len(data.test)
    assert 0 < share_positive < 1
    always_great = data.evaluate(_BiasLM(len(tokenizer), great), data.test, batch_size=3)
    always_terrible = data.evaluate(_BiasLM(len(tokenizer), terrible), data.test, batch_size=3)
    assert always_great == {"accuracy": share_positive}
    assert always_terrible == {"accuracy": 1 - share_positive}


def test_metrics_on_known_predictions():
    assert normalize_answer("The  Cat, sat!") == "cat sat"
    assert exact_match("the Cat.", ["a dog", "cat"]) == 1.0 and exact_match("cat sat", ["cat"]) == 0.0
    assert f1_score("the cat sat", ["cat sat on mat"]) == pytest.approx(2 / 3)  # P = 1, R = 1/2
    assert f1_score("cat", ["dog", "cat"]) == 1.0 and f1_score("", ["cat"]) == 0.0
    assert accuracy([1, 0, 2], [[1], [1], [0, 2]]) == pytest.approx(2 / 3)
    assert qa_metrics(["cat", "a dog ran"], [["cat"], ["dog"]]) == {"em": 0.5, "f1": pytest.approx((1 + 2 / 3) / 2)}


class _ScriptedGenerator(nn.Module):
    """generate() appends fixed text to every prompt (then a newline and more text, which the
    decoder must cut off)."""

    def __init__(self, tokenizer, outputs: list[str]):
        super().__init__()
        self.tokenizer, self.outputs, self.calls = tokenizer, outputs, 0

    def generate(self, input_ids, attention_mask, **kwargs):
        texts = self.outputs[self.calls : self.calls + input_ids.shape[0]]
        self.calls += input_ids.shape[0]
        new = [self.tokenizer.encode(" " + t + "\nignored", add_special_tokens=False) for t in texts]
        width = max(len(n) for n in new)
        tail = torch.tensor([n + [0] * (width - len(n)) for n in new])
        return torch.cat([input_ids, tail], dim=1)


def test_generation_metrics_and_neg_f1_on_known_predictions(tokenizer, task_data_dir):
    data = load_task_data("squad", tokenizer, data_dir=task_data_dir, objective="neg_f1", **SIZES)
    golds = [ex["answers"] for ex in data.test]
    outputs = [golds[0][0], "zzz", golds[2][-1] + " extra words", "the"]
    expected = qa_metrics(outputs, golds)
    assert 0 < expected["f1"] < 1
    assert data.evaluate(_ScriptedGenerator(tokenizer, outputs), data.test, batch_size=3) == expected

    batch = data.collate(data.test[:2])
    assert set(batch) == {"input_ids", "attention_mask", "uid"}
    loss = data.wrap_model(_ScriptedGenerator(tokenizer, outputs))(**batch)
    assert isinstance(data.wrap_model(nn.Identity()), NegativeF1)
    assert loss.item() == pytest.approx(-(1.0 + 0.0) / 2)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_greedy_decode_batched_equals_single(arch, model_dirs, task_data_dir):
    tokenizer, model = load_tokenizer(model_dirs[arch]), load_causal_lm(model_dirs[arch]).eval()
    task = replace(get_task("drop"), max_new_tokens=6)
    data = load_task_data(task, tokenizer, data_dir=task_data_dir, **SIZES)
    rows = task_rows("drop", "validation")
    rows[1]["passage"] += " The cat ran far away from the city."
    rows[2]["passage"] = "Short."
    data.test = encode_rows(task, rows, tokenizer, max_length=256, source="t", first_uid=100)
    kw = dict(max_new_tokens=6, stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer))
    batch = collate_prompts(data.test, pad_id=pad_token_id(tokenizer))
    assert (batch["attention_mask"] == 0).any()  # prompts of different lengths: padding is exercised
    batched = greedy_decode(model, batch["input_ids"], batch["attention_mask"], tokenizer, **kw)
    single = []
    for ex in data.test:
        ids = torch.tensor([ex["prompt_ids"]])
        single += greedy_decode(model, ids, torch.ones_like(ids), tokenizer, **kw)
    assert batched == single
    metrics = data.evaluate(model, data.test, batch_size=3)
    assert metrics == qa_metrics(single, [ex["answers"] for ex in data.test])


@pytest.mark.parametrize("dtype", ["fp16", "bf16"])
def test_half_precision_models_give_a_close_loss(dtype, opt_dir, tokenizer, task_data_dir):
    data = load_task_data("cb", tokenizer, data_dir=task_data_dir, **SIZES)
    batch = data.collate(data.train)
    with torch.no_grad():
        reference = data.wrap_model(load_causal_lm(opt_dir).eval())(**batch)
        half_model = load_causal_lm(opt_dir, dtype=dtype).eval()
        assert next(half_model.parameters()).dtype == {"fp16": torch.float16, "bf16": torch.bfloat16}[dtype]
        loss = data.wrap_model(half_model)(**batch)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(reference.item(), abs=0.05)
    assert 0.0 <= data.evaluate(half_model, data.test, batch_size=2)["accuracy"] <= 1.0


def test_neg_f1_on_a_real_model_is_minus_the_f1_of_its_greedy_decode(model_dirs, task_data_dir):
    tokenizer, model = load_tokenizer(model_dirs["llama"]), load_causal_lm(model_dirs["llama"]).eval()
    task = replace(get_task("squad"), max_new_tokens=4)
    data = load_task_data(task, tokenizer, data_dir=task_data_dir, objective="neg_f1", **SIZES)
    batch = data.collate(data.train)
    with torch.no_grad():
        loss = data.wrap_model(model)(**batch)
    kw = dict(max_new_tokens=4, stop_ids=stop_token_ids(tokenizer), pad_id=pad_token_id(tokenizer))
    predictions = greedy_decode(model, batch["input_ids"], batch["attention_mask"], tokenizer, **kw)
    assert loss.dim() == 0 and loss.item() == pytest.approx(
        -qa_metrics(predictions, [ex["answers"] for ex in data.train])["f1"]
    )


def test_long_prompts_lose_tokens_on_the_left_keeping_bos(tokenizer, caplog):
    row = {"sentence": " ".join(["cat dog"] * 40), "label": 1}
    (example,) = encode_rows(get_task("sst2"), [row], tokenizer, max_length=16, source="t")
    full = tokenizer(example["prompt"] + " great")["input_ids"]
    assert len(full) > 16
    assert example["rows"][0] + example["cand_tokens"][1] == full[:1] + full[-15:]
    assert "reach max_length=16" in caplog.text
    with pytest.raises(ValueError, match="does not fit max_length=2"):
        encode_rows(get_task("copa"), task_rows("copa", "train")[:1], tokenizer, max_length=2, source="t")
