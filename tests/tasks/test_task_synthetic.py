"""The generated task of the default job (synthetic_sentiment), its word tokenizer and tiny OPT, through
the same loader, collate, objective and evaluation as every other task."""

from __future__ import annotations

import pytest
import torch

from zo2_ds.tasks import (
    SENTIMENT,
    CandidateCrossEntropy,
    build_tiny_opt,
    build_word_tokenizer,
    get_task,
    load_task_data,
)
from zo2_ds.tasks.objectives import candidate_scores
from zo2_ds.tasks.synthetic import NEGATIVE, POSITIVE


@pytest.fixture(scope="module")
def default_task():
    tokenizer = build_word_tokenizer(SENTIMENT.vocabulary)
    return load_task_data("synthetic_sentiment", tokenizer, seed=0), tokenizer


def _sentence(example: dict) -> str:
    return example["prompt"].removesuffix(" It was")


def _frame(text: str) -> str:
    """The sentence with its adjective blanked out."""
    return " ".join("_" if w in POSITIVE + NEGATIVE else w for w in text.split())


def test_word_tokenizer_is_deterministic_and_prepends_bos():
    a = build_word_tokenizer(["The", "movie", "was", "great", "."])
    b = build_word_tokenizer([".", "great", "was", "movie", "the"])
    assert a.get_vocab() == b.get_vocab()
    ids = a("The movie was great.")["input_ids"]
    assert ids[0] == a.bos_token_id and a.unk_token_id not in ids
    assert a.decode(ids[1:]) == "the movie was great ."
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (1, 2, 2)  # OPTConfig's defaults
    assert a("dreadful")["input_ids"][-1] == a.unk_token_id
    assert a.padding_side == "left"


def test_default_task_is_seeded_balanced_and_held_out(default_task):
    data, tokenizer = default_task
    assert get_task("synthetic_sentiment") is SENTIMENT and data.task.metric == "accuracy"
    again = load_task_data("synthetic_sentiment", tokenizer, seed=0)
    assert [ex["rows"] for ex in data.train[:50]] == [ex["rows"] for ex in again.train[:50]]
    other = load_task_data("synthetic_sentiment", tokenizer, seed=1)
    assert [ex["prompt"] for ex in data.test[:20]] != [ex["prompt"] for ex in other.test[:20]]
    assert (len(data.train), len(data.dev), len(data.test)) == (3072, 384, 384)  # all of it, in order
    for split in (data.train, data.dev, data.test):
        labels = [ex["target"] for ex in split]
        assert labels.count(0) == labels.count(1) > 0
        assert all(tokenizer.unk_token_id not in ex["rows"][0] for ex in split)
    # Held out by frame: no test sentence, nor its frame, occurs in training.
    train_frames = {_frame(_sentence(ex)) for ex in data.train}
    assert not train_frames & {_frame(_sentence(ex)) for ex in data.test}
    assert not train_frames & {_frame(_sentence(ex)) for ex in data.dev}
    # The label is the adjective's polarity; the label words are one token each, sharing the prompt's row.
    great, terrible = (tokenizer(w, add_special_tokens=False)["input_ids"] for w in (" great", " terrible"))
    for ex in data.test[:100]:
        adjective = next(w for w in ex["prompt"].split() if w in POSITIVE + NEGATIVE)
        assert ex["target"] == int(adjective in POSITIVE) and ex["prompt"].endswith(" It was")
        assert ex["cand_tokens"] == [terrible, great] and ex["cand_rows"] == [0, 0]
        assert ex["rows"] == [tokenizer(ex["prompt"])["input_ids"]]


def test_generated_splits_can_be_cut_and_read_no_files(default_task, tmp_path):
    data, tokenizer = default_task
    small = load_task_data("synthetic_sentiment", tokenizer, num_train=32, num_dev=8, num_test=None)
    assert [ex["rows"] for ex in small.train] == [ex["rows"] for ex in data.train[:32]]
    assert (len(small.dev), len(small.test)) == (8, 384)
    with pytest.raises(ValueError, match="generated in-process; it reads no data_dir"):
        load_task_data("synthetic_sentiment", tokenizer, data_files=str(tmp_path / "train.jsonl"))


