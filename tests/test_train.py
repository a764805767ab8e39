"""launch/train.py end to end, each run in a fresh process (the job owns its process group).

Short runs of the main job (default task, resume, eval-only) and the real-loading path: a tiny OPT
and its tokenizer saved with save_pretrained, and jsonl files, loaded as a user's would be.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

from zo2_ds.testing import free_port

REPO = Path(__file__).resolve().parents[1]
TRAIN = REPO / "launch" / "train.py"


def run_train(*args: str, nproc: int = 1, cpu: bool = False, timeout: float = 120) -> subprocess.CompletedProcess:
    """``python launch/train.py ARGS`` as a lone process (it picks its own rendezvous port), or
    ``torchrun --nproc_per_node NPROC launch/train.py ARGS`` (gloo on CPU)."""
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    if cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the job then picks the CPU (gloo) whatever the machine has
    launcher = [sys.executable]
    if nproc > 1:
        launcher += ["-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--master_port", str(free_port())]
    return subprocess.run(
        [*launcher, str(TRAIN), "--no_progress", *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"train.py failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-5000:]}"


def read_log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_default_job_short_run_then_refused_resume_and_eval_only(tmp_path):
    out = tmp_path / "run"
    check(run_train("--output_dir", str(out), "--max_steps", "40", "--eval_every", "20", "--log_every", "10"))
    metrics = json.loads((out / "metrics.json").read_text())
    for key in (
        "train_loss_first",
        "train_loss_last",
        "eval_accuracy_before",
        "eval_accuracy_after",
        "steps",
        "seconds",
    ):
        assert key in metrics, key
    assert metrics["steps"] == 40 and metrics["task"] == "synthetic_sentiment"
    assert 0.3 < metrics["eval_accuracy_before"] < 0.7  # chance: the model starts untrained
    assert (out / "latest").read_text().strip() == "checkpoint-40"
    assert (out / "checkpoint-40" / "manifest.json").is_file()
    assert (out / "model" / "config.json").is_file() and (out / "best_model" / "config.json").is_file()
    log = read_log(out)
    assert [r["step"] for r in log] == [10, 20, 30, 40]
    assert all({"train_loss", "lr"} <= set(r) for r in log) and "eval_accuracy" in log[1]

    # The default schedule decays to 0 at --max_steps: a longer run from the checkpoint is refused...
    proc = run_train("--output_dir", str(out), "--max_steps", "50", "--resume")
    assert proc.returncode != 0 and "max_steps=40 (now 50)" in proc.stderr
    # ... and --eval_only --resume scores the checkpoint without training.
    check(run_train("--output_dir", str(out), "--eval_only", "--resume"))
    final = json.loads((out / "metrics.json").read_text())
    assert final["eval_only"] and final["steps"] == 40
    assert final["eval_accuracy"] == pytest.approx(metrics["eval_accuracy_after"])


def test_resume_continues_the_run(tmp_path):
    """A schedule of explicit length does not depend on --max_steps: a resumed run trains on from the
    checkpoint, with the first run's numbers kept and the log appended."""
    config = json.loads((REPO / "ds_configs" / "zo2.json").read_text())
    config["scheduler"]["params"]["total_num_steps"] = 50
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    common = ("--deepspeed_config", str(config_path), "--output_dir", str(out), "--log_every", "10")
    check(run_train(*common, "--max_steps", "40", "--eval_every", "0"))
    metrics = json.loads((out / "metrics.json").read_text())
    check(run_train(*common, "--max_steps", "50", "--resume"))
    resumed = json.loads((out / "metrics.json").read_text())
    assert resumed["steps"] == 50 and resumed["steps_this_run"] == 10
    assert resumed["eval_accuracy_before"] == metrics["eval_accuracy_before"]
    assert resumed["train_loss_first"] == metrics["train_loss_first"]
    assert [r["step"] for r in read_log(out)] == [10, 20, 30, 40, 50]
    assert read_log(out)[-1]["lr"] < read_log(out)[-2]["lr"]  # the same decay, continued


