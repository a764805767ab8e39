"""Bad input to the main job: each mistake gets an error naming the flag, file, line or split, and the
cheap checks (arguments, DeepSpeed config) fail before a model is loaded. One test per case (issue 10)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_train import run_train

from zo2_ds import job
from zo2_ds.tasks import build_word_tokenizer, check_model_source, load_tokenizer

REPO = Path(__file__).resolve().parents[1]
WORDS = "a b c d e f g great terrible it was , .".split()


def _args(*argv: str):
    return job.check_args(job.build_parser().parse_args(list(argv)))


def _data(tmp_path: Path, *argv: str):
    """The launcher's data step (task from the flags, then load_task_data) on a word tokenizer."""
    args = _args("--model_name_or_path", "unused", *argv)
    return job.build_task_data(args, job.task_of(args), build_word_tokenizer(WORDS))


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _rows(n: int, **extra) -> list[dict]:
    return [{"sentence": f"a {'b' if i % 2 else 'c'} d", "label": i % 2, **extra} for i in range(n)]


def test_json_typo_fails_before_the_model_loads(tmp_path):
    bad = tmp_path / "typo.json"
    bad.write_text('{"train_micro_batch_size_per_gpu": 4, "zo2": {"enabled": true},}')
    proc = run_train(
        "--deepspeed_config", str(bad), "--model_name_or_path", str(tmp_path / "no_model"), "--task", "sst2"
    )
    assert proc.returncode != 0
    assert f"--deepspeed_config {str(bad)!r} is not valid JSON" in proc.stderr
    assert "no_model" not in proc.stderr  # the model path was never looked at


def test_deepspeed_sections_are_validated_up_front(tmp_path):
    path = tmp_path / "ds.json"
    path.write_text(json.dumps({"zo2": {"enabled": True}, "zero_optimization": {"stagee": 1}}))
    with pytest.raises(ValueError, match=r"(?s)not a valid DeepSpeed config: .*stagee"):
        job.resolve_ds_config(path, max_steps=10)


def test_missing_model_path_says_so(tmp_path):
    with pytest.raises(ValueError, match=r"--model_name_or_path '.*nope': no such folder"):
        load_tokenizer(tmp_path / "nope")
    check_model_source("facebook/opt-125m")  # a hub id is the hub's to judge


def test_empty_model_folder_names_what_is_missing(tmp_path):
    (tmp_path / "model").mkdir()
    with pytest.raises(ValueError, match=r"lacks config.json, a tokenizer .*, weights .*save_pretrained"):
        check_model_source(tmp_path / "model")


def test_empty_jsonl_names_the_file(tmp_path):
    empty = tmp_path / "train.jsonl"
    empty.write_text("\n")
    with pytest.raises(ValueError, match=f"split 'train' is empty: {empty} holds no rows"):
        _data(tmp_path, "--task", "sst2", "--data_files", str(empty))


def _sst2_with_validation(tmp_path: Path, validation_rows: list[dict]):
    """sst2 on a good train file and ``validation_rows``; returns the validation file's path."""
    train = _jsonl(tmp_path / "train.jsonl", _rows(20))
    validation = _jsonl(tmp_path / "validation.jsonl", validation_rows)
    return validation, lambda: _data(
        tmp_path, "--task", "sst2", "--data_files", f"train={train}", f"validation={validation}", "--num_dev", "4"
    )


def test_label_column_missing_in_one_split_names_the_split_file(tmp_path):
    validation, load = _sst2_with_validation(tmp_path, [{"sentence": "a b"}] * 4)
    with pytest.raises(ValueError, match=f"column 'label' missing from {validation}"):
        load()


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_text('{"sentence": "a", "label": 0}\n{"sentence": "b", "label": 1}\n{"sentence": "c", label: 1}\n')
    with pytest.raises(ValueError, match=f"{path}:3: not valid JSON"):
        _data(tmp_path, "--task", "sst2", "--data_files", str(path))


def test_too_few_rows_names_the_real_option(tmp_path):
    train = _jsonl(tmp_path / "train.jsonl", _rows(30))
    with pytest.raises(ValueError, match=r"lower num_dev \(--num_dev, or --max_eval_examples"):
        _data(tmp_path, "--task", "sst2", "--data_files", train)  # MeZO's 500 dev rows from 30
    data = _data(tmp_path, "--task", "sst2", "--data_files", train, "--num_train", "10", "--max_eval_examples", "5")
    assert (len(data.train), len(data.dev), len(data.test)) == (10, 5, 5)


def test_fp16_config_on_cpu_says_bf16_works():
    with pytest.raises(ValueError, match=r'"fp16" is enabled, .* on the CPU; use "bf16"'):
        job.resolve_ds_config(REPO / "ds_configs" / "zo2_fp16.json", max_steps=10)
    job.resolve_ds_config(REPO / "ds_configs" / "zo2_bf16.json", max_steps=10)


def test_lora_config_without_peft_is_refused():
    lora = REPO / "ds_configs" / "zo2_lora.json"
    with pytest.raises(ValueError, match=r"tuned for --peft lora .*full fine-tuning\): add --peft lora"):
        job.resolve_ds_config(lora, max_steps=10)
    with pytest.raises(ValueError, match=r"tuned for --peft lora .*--peft prefix"):
        job.resolve_ds_config(lora, max_steps=10, peft="prefix")
    assert "peft" not in job.resolve_ds_config(lora, max_steps=10, peft="lora")  # DeepSpeed never sees the key


def test_validation_labels_matching_no_label_word_are_an_error(tmp_path):
    validation, load = _sst2_with_validation(tmp_path, [{"sentence": "a b", "label": "pos"}] * 4)
    with pytest.raises(ValueError, match=rf"label 'pos' of row \d in {validation} is not among the label words"):
        load()


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--task", "sst2"], "task 'sst2' needs --model_name_or_path"),
        (["--model_name_or_path", "m"], "--model_name_or_path needs a task"),
        (["--data_files", "x.jsonl"], "--data_files without --task: give --task NAME"),
        (["--template", "{x}"], "--template defines a task over your data: add --dataset"),
        (["--task", "sst2", "--dataset", "glue", "--data_dir", "d"], "give one data source, not --dataset and"),
        (["--task", "nope"], "unknown task 'nope'; known tasks: boolq"),
        (["--max_steps", "0"], "--max_steps must be >= 1"),
        (["--text_column", "review"], r"--text_column was removed: .*--template '\{review\} It was'"),
        (["--checkpoint_tag", "best"], "add --resume"),
        (["--resume", "--overwrite_output_dir"], "--resume and --overwrite_output_dir exclude each other"),
        (["--save_steps", "-1"], "--save_steps must be >= 0"),
        (["--save_total_limit", "-2"], "--save_total_limit must be >= 0"),
        (["--task", "synthetic_sentiment", "--template", "{sentence} was"], "'synthetic_sentiment' needs --model_na"),
        (["--task", "sst2", "--model_name_or_path", "m", "--label_words", "neg= bad", "pos= good"], "here neg:bad"),
    ],
)
def test_bad_arguments_are_named(argv, message):
    with pytest.raises(ValueError, match=message):
        _args(*argv)
