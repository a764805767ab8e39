"""Loading through `datasets` from local copies (jsonl, csv, parquet, save_to_disk), the hub names,
MeZO's sampling protocol, user tasks from a template, and the errors bad input gets."""

from __future__ import annotations

import logging

import datasets
import numpy as np
import pytest
from task_fixtures import task_rows, write_jsonl

from zo2_ds.tasks import load_task_data
from zo2_ds.tasks.data import mezo_sample

SIZES = dict(num_train=4, num_dev=2, num_test=3, seed=0)


def _prompts(data):
    return [[ex["prompt"] for ex in split] for split in (data.train, data.dev, data.test)]


def test_local_layouts_give_the_same_examples(tmp_path, tokenizer, task_data_dir):
    reference = _prompts(load_task_data("sst2", tokenizer, data_dir=task_data_dir, **SIZES))
    train, valid = (datasets.Dataset.from_list(task_rows("sst2", s)) for s in ("train", "validation"))

    csv_dir = tmp_path / "csv" / "sst2"  # data_dir/<task>/<split>.csv
    csv_dir.mkdir(parents=True)
    train.to_csv(str(csv_dir / "train.csv"))
    valid.to_csv(str(csv_dir / "validation.csv"))
    parquet_dir = tmp_path / "parquet"  # the hub's parquet export names, directly in data_dir
    parquet_dir.mkdir()
    train.to_parquet(str(parquet_dir / "train-00000-of-00001.parquet"))
    valid.to_parquet(str(parquet_dir / "validation-00000-of-00001.parquet"))
    disk_dir = tmp_path / "disk"
    datasets.DatasetDict({"train": train, "validation": valid}).save_to_disk(str(disk_dir))
    files = {
        "train": str(task_data_dir / "sst2" / "train.jsonl"),
        "validation": str(task_data_dir / "sst2/validation.jsonl"),
    }

    assert reference[0] and reference[2]
    for kwargs in (
        {"data_dir": tmp_path / "csv"},
        {"data_dir": parquet_dir},
        {"data_dir": disk_dir},
        {"data_files": files},
    ):
        assert _prompts(load_task_data("sst2", tokenizer, **kwargs, **SIZES)) == reference, kwargs


def test_data_dir_may_use_the_hub_config_name(tmp_path, tokenizer):
    for split in ("train", "validation"):
        write_jsonl(tmp_path / "wsc.fixed" / f"{split}.jsonl", task_rows("wsc", split))
    data = load_task_data("wsc", tokenizer, data_dir=tmp_path, **SIZES)
    assert len(data.train) == 4 and "In the previous sentence" in data.train[0]["prompt"]


def test_hub_names_are_passed_to_load_dataset(monkeypatch, tokenizer):
    calls = []

    def fake_load_dataset(path, name=None, **kwargs):
        calls.append((path, name))
        task = "wsc" if name == "wsc.fixed" else {"nyu-mll/glue": "sst2", "rajpurkar/squad": "squad"}.get(path, name)
        return datasets.DatasetDict(
            {s: datasets.Dataset.from_list(task_rows(task, s)) for s in ("train", "validation")}
        )

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    for task in ("sst2", "rte", "wsc", "squad"):
        load_task_data(task, tokenizer, **SIZES)
    expected = [("nyu-mll/glue", "sst2"), ("aps/super_glue", "rte"), ("aps/super_glue", "wsc.fixed")]
    assert calls == [*expected, ("rajpurkar/squad", None)]

    def offline(*args, **kwargs):
        raise ConnectionError("no network")

    monkeypatch.setattr(datasets, "load_dataset", offline)
    with pytest.raises(RuntimeError, match="pass data_dir"):
        load_task_data("rte", tokenizer, **SIZES)


def test_mezo_sampling_protocol():
    train, dev, test, from_train = mezo_sample(20, 10, num_train=5, num_dev=3, num_test=4, seed=3)
    # MeZO: numpy seeded with the seed, permutation of the train split, first num_train + num_dev
    # rows, the last num_dev of them are dev; the test set is a permutation of the eval split.
    np.random.seed(3)
    chosen = np.random.permutation(20)[:8].tolist()
    np.random.seed(3)
    expected_test = np.random.permutation(10)[:4].tolist()
    assert (train, dev, test, from_train) == (chosen[:5], chosen[5:], expected_test, False)
    assert mezo_sample(20, 10, num_train=5, num_dev=3, num_test=4, seed=4)[0] != train

    # A short train split keeps dev full and shrinks train; without an eval split the test set is
    # the next rows of the train permutation.
    train, dev, test, from_train = mezo_sample(10, None, num_train=6, num_dev=2, num_test=5, seed=0)
    assert (len(train), len(dev), len(test), from_train) == (6, 2, 2, True)
    assert len(set(train) | set(dev) | set(test)) == 10
    train, dev, _, _ = mezo_sample(5, 3, num_train=6, num_dev=2, num_test=None, seed=0)
    assert (len(train), len(dev)) == (3, 2)
    with pytest.raises(ValueError, match="lower num_dev"):
        mezo_sample(2, 3, num_train=6, num_dev=2, num_test=1, seed=0)


def test_seed_selects_examples(tokenizer, task_data_dir):
    a = _prompts(load_task_data("rte", tokenizer, data_dir=task_data_dir, **SIZES))
    b = _prompts(load_task_data("rte", tokenizer, data_dir=task_data_dir, **{**SIZES, "seed": 5}))
    assert a == _prompts(load_task_data("rte", tokenizer, data_dir=task_data_dir, **SIZES))
    assert a != b
    assert not set(a[0]) & set(a[1])  # train and dev are disjoint rows


