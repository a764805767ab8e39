"""zo2_ds.job, the launcher's support: tasks defined from the command line over local data, batching,
run records, the DeepSpeed config, the run's checkpoint settings and the HF copy. (Bad input: test_job_errors.py.)"""

from __future__ import annotations

import json
import sys
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from zo2_ds import job
from zo2_ds.job.checkpoints import publish_hf_folder
from zo2_ds.tasks import MEZO_ADAPTER_DEFAULTS, SENTIMENT, build_tiny_opt, build_word_tokenizer

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture()
def tokenizer():
    return build_word_tokenizer("a b c d e f g great terrible it was , .".split())


def _args(*argv: str):
    return job.check_args(job.build_parser().parse_args(["--model_name_or_path", "unused", *argv]))


def _data(tokenizer, *argv: str):
    args = _args(*argv)
    return job.build_task_data(args, job.task_of(args), tokenizer)


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# -- tasks from the command line ----------------------------------------------------------------------
def test_task_of_the_flags():
    assert job.task_of(job.check_args(job.build_parser().parse_args([]))) is SENTIMENT  # the default job
    task = job.task_of(_args("--task", "sst2", "--template", "{sentence} , it was", "--label_words", "bad", "good"))
    assert (task.name, task.template, dict(task.label_words)) == (
        "sst2",
        "{sentence} , it was",
        {"0": "bad", "1": "good"},
    )
    hub = job.task_of(_args("--dataset", "glue", "--dataset_config", "sst2", "--template", "{sentence} It was"))
    assert hub.hub == ("glue", "sst2") and hub.is_generation  # no label words: a generation task
    mine = job.task_of(
        _args("--task", "mine", "--data_files", "a.jsonl", "--template", "{x}", "--label_words", "n", "y")
    )
    assert mine.name == "mine" and mine.columns == ("x", "label")
    args = _args("--max_train_examples", "7", "--max_eval_examples", "3", "--task", "sst2")
    assert (args.num_train, args.num_dev, args.num_test, args.max_steps) == (7, 3, 3, job.DEFAULT_MAX_STEPS)


def test_custom_task_from_local_jsonl(tmp_path, tokenizer):
    rows = [{"sentence": f"a {'b' if i % 2 else 'c'} d", "label": i % 2, "extra": i} for i in range(40)]
    train = _write_jsonl(tmp_path / "train.jsonl", rows)
    dev = _write_jsonl(tmp_path / "dev.jsonl", rows[:6])
    words = ("--template", "{sentence} It was", "--label_words", "terrible", "great")
    data = _data(tokenizer, "--data_files", f"train={train}", f"validation={dev}", *words, "--num_dev", "4")
    assert (len(data.train), len(data.dev), len(data.test)) == (36, 4, 6)  # test: the validation file
    ex = data.train[0]
    assert ex["prompt"].endswith(" It was") and ex["cand_tokens"] == [
        [tokenizer.convert_tokens_to_ids(w)] for w in ("terrible", "great")
    ]
    # Template over any column, string labels mapped by LABEL:WORD, a PATH meaning training data.
    rows = [{"text": "e f", "stars": "neg" if i % 2 else "pos"} for i in range(20)]
    only = _write_jsonl(tmp_path / "s.jsonl", rows)
    data = _data(
        tokenizer,
        *("--data_files", only, "--template", "{text} , it was", "--label_column", "stars"),
        *("--label_words", "neg:terrible", "pos:great", "--num_train", "14", "--max_eval_examples", "3"),
    )
    assert (len(data.train), len(data.dev), len(data.test)) == (14, 3, 3)  # no eval split: test from train
    assert {ex["target"] for ex in data.train} == {0, 1}