@pytest.fixture(scope="module")
def local_model_and_data(tmp_path_factory):
    """A tiny OPT with its tokenizer saved as a hub model would be, and jsonl train/validation files."""
    from zo2_ds.tasks import SENTIMENT, build_tiny_opt, build_word_tokenizer

    root = tmp_path_factory.mktemp("local")
    tokenizer = build_word_tokenizer(SENTIMENT.vocabulary)
    build_tiny_opt(len(tokenizer), seed=0).save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    rows = SENTIMENT.generate(0)

    def dump(name: str, split: list[dict]) -> str:
        path = root / name
        path.write_text("".join(json.dumps({"review": r["sentence"], **r}) + "\n" for r in split))
        return str(path)  # "sentence": the column MeZO's SST-2 reads

    return root / "model", dump("train.jsonl", rows["train"][:400]), dump("validation.jsonl", rows["dev"][:64])


def test_real_model_and_local_jsonl(tmp_path, local_model_and_data):
    model_dir, train, validation = local_model_and_data
    out = tmp_path / "real"
    check(
        run_train(
            "--model_name_or_path",
            str(model_dir),
            "--data_files",
            f"train={train}",
            f"validation={validation}",
            "--template",
            "{review} It was",
            "--label_words",
            "terrible",
            "great",
            "--max_eval_examples",
            "48",
            "--output_dir",
            str(out),
            "--max_steps",
            "20",
            "--eval_every",
            "10",
            "--log_every",
            "10",
            "--dtype",
            "fp32",
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 20 and metrics["task"] == "custom"
    assert (out / "latest").is_file() and [r["step"] for r in read_log(out)] == [10, 20]
    assert (out / "model" / "tokenizer.json").is_file()


def test_task_from_the_suite_on_local_files(tmp_path, local_model_and_data):
    """--task sst2: MeZO's SST-2 prompt and label words on local files."""
    model_dir, train, validation = local_model_and_data
    out = tmp_path / "sst2"
    check(
        run_train(
            "--model_name_or_path",
            str(model_dir),
            "--task",
            "sst2",
            "--data_files",
            f"train={train}",
            f"validation={validation}",
            "--max_train_examples",
            "200",
            "--max_eval_examples",
            "50",
            "--output_dir",
            str(out),
            "--max_steps",
            "10",
            "--eval_every",
            "5",
            "--log_every",
            "5",
        )
    )
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["task"] == "sst2" and metrics["steps"] == 10 and "eval_accuracy_after" in metrics


def test_bad_arguments_fail_with_a_message_naming_them(tmp_path, local_model_and_data):
    model_dir, train, _ = local_model_and_data
    proc = run_train(
        "--model_name_or_path",
        str(model_dir),
        "--task",
        "sst2",
        "--data_files",
        str(tmp_path / "x.txt"),
        "--output_dir",
        str(tmp_path / "o"),
    )
    assert proc.returncode != 0 and "--data_files" in proc.stderr and ".jsonl" in proc.stderr
    proc = run_train("--output_dir", str(tmp_path / "o"), "--resume")
    assert proc.returncode != 0 and "--resume: no checkpoint" in proc.stderr


@pytest.mark.slow
def test_two_ranks_match_one_rank_with_the_global_batch(tmp_path):
    """Each rank takes a disjoint half of the global batch and g is averaged over ranks, so 2 ranks x 8
    examples follow the trajectory of 1 rank x 16 (up to float summation order)."""
    base = (
        json.loads((REPO / "ds_configs" / "zo2.json").read_text())
        if (REPO / "ds_configs" / "zo2.json").is_file()
        else {"optimizer": {"type": "SGD", "params": {"lr": 1e-3}}, "zo2": {"enabled": True}}
    )
    logs = {}
    for nproc, micro in ((2, 8), (1, 16)):
        config = tmp_path / f"mb{micro}.json"
        config.write_text(json.dumps({**base, "train_micro_batch_size_per_gpu": micro, "steps_per_print": 10**6}))
        out = tmp_path / f"ranks{nproc}"
        check(
            run_train(
                "--deepspeed_config",
                str(config),
                "--output_dir",
                str(out),
                "--max_steps",
                "30",
                "--log_every",
                "10",
                "--eval_every",
                "0",
                nproc=nproc,
                cpu=True,
            )
        )
        logs[nproc] = read_log(out)
        assert json.loads((out / "metrics.json").read_text())["world_size"] == nproc
    assert [r["step"] for r in logs[2]] == [r["step"] for r in logs[1]] == [10, 20, 30]
    for two, one in zip(logs[2], logs[1]):
        assert two["train_loss"] == pytest.approx(one["train_loss"], rel=1e-4)


@pytest.mark.slow
def test_a_perturbation_group_of_two_ranks_matches_one_rank_bit_exactly(tmp_path):
    """zo2.perturbation_parallel 2 on 2 ranks: both take the same shard (engine.zo_data_rank) and split the
    passes, so the run's log equals one rank's, number for number."""
    base = json.loads((REPO / "ds_configs" / "zo2.json").read_text())
    logs = {}
    for nproc in (2, 1):
        zo2 = {**base["zo2"], "num_perturbations": 2, "perturbation_parallel": nproc}
        config = tmp_path / f"pp{nproc}.json"
        config.write_text(
            json.dumps({**base, "zo2": zo2, "train_micro_batch_size_per_gpu": 8, "steps_per_print": 10**6})
        )
        out = tmp_path / f"pp{nproc}"
        args = ["--deepspeed_config", str(config), "--output_dir", str(out), "--max_steps", "20", "--log_every", "10"]
        check(run_train(*args, "--eval_every", "0", nproc=nproc, cpu=True))
        logs[nproc] = [
            {k: v for k, v in r.items() if k not in ("time_s", "elapsed_s", "seconds")} for r in read_log(out)
        ]
    assert [r["step"] for r in logs[2]] == [10, 20]
    assert [r["train_loss"] for r in logs[2]] == [r["train_loss"] for r in logs[1]]


# -- runs that lose nothing (zo2_ds.checkpoint through the launcher) ------------------------------------------
# launch/train.py with a signal sent to itself right after optimizer step K: a stop at an exact step, so an
# interrupted run and its resumption can be compared bit for bit with an uninterrupted one.
_SIGNAL_AT_STEP = """
import os, runpy, signal, sys
import torch
if not torch.cuda.is_available():
    os.environ.setdefault("DS_ACCELERATOR", "cpu")
from zo2_ds.engine import ZOEngine
step_k, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
original = ZOEngine.step
def step(self, *args, **kwargs):
    original(self, *args, **kwargs)
    if self.global_steps == step_k and self.is_gradient_accumulation_boundary():
        os.kill(os.getpid(), sig)
ZOEngine.step = step
sys.argv = [sys.argv[3], *sys.argv[4:]]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

SHORT = ("--max_steps", "30", "--log_every", "5", "--eval_every", "10", "--save_steps", "10")


def run_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    env.update(extra)
    return env


def run_signalled(step: int, signal_name: str, *args: str) -> subprocess.CompletedProcess:
    """launch/train.py ARGS, sent ``signal_name`` (SIGINT, SIGKILL, ...) by itself right after step ``step``."""
    argv = [sys.executable, "-c", _SIGNAL_AT_STEP, str(step), signal_name, str(TRAIN), "--no_progress", *args]
    return subprocess.run(argv, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)


def weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "model" / "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("uninterrupted") / "run"
    check(run_train("--output_dir", str(out), *SHORT))
    return out


def assert_same_run(out: Path, reference: Path) -> None:
    assert (out / "log.jsonl").read_text() == (reference / "log.jsonl").read_text()
    mine, theirs = weights(out), weights(reference)
    assert mine.keys() == theirs.keys() and all(torch.equal(mine[k], theirs[k]) for k in mine)
    metrics, expected = (json.loads((p / "metrics.json").read_text()) for p in (out, reference))
    for key in ("eval_accuracy_before", "eval_accuracy_after", "eval_accuracy_best", "best_step", "train_loss_last"):
        assert metrics[key] == expected[key], key


@pytest.mark.slow
def test_ctrl_c_saves_and_says_how_to_resume_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = run_signalled(17, "SIGINT", "--output_dir", str(out), *SHORT)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr and "KeyboardInterrupt" not in proc.stderr
    line = [x for x in proc.stdout.splitlines() if x.startswith("stopped by SIGINT")]
    assert len(line) == 1 and line[0].endswith(f"--output_dir {out} {' '.join(SHORT)} --resume"), proc.stdout
    assert (out / "latest").read_text().strip() == "checkpoint-17" and not (out / "metrics.json").exists()
    resumed = run_train("--output_dir", str(out), *SHORT, "--resume")
    check(resumed)
    assert resumed.stderr.count("resuming from") == 1 and "checkpoint-17" in resumed.stderr
    assert_same_run(out, uninterrupted)
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-20", "checkpoint-30"]  # the best too


@pytest.mark.slow
def test_async_step_job_equals_the_synchronised_one_also_after_ctrl_c(tmp_path, uninterrupted):
    """zo2.async_step true (on CUDA the default): the loop reads each step's figures one step late, and
    waits for them only before a log record, an evaluation or a save. Log, weights and metrics are the
    synchronised run's, also when a Ctrl-C stop and a resume come in between."""
    from zo2_ds.job.ds_config import DEFAULT_DS_CONFIG

    config = json.loads(json.dumps(DEFAULT_DS_CONFIG))  # the default job's, its schedule's length from --max_steps
    config["zo2"]["async_step"] = True
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    args = ("--deepspeed_config", str(config_path), "--output_dir", str(out), *SHORT)
    proc = run_signalled(13, "SIGINT", *args)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert (out / "latest").read_text().strip() == "checkpoint-13"
    check(run_train(*args, "--resume"))
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_kill_9_mid_run_then_resume_is_bit_exact(tmp_path, uninterrupted):
    out = tmp_path / "run"
    proc = run_signalled(24, "SIGKILL", "--output_dir", str(out), *SHORT)
    assert proc.returncode == -9
    assert [r["step"] for r in read_log(out)] == [5, 10, 15, 20]  # step 25 was never logged
    check(run_train("--output_dir", str(out), *SHORT, "--resume"))  # from checkpoint-20
    assert_same_run(out, uninterrupted)


@pytest.mark.slow
def test_used_output_dir_is_refused_and_overwrite_replaces_it(tmp_path):
    out = tmp_path / "run"
    check(run_train("--output_dir", str(out), "--max_steps", "4", "--eval_every", "0"))
    proc = run_train("--output_dir", str(out), "--max_steps", "2", "--eval_every", "0")
    assert proc.returncode != 0 and "holds a previous run (checkpoint-4" in proc.stderr
    assert "pass --resume to continue it, or --overwrite_output_dir to replace it" in proc.stderr
    check(run_train("--output_dir", str(out), "--max_steps", "2", "--eval_every", "0", "--overwrite_output_dir"))
    assert json.loads((out / "metrics.json").read_text())["steps"] == 2
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2"]


def test_changed_max_steps_on_resume_is_refused_before_the_model_loads(tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out, ignore=shutil.ignore_patterns(".lock"))
    code = "import sys, runpy, zo2_ds.job as job\n"
    code += "job.build_model = lambda *a: sys.exit('the model was loaded')\n"
    code += "sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')\n"
    argv = [sys.executable, "-c", code, str(TRAIN), "--output_dir", str(out), *SHORT, "--max_steps", "40", "--resume"]
    proc = subprocess.run(argv, cwd=REPO, env=run_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "the model was loaded" not in proc.stderr
    assert "checkpoint-30 was saved by a run with" in proc.stderr and "max_steps=30 (now 40)" in proc.stderr
    assert "resume with the saved values, or start a new run" in proc.stderr


def test_damaged_latest_checkpoint_is_named(tmp_path, uninterrupted):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted, out, ignore=shutil.ignore_patterns(".lock"))
    states = out / "checkpoint-30" / "mp_rank_00_model_states.pt"
    data = bytearray(states.read_bytes())
    data[len(data) // 2] ^= 0xFF
    states.write_bytes(bytes(data))
    proc = run_train("--output_dir", str(out), *SHORT, "--resume")
    assert proc.returncode != 0 and str(states) in proc.stderr and "sha256" in proc.stderr
    assert "Other checkpoints there: checkpoint-20 (--checkpoint_tag)" in proc.stderr


@pytest.mark.slow
def test_second_job_into_a_directory_in_use_is_refused_and_sigterm_stops_gracefully(tmp_path):
    out = tmp_path / "run"
    args = ("--output_dir", str(out), "--max_steps", "100000", "--eval_every", "0", "--log_every", "1")
    first = subprocess.Popen(
        [sys.executable, str(TRAIN), "--no_progress", *args],
        cwd=REPO,
        env=run_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 100
        while not ((out / "log.jsonl").is_file() and (out / "log.jsonl").read_text()):
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()[1][-3000:]
            time.sleep(0.2)
        second = run_train(*args)
        assert (
            second.returncode != 0 and f"--output_dir {out} is in use by another job (pid {first.pid}" in second.stderr
        )
        first.send_signal(signal.SIGTERM)
        stdout, stderr = first.communicate(timeout=60)
    finally:
        first.kill()
    assert first.returncode == 0 and "Traceback" not in stderr
    assert "stopped by SIGTERM" in stdout and stdout.strip().endswith("--resume")
    step = int((out / "latest").read_text().strip().removeprefix("checkpoint-"))
    assert read_log(out)[-1]["step"] == step  # logged every step: the checkpoint is at the last step logged


def test_no_shm_leak_and_no_startup_noise_under_the_launchers_environment(tmp_path):
    """The deepspeed launcher sets LOCAL_SIZE (= the world size), which makes DeepSpeed create its shm buffer."""
    port = free_port()
    env = run_env(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1", MASTER_ADDR="127.0.0.1")
    env["MASTER_PORT"] = str(port)
    argv = [sys.executable, str(TRAIN), "--no_progress", "--output_dir", str(tmp_path / "run"), "--max_steps", "3"]
    buffers = f"/dev/shm/deepspeed_allreduce_buffer_{os.getuid()}_127.0.0.1_{port}_*"
    before = set(glob.glob(buffers))  # a killed run's buffer on the same port (SIGKILL cannot release it) is not ours
    proc = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    check(proc)
    assert not set(glob.glob(buffers)) - before
    output = proc.stdout + proc.stderr
    for noise in ("shm_comm_op built successfully", "before it has started", "`loss_type=None`"):
        assert noise not in output, noise


def test_a_run_that_only_skips_non_finite_steps_stops_without_saving(tmp_path):
    """An lr of 1e12 blows the weights up at the first step; every later loss is inf / NaN and skipped."""
    config = json.loads((REPO / "ds_configs" / "zo2.json").read_text())
    config["optimizer"]["params"]["lr"] = config["scheduler"]["params"]["warmup_max_lr"] = 1e12
    config["scheduler"]["params"]["warmup_num_steps"] = 1
    config_path = tmp_path / "ds.json"
    config_path.write_text(json.dumps(config))
    out = tmp_path / "run"
    proc = run_train("--deepspeed_config", str(config_path), "--output_dir", str(out), "--max_steps", "60")
    assert proc.returncode != 0 and "NonFiniteError: the last 20 steps" in proc.stderr
    assert "Stopping without saving" in proc.stderr
    assert not list(out.glob("checkpoint-*")) and not (out / "metrics.json").exists()


def test_offload_reads_a_safetensors_folder_straight_into_pinned_homes(tmp_path, local_model_and_data):
    """With zo2.offload on, --model_name_or_path of a safetensors folder goes through
    zo2_ds.offload.materialize; the run equals one from the same weights loaded the ordinary way
    (a pytorch_model.bin copy, which materialize does not read), log and final weights bit for bit."""
    import copy

    import torch
    from transformers import AutoModelForCausalLM

    from zo2_ds.job import DEFAULT_DS_CONFIG

    model_dir, train, validation = local_model_and_data
    bin_dir = tmp_path / "bin_model"  # the same folder with its weights as pytorch_model.bin
    bin_dir.mkdir()
    for path in model_dir.iterdir():
        if path.name != "model.safetensors":
            (bin_dir / path.name).write_bytes(path.read_bytes())
    state = AutoModelForCausalLM.from_pretrained(model_dir).state_dict()
    torch.save({k: v.clone() for k, v in state.items()}, bin_dir / "pytorch_model.bin")
    config = copy.deepcopy(DEFAULT_DS_CONFIG)
    config["zo2"]["offload"] = {"enabled": True}
    config_path = tmp_path / "offload.json"
    config_path.write_text(json.dumps(config))
    outs = {}
    for label, source in (("materialized", model_dir), ("ordinary", bin_dir)):
        outs[label] = out = tmp_path / label
        args = ["--model_name_or_path", str(source), "--deepspeed_config", str(config_path)]
        args += ["--data_files", f"train={train}", f"validation={validation}", "--template", "{review} It was"]
        args += ["--label_words", "terrible", "great", "--max_eval_examples", "32", "--output_dir", str(out)]
        proc = run_train(*args, "--max_steps", "12", "--eval_every", "0", "--log_every", "4", "--dtype", "fp32")
        check(proc)
        assert ("block by block into pinned host memory" in proc.stdout) == (label == "materialized"), proc.stdout
    assert read_log(outs["materialized"]) == read_log(outs["ordinary"])
    final = {k: AutoModelForCausalLM.from_pretrained(v / "model").state_dict() for k, v in outs.items()}
    assert final["materialized"].keys() == final["ordinary"].keys()
    for name, value in final["materialized"].items():
        assert torch.equal(value, final["ordinary"][name]), name


def partitioned_and_replicated(tmp_path: Path, *args: str, materialized: bool = False, **run: Any) -> dict[str, Path]:
    """``launch/train.py ARGS`` on 2 ranks twice, the default job's config with offload on and
    zo2.offload.partition "none", then "node": {partition: output dir}. Each run checked; ``materialized`` (a
    safetensors folder): a partitioned run says each rank reads its 1/2 shard, a replicated one does not."""
    import copy

    from zo2_ds.job import DEFAULT_DS_CONFIG

    outs = {}
    for partition in ("none", "node"):
        config = copy.deepcopy(DEFAULT_DS_CONFIG)
        config["zo2"]["offload"] = {"enabled": True, "partition": partition}
        config_path = tmp_path / f"{partition}.json"
        config_path.write_text(json.dumps(config))
        outs[partition] = out = tmp_path / partition
        proc = run_train("--deepspeed_config", str(config_path), "--output_dir", str(out), *args, nproc=2, **run)
        check(proc)
        if materialized:
            assert ("its 1/2 shard" in proc.stdout) == (partition == "node"), proc.stdout
    return outs


def assert_same_final_weights(outs: dict[str, Path], step: int) -> None:
    """The module states of DeepSpeed's checkpoint at ``step`` are equal, bit for bit, across the runs."""
    final = {}
    for label, out in outs.items():
        (states,) = glob.glob(str(out / f"checkpoint-{step}" / "**" / "mp_rank_00_model_states.pt"), recursive=True)
        final[label] = torch.load(states, weights_only=False)["module"]
    first, *others = final.values()
    for other in others:
        assert other.keys() == first.keys() and first
        for name, value in other.items():
            assert torch.equal(value, first[name]), name


@pytest.mark.slow
@pytest.mark.multiprocess
def test_two_ranks_partitioned_read_their_shards_and_equal_replicated(tmp_path, local_model_and_data):
    """2 ranks with zo2.offload.partition "node" and a safetensors folder: each rank materializes only its
    shards (train.py passes the partition); the run equals 2 replicated ranks: log, final weights in the
    DeepSpeed checkpoints, and the HF copy (gathered by both ranks, written by rank 0)."""
    model_dir, train, validation = local_model_and_data
    args = ["--model_name_or_path", str(model_dir)]
    args += ["--data_files", f"train={train}", f"validation={validation}", "--template", "{review} It was"]
    args += ["--label_words", "terrible", "great", "--max_eval_examples", "16"]
    args += ["--max_steps", "6", "--eval_every", "0", "--log_every", "2", "--dtype", "fp32"]
    outs = partitioned_and_replicated(tmp_path, *args, materialized=True, cpu=True, timeout=180)
    assert read_log(outs["node"]) == read_log(outs["none"])
    assert_same_final_weights(outs, 6)
    from safetensors.torch import load_file

    hf = {label: load_file(str(out / "checkpoint-6" / "model" / "model.safetensors")) for label, out in outs.items()}
    assert hf["node"].keys() == hf["none"].keys() and hf["node"]
    for name, value in hf["node"].items():
        assert torch.equal(value, hf["none"][name]), name


@pytest.mark.cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_cuda_two_gpus_train_partitioned_equals_replicated(tmp_path):
    """launch/train.py on 2 GPUs (NCCL): the loss window's all-reduce runs on the host (NCCL cannot reduce a CPU
    tensor: this run failed at its first log record before), and masters partitioned over the two GPUs
    (gathered over copy engines where they are peers) train as replicated ones: log and final weights."""
    args = ("--dtype", "fp32", "--max_steps", "6", "--eval_every", "0", "--log_every", "2")
    outs = partitioned_and_replicated(tmp_path, *args, timeout=300)
    log = read_log(outs["node"])
    assert [r["step"] for r in log] == [2, 4, 6] and all(math.isfinite(r["train_loss"]) for r in log)
    assert log == read_log(outs["none"])
    assert_same_final_weights(outs, 6)