def test_small_tasks_cap_num_dev(tmp_path, tokenizer, caplog):
    rows = [{"premise": f"p{i}", "hypothesis": f"h{i}", "label": i % 3} for i in range(120)]
    write_jsonl(tmp_path / "train.jsonl", rows)
    write_jsonl(tmp_path / "validation.jsonl", rows[:5])
    with caplog.at_level(logging.WARNING):
        data = load_task_data("cb", tokenizer, data_dir=tmp_path, num_train=10, num_dev=500, num_test=5)
    assert (len(data.train), len(data.dev)) == (10, 100)
    assert "capped to 100" in caplog.text


def test_user_tasks_from_files(tmp_path, tokenizer, opt_model):
    rows = [{"text": f"the {w} was here", "label": i % 2} for i, w in enumerate(["cat", "dog", "fish", "tree"] * 3)]
    train, valid = tmp_path / "train.csv", tmp_path / "valid.csv"
    datasets.Dataset.from_list(rows).to_csv(str(train))
    datasets.Dataset.from_list(rows[:4]).to_csv(str(valid))
    data = load_task_data(
        "my_reviews",
        tokenizer,
        data_files={"train": str(train), "validation": str(valid)},
        template="Review: {text} Sentiment:",
        label_words="0:terrible,1:great",
        num_train=6,
        num_dev=2,
        num_test=4,
    )
    assert data.task.name == "my_reviews" and len(data.test) == 4
    assert data.train[0]["prompt"].startswith("Review: the ") and data.train[0]["prompt"].endswith(" Sentiment:")
    assert data.train[0]["candidates"] == [" terrible", " great"]
    assert 0.0 <= data.evaluate(opt_model, data.test, batch_size=4)["accuracy"] <= 1.0

    # A generation task: no label words, answers in the "answer" column; one file only, so the
    # test set comes from the train rows that train and dev left over.
    qa = [{"question": f"where is the {w}", "answer": "in the tree"} for w in ["cat", "dog", "fish", "bird"] * 2]
    data = load_task_data(
        "my_qa",
        tokenizer,
        data_files=str(write_jsonl(tmp_path / "qa.jsonl", qa)),
        template="Question: {question}\nAnswer:",
        num_train=4,
        num_dev=2,
        num_test=10,
    )
    assert data.task.is_generation and len(data.test) == 2
    assert data.train[0]["candidates"] == [" in the tree\n"] and data.train[0]["answers"] == ["in the tree"]


def test_builtin_task_with_overridden_template(tokenizer, task_data_dir):
    data = load_task_data(
        "sst2",
        tokenizer,
        data_dir=task_data_dir,
        template="Review: {sentence} Sentiment:",
        label_words="bad,good",
        **SIZES,
    )
    assert data.train[0]["prompt"].startswith("Review: the ") and data.train[0]["candidates"] == [" bad", " good"]


# --- errors -------------------------------------------------------------------------------------


def test_unknown_task_lists_known_ones(tokenizer):
    with pytest.raises(ValueError, match=r"unknown task 'sst3'.*boolq, cb, copa, drop, multirc, record, rte, squad"):
        load_task_data("sst3", tokenizer)


def test_missing_column_names_column_and_file(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "train.jsonl", [{"text": "a cat", "label": 0}] * 4)
    with pytest.raises(ValueError, match=rf"column 'sentence' missing from {path}"):
        load_task_data("sst2", tokenizer, data_files={"train": str(path)}, num_train=1, num_dev=1, num_test=1)
    with pytest.raises(ValueError, match=rf"column 'review' missing from {path}"):
        load_task_data("mine", tokenizer, data_files=str(path), template="{review} It was", label_words="a,b")


def test_empty_split_is_an_error(tmp_path, tokenizer):
    train = write_jsonl(tmp_path / "train.jsonl", task_rows("sst2", "train"))
    (tmp_path / "validation.jsonl").write_text("")
    with pytest.raises(ValueError, match=r"split 'validation' is empty: .*validation.jsonl"):
        load_task_data("sst2", tokenizer, data_dir=tmp_path)
    header_only = tmp_path / "v.csv"
    header_only.write_text("sentence,label\n")
    with pytest.raises(ValueError, match="split 'validation' is empty"):
        load_task_data("sst2", tokenizer, data_files={"train": str(train), "validation": str(header_only)})


def test_label_not_among_label_words(tmp_path, tokenizer):
    rows = task_rows("sst2", "train")
    rows[3]["label"] = 7
    path = write_jsonl(tmp_path / "train.jsonl", rows)
    with pytest.raises(ValueError, match=r"label 7 of row 3 in .*train.jsonl is not among the label words"):
        load_task_data("sst2", tokenizer, data_files=str(path), num_train=8, num_dev=0, num_test=0)


def test_bad_sources(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="unsupported extension '.txt'"):
        (tmp_path / "a.txt").write_text("x")
        load_task_data("sst2", tokenizer, data_files=str(tmp_path / "a.txt"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_task_data("sst2", tokenizer, data_files=str(tmp_path / "missing.jsonl"))
    with pytest.raises(FileNotFoundError, match="no data for task 'sst2'"):
        load_task_data("sst2", tokenizer, data_dir=tmp_path)
    with pytest.raises(ValueError, match="no label words to replace"):
        load_task_data("squad", tokenizer, label_words="a,b", data_dir=tmp_path)