def test_custom_task_from_csv_and_save_to_disk(tmp_path, tokenizer):
    import datasets

    (tmp_path / "t.csv").write_text("text,label\n" + "".join(f"a b,{i % 2}\n" for i in range(30)))
    words = ("--template", "{text} It was", "--label_words", "terrible", "great")
    sizes = ("--num_train", "20", "--num_dev", "6", "--num_test", "4")
    data = _data(tokenizer, "--data_files", str(tmp_path / "t.csv"), *words, *sizes)
    assert (len(data.train), len(data.dev), len(data.test)) == (20, 6, 4)
    ds = datasets.DatasetDict(
        train=datasets.Dataset.from_dict({"sentence": ["a c"] * 20, "label": [0, 1] * 10}),
        validation=datasets.Dataset.from_dict({"sentence": ["a d"] * 4, "label": [0, 1, 1, 0]}),
    )
    ds.save_to_disk(str(tmp_path / "saved"))
    data = _data(tokenizer, "--task", "sst2", "--dataset", str(tmp_path / "saved"), "--max_eval_examples", "5")
    assert (len(data.train), len(data.dev), len(data.test)) == (15, 5, 4)


# -- batching and run records --------------------------------------------------------------------------
def test_sharded_batches_are_disjoint_ordered_and_resumable():
    n, micro, world = 103, 4, 3
    shards = [
        job.ShardedBatches(num_examples=n, micro_batch_size=micro, world_size=world, rank=r, seed=7) for r in range(3)
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
        job.ShardedBatches(num_examples=5, micro_batch_size=4, world_size=2)


def test_run_recorder_writes_jsonl_and_metrics(tmp_path):
    rec = job.RunRecorder(tmp_path / "out")
    rec.log(10, train_loss=torch.tensor(0.5), lr=1e-3)
    rec.log(20, train_loss=float("nan"), lr=1e-3, eval_accuracy=0.75)
    rec.write_metrics({"steps": 20, "train_loss_last": float("inf")})
    lines = [json.loads(x) for x in (tmp_path / "out" / "log.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 10, "train_loss": 0.5, "lr": 1e-3},
        {"step": 20, "train_loss": None, "lr": 1e-3, "eval_accuracy": 0.75},
    ]
    assert json.loads((tmp_path / "out" / "metrics.json").read_text()) == {"steps": 20, "train_loss_last": None}
    job.RunRecorder(tmp_path / "out", resume=True).log(30, train_loss=0.1)
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 3
    job.RunRecorder(tmp_path / "out").log(1, train_loss=0.1)  # a fresh run starts a fresh log
    assert len((tmp_path / "out" / "log.jsonl").read_text().splitlines()) == 1
    job.RunRecorder(tmp_path / "off", enabled=False).log(1, train_loss=0.1)
    assert not (tmp_path / "off").exists()


# -- the DeepSpeed config --------------------------------------------------------------------------------
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
    path.write_text(json.dumps({"zo2": {"enabled": True, "epsilon": 1e-3}}))
    with pytest.raises(ValueError, match="zo2.epsilon: unknown key"):
        job.resolve_ds_config(path, max_steps=10)


def test_ds_config_for_adapters_and_monitors(tmp_path):
    """--peft without a config takes MeZO's lr/eps for the adapter; an enabled monitor without an
    output_path writes into <output_dir>/monitor (where launch/plot.py looks)."""
    for peft in ("lora", "prefix"):
        config = job.resolve_ds_config(None, max_steps=10, peft=peft)
        assert config["optimizer"]["params"]["lr"] == MEZO_ADAPTER_DEFAULTS[peft]["lr"]
        assert config["zo2"]["eps"] == MEZO_ADAPTER_DEFAULTS[peft]["eps"]
    path = tmp_path / "c.json"
    monitors = {"csv_monitor": {"enabled": True}, "tensorboard": {"enabled": True, "output_path": "tb"}}
    path.write_text(
        json.dumps(
            {
                "train_micro_batch_size_per_gpu": 2,
                "optimizer": {"type": "SGD", "params": {"lr": 1.0}},
                "zo2": {"enabled": True},
                **monitors,
            }
        )
    )
    config = job.resolve_ds_config(path, max_steps=10, output_dir=tmp_path / "run")
    assert config["csv_monitor"]["output_path"] == str(tmp_path / "run" / "monitor")
    assert config["tensorboard"]["output_path"] == "tb"  # an explicit path is kept
    # The shipped adapter configs carry the same settings.
    for peft in ("lora", "prefix"):
        shipped = job.resolve_ds_config(REPO / "ds_configs" / f"zo2_{peft}.json", max_steps=10, peft=peft)
        assert shipped["optimizer"]["params"]["lr"] == MEZO_ADAPTER_DEFAULTS[peft]["lr"]
        assert shipped["zo2"]["eps"] == MEZO_ADAPTER_DEFAULTS[peft]["eps"]


# -- checkpoints and the HF copy ---------------------------------------------------------------------------
def test_hf_copy_published_atomically_as_links(tmp_path):
    tokenizer = build_word_tokenizer(SENTIMENT.vocabulary)
    path = job.save_hf_copy(build_tiny_opt(len(tokenizer)), tmp_path / "checkpoint-5", tokenizer)
    assert path.endswith("model") and (tmp_path / "checkpoint-5" / "model" / "config.json").is_file()
    assert (tmp_path / "checkpoint-5" / "model" / "tokenizer.json").is_file()
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "stale.bin").write_text("from an older step")
    publish_hf_folder(tmp_path / "checkpoint-5" / "model", tmp_path / "model")
    names = sorted(p.name for p in (tmp_path / "model").iterdir())
    assert names == sorted(p.name for p in (tmp_path / "checkpoint-5" / "model").iterdir())  # stale.bin gone
    config = tmp_path / "model" / "config.json"
    assert config.stat().st_ino == (tmp_path / "checkpoint-5" / "model" / "config.json").stat().st_ino
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_run_info_holds_max_steps_only_when_the_schedule_depends_on_it():
    decay = job.resolve_ds_config(None, max_steps=40)
    assert job.run_info_of(40, decay) == {"scheduler": decay["scheduler"], "max_steps": 40}
    explicit = {"scheduler": {"type": "WarmupDecayLR", "params": {"total_num_steps": 50}}}
    assert job.run_info_of(40, explicit) == explicit
    assert job.run_info_of(40, {}) == {"scheduler": None}


def test_loss_window_mean_and_checkpointed_state():
    window = job.LossWindow(world_size=1)
    window.add(0.5)
    window.add(0.25)
    assert window.state() == [0.75, 2.0]
    resumed = job.LossWindow(world_size=1, saved=window.state())
    resumed.add(1.0)
    assert resumed.take() == pytest.approx(1.75 / 3) and resumed.state() == [0.0, 0.0]
    assert job.LossWindow(world_size=2, saved=[1.0, 1.0], rank=1).sums.tolist() == [0.0, 0.0]  # rank 0 carries it


class _Stopped:
    """What stop_exit_code reads of a GracefulStop that received a Ctrl-C."""

    reason = "SIGINT"

    def message(self, command: str) -> str:
        return f"stopped; to resume: {command}"


def test_stop_line_resumes_through_the_same_launcher(monkeypatch, capsys):
    monkeypatch.setenv("RANK", "0")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID", raising=False)
    monkeypatch.setattr(sys, "argv", ["launch/train.py", "--local_rank=1", "--output_dir", "o"])
    assert job.stop_exit_code(_Stopped(), Namespace(local_rank=1), world_size=2) == 130
    assert (
        capsys.readouterr().out
        == "stopped; to resume: deepspeed --num_gpus 2 launch/train.py --output_dir o --resume\n"
    )
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "run")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    job.stop_exit_code(_Stopped(), Namespace(local_rank=None), world_size=2)
    assert capsys.readouterr().out.startswith("stopped; to resume: torchrun --nproc_per_node 2 launch/train.py")
    monkeypatch.delenv("TORCHELASTIC_RUN_ID")
    monkeypatch.setattr(_Stopped, "reason", "SIGTERM")
    assert job.stop_exit_code(_Stopped(), Namespace(local_rank=None), world_size=1) == 0
    assert capsys.readouterr().out.startswith("stopped; to resume: python launch/train.py --output_dir o --resume")
    monkeypatch.setenv("RANK", "1")
    job.stop_exit_code(_Stopped(), Namespace(local_rank=None), world_size=2)
    assert capsys.readouterr().out == ""  # rank 0 says it
