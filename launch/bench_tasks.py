"""Short real-size task runs of launch/train.py on one GPU: steps/s and peak memory, full ZO against LoRA.

    python launch/bench_tasks.py --out $OUT/tasks              # OPT-1.3B shape, fp16, batch 16, 200 steps
    python launch/bench_tasks.py --tiny --steps 3 --out /tmp/t # CPU smoke run (tests/test_bench.py)

The model is a random-init shape (zo2_ds.bench.models, saved with save_pretrained; no download), the
tokenizer the default task's word tokenizer, the data SST-2-layout jsonl written from the default task's
generated sentences. Each run is ``python launch/train.py --task sst2`` in its own process, without and
with ``--peft lora`` (MeZO's settings: lr 1e-6 / eps 1e-3, LoRA lr 1e-4 / eps 1e-2). Reported per run:
steps/s over the training loop, torch's peak allocated memory, and the peak NVML used memory sampled
while it ran (CUDA context included), to <out>/tasks.json and a table. Accuracy means nothing here.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RUNS = {"none": {"lr": 1e-6, "eps": 1e-3}, "lora": {"lr": 1e-4, "eps": 1e-2}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="opt-1.3b", help="a zo2_ds.bench.models shape")
    p.add_argument("--tiny", action="store_true", help="the 'tiny' shape on the CPU (smoke test)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--out", default="runs/bench_tasks", help="where tasks.json goes")
    p.add_argument("--work_dir", default=None, help="model, data and runs (default: <out>/work)")
    p.add_argument("--prepare_only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.tiny:
        args.model = "tiny"
    return args


def prepare(work: Path, model_name: str) -> None:
    """Model + tokenizer (save_pretrained) and sst2 train/validation jsonl under ``work``."""
    import torch

    from zo2_ds.bench import SHAPES, build_model
    from zo2_ds.tasks import SENTIMENT, build_word_tokenizer

    tokenizer = build_word_tokenizer(SENTIMENT.vocabulary)
    if len(tokenizer) > SHAPES[model_name].vocab_size:
        raise ValueError(f"--model: {model_name}'s vocabulary is smaller than the tokenizer's {len(tokenizer)}")
    cuda = torch.cuda.is_available()
    model = build_model(model_name, "cuda" if cuda else "cpu", torch.float16 if cuda else torch.float32)
    model.save_pretrained(work / "model")
    tokenizer.save_pretrained(work / "model")
    generated = SENTIMENT.generate(0)  # {"train", "dev", "test"}: rows of {"sentence", "label"}
    for split, rows in (("train", generated["train"][:1000]), ("validation", generated["dev"][:200])):
        path = work / "data" / "sst2" / f"{split}.jsonl"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def run_one(work: Path, peft: str, args: argparse.Namespace, cuda: bool) -> dict:
    from zo2_ds.bench.driver import engine_config
    from zo2_ds.bench.measure import NvmlPeak

    settings = RUNS[peft]
    dtype = "fp16" if cuda else "fp32"
    config = engine_config(args.batch_size, dtype, lr=settings["lr"], eps=settings["eps"])
    config["steps_per_print"] = 10**6
    config_path = work / f"ds_{peft}.json"
    config_path.write_text(json.dumps(config))
    out = work / f"run_{peft}"
    cmd = [sys.executable, str(REPO / "launch" / "train.py"), "--no_progress", "--task", "sst2"]
    cmd += ["--model_name_or_path", str(work / "model"), "--data_dir", str(work / "data"), "--dtype", dtype]
    cmd += ["--deepspeed_config", str(config_path), "--output_dir", str(out), "--max_steps", str(args.steps)]
    cmd += ["--eval_every", "0", "--log_every", str(max(1, args.steps // 10)), "--max_eval_examples", "64"]
    cmd += ["--eval_batch_size", str(args.batch_size), "--no_hf_save", "--no-save_best"]
    cmd += ["--peft", peft] if peft != "none" else []
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
        **settings,
        "steps": metrics["steps"],
        "steps_per_second": metrics["steps_per_second"],
        "train_seconds": metrics["seconds"],
        "wall_seconds": time.perf_counter() - started,
        "num_trainable_parameters": metrics["num_trainable_parameters"],
        "train_loss_first": metrics.get("train_loss_first"),
        "train_loss_last": metrics.get("train_loss_last"),
        "peak_allocated_bytes": metrics.get("peak_gpu_memory_allocated_bytes"),
        "nvml_peak_used_bytes": nvml.peak_bytes,
        "nvml_baseline_used_bytes": nvml.baseline_bytes,
        "nvml_source": nvml.source,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    out = Path(args.out)
    work = Path(args.work_dir) if args.work_dir else out / "work"
    work.mkdir(parents=True, exist_ok=True)
    if args.prepare_only:
        prepare(work, args.model)
        return 0
    # Prepare in its own process, so that this one holds no CUDA context while NVML samples the runs.
    prep = [sys.executable, __file__, "--prepare_only", "--work_dir", str(work), "--model", args.model]
    subprocess.run(prep, check=True)
    import torch

    from zo2_ds.bench import report

    cuda = torch.cuda.is_available()
    runs = [run_one(work, peft, args, cuda) for peft in RUNS]
    result = {"env": report.environment(), "args": vars(args), "task": "sst2 layout (generated sentences)"}
    result.update(model=f"{args.model} shape, random init", dtype="fp16" if cuda else "fp32", runs=runs)
    report.write_json(out / "tasks.json", result)
    where = f"{result['model']} on {result['env']['card']}, {result['dtype']}"
    print(f"{where}, batch {args.batch_size}, {args.steps} steps")
    columns = "peft num_trainable_parameters:,d steps_per_second:.2f peak_allocated_bytes:gib "
    columns += "nvml_peak_used_bytes:gib train_loss_first:.4f train_loss_last:.4f"
    print(report.format_table(runs, columns))
    print(f"wrote {out / 'tasks.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
