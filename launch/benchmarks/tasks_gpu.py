"""Short real-size task runs of launch/train.py on one GPU: speed and peak memory, full ZO vs LoRA.

    OUT=results launch/benchmarks/run_tasks_gpu.sh                 # OPT-1.3B shape, fp16, 200 steps, two runs
    OUT=/tmp/o launch/benchmarks/run_tasks_gpu.sh --tiny --steps 3  # the CPU smoke test (tests/test_train_tasks.py)

The model is OPT-1.3B's shape with random weights (no download; built directly on the GPU, where
HF's init takes milliseconds, and saved with save_pretrained); the tokenizer is the default task's
word tokenizer built in-process; the data is SST-2-layout jsonl written from the default task's
generated sentences. Each run is ``python3 launch/train.py --task sst2`` in its own process (one
process: the deepspeed CLI is not needed), with and without ``--peft lora``. Reported per run:
steps/s over the training loop (no evaluation inside it), torch.cuda.max_memory_allocated from the
run, and the peak device memory NVML saw while it ran (sampled every 50 ms; includes the CUDA context),
to $OUT/tasks_gpu.json and as a table. Accuracy means nothing here (random weights).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
OPT_1_3B = dict(hidden_size=2048, num_hidden_layers=24, num_attention_heads=32, ffn_dim=8192, vocab_size=50272)
TINY = dict(hidden_size=16, num_hidden_layers=2, num_attention_heads=2, ffn_dim=32, vocab_size=128)
# MeZO's settings: full-parameter lr 1e-6 / eps 1e-3 (OPT-1.3B scale), LoRA lr 1e-4 / eps 1e-2.
RUNS = {"none": {"lr": 1e-6, "eps": 1e-3}, "lora": {"lr": 1e-4, "eps": 1e-2}}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tiny", action="store_true", help="a 2-layer, 16-wide OPT (CPU smoke test)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default=os.environ.get("OUT", "runs/tasks_gpu"), help="where tasks_gpu.json goes")
    p.add_argument("--work_dir", default=None, help="model, data and runs (default: <out>/work)")
    p.add_argument("--prepare_only", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def prepare(work: Path, tiny: bool) -> None:
    """Model + tokenizer (save_pretrained) and sst2 train/validation jsonl under ``work``."""
    import torch
    from transformers import OPTConfig, OPTForCausalLM

    sys.path.insert(0, str(REPO))
    from zo2_ds.data import build_word_tokenizer, load_default_task
    from zo2_ds.data.sentiment import default_task_words

    tokenizer = build_word_tokenizer(default_task_words())
    shape = TINY if tiny else OPT_1_3B
    assert len(tokenizer) <= shape["vocab_size"]
    config = OPTConfig(
        **shape,
        word_embed_proj_dim=shape["hidden_size"],
        max_position_embeddings=2048,
        dropout=0.0,
        attention_dropout=0.0,
    )
    cuda = torch.cuda.is_available()
    with torch.device("cuda" if cuda else "cpu"):  # on the GPU HF's init is fast: no need to skip it
        torch.manual_seed(0)
        model = OPTForCausalLM(config).to(torch.float16 if cuda else torch.float32)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    data, _ = load_default_task(seed=0)
    for split, examples in (("train", data.train[:1000]), ("validation", data.dev[:200])):
        rows = [{"sentence": ex["text"].removesuffix(" It was"), "label": ex["label"]} for ex in examples]
        path = work / "data" / "sst2" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


class NvmlPeak:
    """Peak used memory of GPU 0 (as NVML counts it: the whole device) sampled in a thread."""

    def __init__(self, interval_s: float = 0.05):
        self.interval_s, self.peak_bytes, self.source = interval_s, None, None
        self._stop = threading.Event()
        self._read = self._reader()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _reader(self):
        try:
            import pynvml

            pynvml.nvmlInit()
            handle = pynvml.nvmlDeviceGetHandleByIndex(0)
            self.source = "pynvml"
            return lambda: pynvml.nvmlDeviceGetMemoryInfo(handle).used
        except Exception:  # no pynvml or no GPU: fall back to nvidia-smi, else nothing
            pass
        try:
            cmd = ["nvidia-smi", "--query-gpu=memory.used", "--format=csv,noheader,nounits", "-i", "0"]
            subprocess.run(cmd, capture_output=True, check=True, timeout=10)
            self.source = "nvidia-smi"
            return lambda: int(subprocess.run(cmd, capture_output=True, text=True).stdout.split()[0]) * 2**20
        except Exception:
            return None

    def _run(self) -> None:
        while not self._stop.is_set():
            used = self._read()
            self.peak_bytes = used if self.peak_bytes is None else max(self.peak_bytes, used)
            self._stop.wait(self.interval_s)

    def __enter__(self):
        if self._read is not None:
            self.baseline_bytes = self._read()
            self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()


def run_one(work: Path, peft: str, args: argparse.Namespace, cuda: bool) -> dict:
    settings = RUNS[peft]
    config = {
        "train_micro_batch_size_per_gpu": args.batch_size,
        "gradient_accumulation_steps": 1,
        "steps_per_print": 10**6,
        "optimizer": {"type": "SGD", "params": {"lr": settings["lr"], "weight_decay": 0.0}},
        "zo2": {"enabled": True, "eps": settings["eps"], "seed": 0, "num_perturbations": 1},
    }
    if cuda:
        config["fp16"] = {"enabled": True}
    config_path = work / f"ds_{peft}.json"
    config_path.write_text(json.dumps(config))
    out = work / f"run_{peft}"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--no_progress", "--model_name_or_path"]
    cmd += [
        str(work / "model"),
        "--task",
        "sst2",
        "--data_dir",
        str(work / "data"),
        "--dtype",
        "fp16" if cuda else "fp32",
    ]
    cmd += ["--deepspeed_config", str(config_path), "--output_dir", str(out), "--max_steps", str(args.steps)]
    cmd += ["--eval_every", "0", "--log_every", str(max(1, args.steps // 10)), "--max_eval_examples", "64"]
    cmd += ["--eval_batch_size", str(args.batch_size), "--no_hf_save", "--no-save_best"]
    if peft != "none":
        cmd += ["--peft", peft]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("HF_DATASETS_OFFLINE", "1")
    started = time.perf_counter()
    with NvmlPeak() as nvml:
        proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"train.py failed for peft={peft} (exit {proc.returncode})")
    metrics = json.loads((out / "metrics.json").read_text())
    return {
        "peft": peft,
        "steps": metrics["steps"],
        "steps_per_second": metrics["steps_per_second"],
        "train_seconds": metrics["seconds"],
        "wall_seconds": time.perf_counter() - started,
        "num_trainable_parameters": metrics["num_trainable_parameters"],
        "train_loss_first": metrics.get("train_loss_first"),
        "train_loss_last": metrics.get("train_loss_last"),
        "peak_memory_allocated_bytes": metrics.get("peak_gpu_memory_allocated_bytes"),
        "nvml_peak_used_bytes": nvml.peak_bytes,
        "nvml_baseline_used_bytes": getattr(nvml, "baseline_bytes", None),
        "nvml_source": nvml.source,
        "lr": RUNS[peft]["lr"],
        "eps": RUNS[peft]["eps"],
    }


def _gib(value) -> str:
    return "-" if value is None else f"{value / 2**30:.2f}"


def main(argv=None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        prepare(work, args.tiny)
        return 0
    # Prepare in its own process, so this one never holds a CUDA context while NVML measures the runs.
    subprocess.run(
        [sys.executable, __file__, "--prepare_only", "--work_dir", str(work), *(["--tiny"] * args.tiny)], check=True
    )
    import torch

    cuda = torch.cuda.is_available()
    runs = [run_one(work, peft, args, cuda) for peft in RUNS]
    result = {
        "model": "opt-1.3b shape, random init" if not args.tiny else "tiny opt (2 layers, 16 wide)",
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "dtype": "fp16" if cuda else "fp32",
        "batch_size": args.batch_size,
        "task": "sst2 layout (generated sentences)",
        "runs": runs,
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "tasks_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"{result['model']} on {result['device']}, {result['dtype']}, batch {args.batch_size}, {args.steps} steps")
    print(
        f"{'peft':<6} {'trainable':>12} {'steps/s':>8} {'max_alloc GiB':>14} {'nvml peak GiB':>14} "
        f"{'loss 1st->last':>18}"
    )
    for r in runs:
        loss = f"{r['train_loss_first']:.4f}->{r['train_loss_last']:.4f}"
        print(
            f"{r['peft']:<6} {r['num_trainable_parameters']:>12,} {r['steps_per_second']:>8.2f} "
            f"{_gib(r['peak_memory_allocated_bytes']):>14} {_gib(r['nvml_peak_used_bytes']):>14} {loss:>18}"
        )
    print(f"wrote {out / 'tasks_gpu.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
