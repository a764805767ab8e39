"""zo2_ds.data: the default task, tokenizer, candidate scoring, batching, real-data loading, run records."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from zo2_ds.data import (
    CandidateScorer,
    RunRecorder,
    ShardedBatches,
    build_tiny_opt,
    build_word_tokenizer,
    job,
    load_classification_task,
    load_default_task,
)
from zo2_ds.data.sentiment import LABEL_WORDS, NEGATIVE, POSITIVE

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def default_task():
    return load_default_task(seed=0)


def _frame(text: str) -> str:
    """The sentence with its adjective blanked out."""
    return " ".join("_" if w in POSITIVE + NEGATIVE else w for w in text.split())


# -- tokenizer and default task ----------------------------------------------------------------------
def test_word_tokenizer_is_deterministic_and_prepends_bos():
    a = build_word_tokenizer(["The", "movie", "was", "great", "."])
    b = build_word_tokenizer([".", "great", "was", "movie", "the"])
    assert a.get_vocab() == b.get_vocab()
    ids = a("The movie was great.")["input_ids"]
    assert ids[0] == a.bos_token_id and a.unk_token_id not in ids
    assert a.decode(ids[1:]) == "the movie was great ."
    assert (a.pad_token_id, a.bos_token_id, a.eos_token_id) == (1, 2, 2)  # OPTConfig's defaults
    assert a("dreadful")["input_ids"][-1] == a.unk_token_id


def test_default_task_is_seeded_balanced_and_held_out(default_task):
    data, tokenizer = default_task
    again, _ = load_default_task(seed=0)
    assert [ex["input_ids"] for ex in data.train[:50]] == [ex["input_ids"] for ex in again.train[:50]]
    other, _ = load_default_task(seed=1)
    assert [ex["text"] for ex in data.test[:20]] != [ex["text"] for ex in other.test[:20]]
    assert data.task.name == "synthetic_sentiment" and data.task.metric == "accuracy"
    for split in (data.train, data.dev, data.test):
        labels = [ex["label"] for ex in split]
        assert labels.count(0) == labels.count(1) > 0
        assert all(tokenizer.unk_token_id not in ex["input_ids"] for ex in split)
    # Held out by frame: no test sentence, nor its frame, occurs in training.
    train_frames = {_frame(ex["text"]) for ex in data.train}
    assert not train_frames & {_frame(ex["text"]) for ex in data.test}
    assert not train_frames & {_frame(ex["text"]) for ex in data.dev}
    # The label is the adjective's polarity; the label words are one token each.
    for ex in data.test[:100]:
        adjective = next(w for w in ex["text"].split() if w in POSITIVE + NEGATIVE)
        assert ex["label"] == int(adjective in POSITIVE)
        assert ex["text"].endswith(" It was")
    ids = [tokenizer(w, add_special_tokens=False)["input_ids"] for w in LABEL_WORDS]
    assert [[i] for i in data.train[0]["candidate_ids"]] == ids


# -- collate and the candidate scorer ------------------------------------------------------------------
def test_collate_left_pads_so_the_answer_is_the_last_column(default_task):
    data, tokenizer = default_task
    examples = sorted(data.train[:40], key=lambda ex: len(ex["input_ids"]))[::13]
    batch = data.collate(examples)
    assert set(batch) == {"input_ids", "attention_mask", "candidate_ids", "labels"}
    assert bool(batch["attention_mask"][:, -1].all())
    for row, ex in enumerate(examples):
        n = len(ex["input_ids"])
        assert batch["input_ids"][row, -n:].tolist() == ex["input_ids"]
        assert bool((batch["input_ids"][row, :-n] == tokenizer.pad_token_id).all())
        assert int(batch["attention_mask"][row].sum()) == n


def test_scorer_loss_is_candidate_cross_entropy_and_padding_invariant(default_task):
    data, tokenizer = default_task
    model = build_tiny_opt(len(tokenizer), seed=0)
    scorer = data.wrap_model(model)
    assert isinstance(scorer, CandidateScorer) and scorer.model is model and data.wrap_model(scorer) is scorer
    assert {n for n, _ in scorer.named_parameters()} == {f"model.{n}" for n, _ in model.named_parameters()}
    examples = data.train[:8]
    batch = data.collate(examples)
    with torch.no_grad():
        loss = scorer(**batch)
        logits = scorer.candidate_logits(**batch)
        # Each example alone (no padding) gives the same candidate logits.
        for row, ex in enumerate(examples):
            ids = torch.tensor([ex["input_ids"]])
            full = model(input_ids=ids).logits[0, -1]
            torch.testing.assert_close(logits[row], full[ex["candidate_ids"]], rtol=1e-5, atol=1e-5)
    assert loss.dim() == 0 and not loss.requires_grad
    torch.testing.assert_close(loss, torch.nn.functional.cross_entropy(logits, batch["labels"]))
    assert abs(float(loss) - 0.693) < 0.3  # near chance at initialisation


def test_evaluate_reports_accuracy_and_restores_train_mode(default_task):
    data, tokenizer = default_task
    model = build_tiny_opt(len(tokenizer), seed=0).train()
    metrics = data.evaluate(model, data.test[:100], batch_size=32, device="cpu")
    assert set(metrics) == {"accuracy"} and 0.0 <= metrics["accuracy"] <= 1.0 and model.training

    # A model that always prefers " great" scores exactly the positive fraction.
    great = data.train[0]["candidate_ids"][1]
    with torch.no_grad():
        model.lm_head.weight[great] += 100.0 * model.lm_head.weight.abs().max()
    model.model.decoder.final_layer_norm.bias.data.fill_(1.0)
    model.model.decoder.final_layer_norm.weight.data.zero_()
    examples = data.test[:100]
    positive = sum(ex["label"] for ex in examples) / len(examples)
    assert data.evaluate(model, examples, batch_size=7, device="cpu")["accuracy"] == pytest.approx(positive)


def test_tiny_opt_is_a_function_of_the_seed():
    a, b, c = build_tiny_opt(57, seed=3), build_tiny_opt(57, seed=3), build_tiny_opt(57, seed=4)
    for (name, pa), pb in zip(a.named_parameters(), b.parameters()):
        assert torch.equal(pa, pb), name
    assert not torch.equal(a.model.decoder.embed_tokens.weight, c.model.decoder.embed_tokens.weight)
    assert a.config.model_type == "opt" and a.lm_head.weight is a.model.decoder.embed_tokens.weight


# -- batching ----------------------------------------------------------------------------------------
def test_sharded_batches_are_disjoint_ordered_and_resumable():
    n, micro, world = 103, 4, 3
    shards = [
        ShardedBatches(num_examples=n, micro_batch_size=micro, world_size=world, rank=r, seed=7) for r in range(3)
    ]
    streams = [s.iterate() for s in shards]
    per_epoch = shards[0].batches_per_epoch
    assert per_epoch == n // (micro * world)
    seen: list[int] = []
    for k in range(per_epoch):
        batch = [next(s) for s in streams]
        assert all(len(b) == micro for b in batch)
        assert len(set().union(*map(set, batch))) == micro * world  # disjoint shards of one global batch
        assert [shards[r].indices(k) for r in range(world)] == batch
        seen += [i for b in batch for i in b]
    assert len(set(seen)) == len(seen)  # an epoch never repeats an example
    # Next epoch: a new order; resuming at any micro-step gives what an uninterrupted run gives.
    later = [next(streams[0]) for _ in range(per_epoch + 2)]
    assert later[0] != shards[0].indices(0)
    resumed = shards[0].iterate(start_micro_step=per_epoch + 1)
    assert [next(resumed) for _ in range(per_epoch + 1)] == later[1:]
    with pytest.raises(ValueError, match="fewer than one global batch"):
        ShardedBatches(num_examples=5, micro_batch_size=4, world_size=2)


# -- real datasets -------------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture()
def tokenizer():
    return build_word_tokenizer("a b c d e f g great terrible it was , .".split())


def test_classification_task_from_local_jsonl(tmp_path, tokenizer):
    rows = [{"sentence": f"a {'b' if i % 2 else 'c'} d", "label": i % 2, "extra": i} for i in range(40)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    dev = _write_jsonl(tmp_path / "dev.jsonl", rows[:6])
    data = load_classification_task(tokenizer, data_files=[f"train={train}", f"validation={dev}"], seed=0)
    assert len(data.dev) == 6 and len(data.train) + len(data.test) == 40
    ex = data.train[0]
    assert ex["text"].endswith(" It was") and ex["candidate_ids"] == [
        tokenizer.convert_tokens_to_ids(w) for w in ("terrible", "great")
    ]
    # Template over any column, string labels mapped by LABEL=WORD, a PATH meaning training data.
    rows = [{"text": "e f", "stars": "neg" if i % 2 else "pos"} for i in range(20)]
    only = _write_jsonl(tmp_path / "s.jsonl", rows)
    data = load_classification_task(
        tokenizer,
        data_files=[only],
        template="{text} , it was",
        label_column="stars",
        label_words=["neg= terrible", "pos= great"],
        max_eval_examples=3,
    )
    assert len(data.dev) == len(data.test) == 3 and len(data.train) == 14
    assert {ex["label"] for ex in data.train} == {0, 1}


def test_classification_task_from_csv_and_save_to_disk(tmp_path, tokenizer):
    import datasets

    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"a b,{i % 2}\n" for i in range(30)))
    assert len(load_classification_task(tokenizer, data_files=[str(tmp_path / "t.csv")]).train) == 24
    ds = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"sentence": ["a c"] * 20, "label": [0, 1] * 10}),
        test=datasets.Dataset.from_dict({"sentence": ["a d"] * 4, "label": [0, 1, -1, -1]}),  # -1: unlabelled
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    data = load_classification_task(tokenizer, dataset=str(tmp_path / "saved"), max_eval_examples=5)
    assert len(data.test) == 2 and len(data.dev) == 5 and len(data.train) == 15


def test_classification_task_errors_name_the_argument(tmp_path, tokenizer):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"sentence": "a", "label": 0}] * 10)
    with pytest.raises(ValueError, match="--data_files .*unsupported file type .txt"):
        load_classification_task(tokenizer, data_files=[str(tmp_path / "x.txt")])
    with pytest.raises(ValueError, match="--data_files .*no such file"):
        load_classification_task(tokenizer, data_files=[str(tmp_path / "missing.jsonl")])
    with pytest.raises(ValueError, match="--label_words: 'nope nope' .* 2 tokens"):
        load_classification_task(tokenizer, data_files=[train], label_words=[" great", "nope nope"])
    with pytest.raises(ValueError, match="--template .* names column 'title'"):
        load_classification_task(tokenizer, data_files=[train], template="{title} It was")
    with pytest.raises(ValueError, match="--label_column 'gold' is not a column"):
        load_classification_task(tokenizer, data_files=[train], label_column="gold")


# -- run records and job plumbing ------------------------------------------------------------------------
def test_run_recorder_writes_jsonl_and_metrics(tmp_path):
    rec = RunRecorder(tmp_path / "out")
    rec.log(10, train_loss=torch.tensor(0.5), lr=1e-3)
    rec.log(20, train_loss=float("nan"), lr=1e-3, eval_accuracy=0.75)
    rec.write_metrics({"steps": 20, "train_loss_last": float("inf")})
    lines = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 10, "train_loss": 0.5, "lr": 1e-3},
        {"step": 20, "train_loss": None, "lr": 1e-3, "eval_accuracy": 0.75},
    ]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"steps": 20, "train_loss_last": None}
    RunRecorder(tmp_path / "out", resume=True).log(30, train_loss=0.1)
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 3
    RunRecorder(tmp_path / "out").log(1, train_loss=0.1)  # a fresh run starts a fresh log
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 1
    RunRecorder(tmp_path / "off", enabled=False).log(1, train_loss=0.1)
    assert not (tmp_path / "off").exists()


def _args(**overrides) -> Namespace:
    base = dict(
        model_name_or_path=None,
        dtype="fp32",
        task=None,
        data_dir=None,
        dataset=None,
        dataset_config=None,
        data_files=None,
        template=None,
        label_words=None,
        text_column=None,
        label_column="label",
        max_train_examples=None,
        max_eval_examples=None,
        max_length=256,
        seed=0,
        max_steps=None,
        eval_every=None,
        log_every=None,
        eval_batch_size=64,
    )
    return Namespace(**{**base, **overrides})


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"task": "sst2"}, "--task / --dataset / --data_files need --model_name_or_path"),
        ({"model_name_or_path": "m"}, "--model_name_or_path needs data"),
        ({"model_name_or_path": "m", "task": "sst2", "dataset": "glue"}, "give --task or --dataset, not both"),
        ({"template": "{x}"}, "--template applies to a real model"),
        ({"max_steps": 0}, "--max_steps must be >= 1"),
    ],
)
def test_bad_arguments_are_named(overrides, message):
    with pytest.raises(ValueError, match=message):
        job.build_model_and_task(_args(**overrides))


def test_ds_config_resolution(tmp_path):
    config = job.resolve_ds_config(None, max_steps=123)
    assert config["zo2"]["enabled"] and config["scheduler"]["params"]["total_num_steps"] == 123
    assert "total_num_steps" not in job.DEFAULT_DS_CONFIG["scheduler"]["params"]  # the default is not mutated
    path = tmp_path / "c.json"
    path.write_text(json.dumps({"train_micro_batch_size_per_gpu": 2, "optimizer": {"type": "SGD", "params": {}}}))
    with pytest.raises(ValueError, match='set "zo2": {"enabled": true}'):
        job.resolve_ds_config(path, max_steps=10)
    with pytest.raises(ValueError, match="--deepspeed_config .*no such file"):
        job.resolve_ds_config(tmp_path / "nope.json", max_steps=10)


def test_ds_config_for_adapters_and_monitors(tmp_path):
    """--peft without a config takes MeZO's lr/eps for the adapter; an enabled monitor without an
    output_path writes into <output_dir>/monitor (where launch/plot.py looks)."""
    from zo2_ds.tasks import MEZO_ADAPTER_DEFAULTS

    for peft in ("lora", "prefix"):
        config = job.resolve_ds_config(None, max_steps=10, peft=peft)
        assert config["optimizer"]["params"]["lr"] == MEZO_ADAPTER_DEFAULTS[peft]["lr"]
        assert config["zo2"]["eps"] == MEZO_ADAPTER_DEFAULTS[peft]["eps"]
    path = tmp_path / "c.json"
    monitors = {"csv_monitor": {"enabled": True}, "tensorboard": {"enabled": True, "output_path": "tb"}}
    path.write_text(
        json.dumps({"optimizer": {"type": "SGD", "params": {"lr": 1.0}}, "zo2": {"enabled": True}, **monitors})
    )
    config = job.resolve_ds_config(path, max_steps=10, output_dir=tmp_path / "run")
    assert config["csv_monitor"]["output_path"] == str(tmp_path / "run" / "monitor")
    assert config["tensorboard"]["output_path"] == "tb"  # an explicit path is kept
    # The shipped adapter configs carry the same settings.
    for peft in ("lora", "prefix"):
        shipped = job.resolve_ds_config(REPO / "ds_configs" / f"zo2_{peft}.json", max_steps=10)
        assert shipped["optimizer"]["params"]["lr"] == MEZO_ADAPTER_DEFAULTS[peft]["lr"]
        assert shipped["zo2"]["eps"] == MEZO_ADAPTER_DEFAULTS[peft]["eps"]


def test_checkpoint_lookup_and_hf_copy(tmp_path, default_task):
    data, tokenizer = default_task
    assert not job.has_checkpoint(tmp_path) and not job.has_checkpoint(tmp_path, job.BEST_TAG)
    (tmp_path / "latest").write_text("global_step1")
    (tmp_path / job.BEST_TAG).mkdir()
    assert job.has_checkpoint(tmp_path) and job.has_checkpoint(tmp_path, "best")
    path = job.save_hf_copy(build_tiny_opt(len(tokenizer)), tmp_path / "best", data.tokenizer)
    assert path.endswith("model") and (tmp_path / "best" / "model" / "config.json").is_file()
    assert (tmp_path / "best" / "model" / "tokenizer.json").is_file()