def test_collate_left_pads_so_the_answer_is_the_last_column(default_task):
    data, tokenizer = default_task
    examples = sorted(data.train[:40], key=lambda ex: len(ex["rows"][0]))[::13]
    batch = data.collate(examples)
    assert bool(batch["attention_mask"][:, -1].all()) and batch["cand_tokens"].shape == (len(examples), 2, 1)
    for row, ex in enumerate(examples):
        ids = ex["rows"][0]
        assert batch["input_ids"][row, -len(ids) :].tolist() == ids
        assert bool((batch["input_ids"][row, : -len(ids)] == tokenizer.pad_token_id).all())
        assert int(batch["attention_mask"][row].sum()) == len(ids)


def test_loss_is_cross_entropy_over_the_label_words_and_padding_invariant(default_task):
    data, tokenizer = default_task
    model = build_tiny_opt(len(tokenizer), seed=0)
    objective = data.wrap_model(model)
    assert isinstance(objective, CandidateCrossEntropy) and objective.model is model
    assert {n for n, _ in objective.named_parameters()} == {f"model.{n}" for n, _ in model.named_parameters()}
    examples = data.train[:8]
    candidate_ids = [t[0] for t in examples[0]["cand_tokens"]]
    with torch.no_grad():
        loss = objective(**data.collate(examples))
        # Each example alone (no padding): the answer position's logits of the two label words.
        alone = torch.stack([model(input_ids=torch.tensor(ex["rows"])).logits[0, -1, candidate_ids] for ex in examples])
    labels = torch.tensor([ex["target"] for ex in examples])
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(alone, labels), rtol=1e-5, atol=1e-6)
    assert loss.dim() == 0 and not loss.requires_grad
    assert abs(float(loss) - 0.693) < 0.3  # near chance at initialisation


def test_label_word_loss_is_the_cross_entropy_over_mean_log_probs(default_task):
    """Label words take a shortcut (the shared log-normaliser cancels); it gives the general objective's value."""
    data, tokenizer = default_task
    model = build_tiny_opt(len(tokenizer), seed=1)
    batch = data.collate(data.train[:16])
    with torch.no_grad():
        loss = data.wrap_model(model)(**batch)
        scores = candidate_scores(model, **{k: v for k, v in batch.items() if k != "labels"})
    assert scores.shape == (16, 2) and bool((scores < 0).all())  # log-probabilities over the vocabulary
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(scores, batch["labels"]))


def test_evaluate_reports_accuracy_and_restores_train_mode(default_task):
    data, tokenizer = default_task
    model = build_tiny_opt(len(tokenizer), seed=0).train()
    metrics = data.evaluate(model, data.test[:100], batch_size=32, device="cpu")
    assert set(metrics) == {"accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0 and model.training

    # A model that always prefers " great" scores exactly the positive fraction.
    great = data.train[0]["cand_tokens"][1][0]
    with torch.no_grad():
        model.lm_head.weight[great] += 100.0 * model.lm_head.weight.abs().max()
    model.model.decoder.final_layer_norm.bias.data.fill_(1.0)
    model.model.decoder.final_layer_norm.weight.data.zero_()
    examples = data.test[:100]
    positive = sum(ex["target"] for ex in examples) / len(examples)
    assert data.evaluate(model, examples, batch_size=7, device="cpu")["accuracy"] == pytest.approx(positive)


def test_tiny_opt_is_a_function_of_the_seed():
    a, b, c = build_tiny_opt(57, seed=3), build_tiny_opt(57, seed=3), build_tiny_opt(57, seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.decoder.embed_tokens.weight, c.model.decoder.embed_tokens.weight)
    assert a.config.model_type == "opt" and a.lm_head.weight is a.model.decoder.embed_tokens.weight
