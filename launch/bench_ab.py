"""A/B of two source trees of zo2_ds on one card: the in-GPU and offloaded steps, alternately, ABAB.

    python launch/bench_ab.py --a .ab_old --b . --out $OUT/ab           # OPT-1.3B, 6.7B, 13B (estimated 6-8 min, H200)
    python launch/bench_ab.py --a .ab_old --b . --out $OUT/ab --quick   # OPT-1.3B and 6.7B, fewer steps
    python launch/bench_ab.py --a .ab_old --b . --tiny --out /tmp/ab    # CPU smoke run

Each tree is a checkout (or an exported tree) holding a ``zo2_ds`` package. Round by round, per model,
tree A then tree B each run ``launch/bench_offload.py --no-floor`` (fp16 on CUDA; the in-GPU step, then the
offloaded step with every block streamed; both batch shapes) in a process of its own, with PYTHONPATH
pointing at that tree. The bench code is this checkout's for both: its ``zo2_ds/bench`` is overlaid on
each tree (a staging folder of links, under --work), and it drives the engine through the public API only.
Per-process JSON and logs go to --out, with ``ab.json`` (every median, and B / A) and a printed table.
A process that would not finish within --budget-s is skipped and recorded so.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FULL = {"models": "opt-1.3b,opt-6.7b,opt-13b", "batches": "1x2048,16x256", "steps": 10, "warmup": 3}
QUICK = {"models": "opt-1.3b,opt-6.7b", "batches": "1x2048,16x256", "steps": 6, "warmup": 2}
TINY = {"models": "tiny", "batches": "2x16", "steps": 2, "warmup": 1}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--a", required=True, type=Path, help="source tree A (holds zo2_ds/), e.g. .ab_old")
    p.add_argument("--b", required=True, type=Path, help="source tree B, e.g. .")
    p.add_argument("--out", type=Path, default=Path(os.environ.get("OUT", "runs/ab")), help="results folder")
    p.add_argument("--work", type=Path, default=Path("/tmp/zo2_ds_ab"), help="staging folder for the overlays")
    p.add_argument("--quick", action="store_true", help=f"defaults {QUICK}")
    p.add_argument("--tiny", action="store_true", help=f"CPU smoke run: {TINY}")
    p.add_argument("--models", default=None, help=f"comma list (default {FULL['models']})")
    p.add_argument("--batches", default=None, help=f"default {FULL['batches']}")
    p.add_argument("--steps", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--rounds", type=int, default=2, help="ABAB is 2 rounds")
    p.add_argument("--budget-s", type=float, default=560.0, help="stop starting processes past this")
    args = p.parse_args(argv)
    preset = TINY if args.tiny else QUICK if args.quick else FULL
    for key, value in preset.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for tree in (args.a, args.b):
        if not (tree / "zo2_ds" / "__init__.py").is_file():
            p.error(f"--a/--b: {tree} holds no zo2_ds package")
    return args


_OVERLAID = ("bench", "dtypes.py")  # this checkout's, in both trees


def overlay(tree: Path, staging: Path) -> Path:
    """A folder whose ``zo2_ds`` is ``tree``'s, with this checkout's ``zo2_ds/bench`` and the one module it
    imports from outside itself, ``zo2_ds/dtypes.py``, in it (links only)."""
    package = staging / "zo2_ds"
    shutil.rmtree(package, ignore_errors=True)  # removes the links, never what they point to
    package.mkdir(parents=True)
    for entry in (tree / "zo2_ds").resolve().iterdir():
        if entry.name not in _OVERLAID + ("__pycache__",):
            (package / entry.name).symlink_to(entry)
    for name in _OVERLAID:
        (package / name).symlink_to(REPO / "zo2_ds" / name)
    return staging


def child_env(root: Path) -> dict[str, str]:
    """This environment with PYTHONPATH = ``root`` first, and no other entry that holds a zo2_ds."""
    keep = [e for e in os.environ.get("PYTHONPATH", "").split(os.pathsep) if e and not (Path(e) / "zo2_ds").exists()]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_PORT")}
    env["PYTHONPATH"] = os.pathsep.join([str(root), *keep])
    return env


def run_one(args: argparse.Namespace, root: Path, model: str, label: str, timeout_s: float) -> dict:
    """One process of launch/bench_offload.py; its JSON's records, or the error."""
    out_json = args.out / f"{model}_{label}.json"
    cmd = [sys.executable, str(REPO / "launch" / "bench_offload.py"), "--models", model, "--batches", args.batches]
    cmd += ["--steps", str(args.steps), "--warmup", str(args.warmup), "--no-floor", "--out", str(out_json)]
    started = time.perf_counter()
    with open(args.out / f"{model}_{label}.log", "w") as log:
        try:
            proc = subprocess.run(cmd, env=child_env(root), stdout=log, stderr=subprocess.STDOUT, timeout=timeout_s)
            error = None if proc.returncode == 0 else f"exit {proc.returncode}"
        except subprocess.TimeoutExpired:
            error = f"timed out after {timeout_s:.0f} s"
    seconds = time.perf_counter() - started
    if error is not None or not out_json.is_file():
        return {"model": model, "label": label, "error": error or "no JSON", "seconds": seconds}
    result = json.loads(out_json.read_text())
    return {"model": model, "label": label, "seconds": seconds, "zo2_ds": result["env"]["zo2_ds_path"],
            "card": result["env"]["card"], "records": result["records"]}  # fmt: skip


def ratio_rows(runs: list[dict]) -> list[dict]:
    """Per model x batch x mode: each round's median step of A and B, and B / A of their medians."""
    cells: dict[tuple, dict[str, list[float]]] = {}
    for run in runs:
        tree = run["label"][0]
        for rec in run.get("records", []):
            if "median_ms" in rec:
                cells.setdefault((rec["model"], rec["batch"], rec["mode"]), {"A": [], "B": []})[tree].append(
                    rec["median_ms"]
                )
    rows = []
    for (model, batch, mode), by_tree in cells.items():
        a, b = by_tree["A"], by_tree["B"]
        ratio = statistics.median(b) / statistics.median(a) if a and b else None
        rows.append({"model": model, "batch": batch, "mode": mode, "a_ms": a, "b_ms": b, "b_over_a": ratio})
    return rows


def print_table(rows: list[dict], tolerance: float = 0.03) -> None:
    """The ratio table; "ok" where B is within ``tolerance`` of A (slower or faster)."""
    print("model | batch | mode | A ms (per round) | B ms (per round) | B / A | within 3%")
    print("--- | --- | --- | --- | --- | --- | ---")
    for r in rows:
        a = ", ".join(f"{x:.1f}" for x in r["a_ms"]) or "-"
        b = ", ".join(f"{x:.1f}" for x in r["b_ms"]) or "-"
        ratio, within = "-", "-"
        if r["b_over_a"] is not None:
            ratio, within = f"{r['b_over_a']:.3f}", "ok" if abs(r["b_over_a"] - 1) <= tolerance else "NO"
        print(f"{r['model']} | {r['batch']} | {r['mode']} | {a} | {b} | {ratio} | {within}")


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    roots = {"A": overlay(args.a, args.work / "A"), "B": overlay(args.b, args.work / "B")}
    started = time.perf_counter()
    result = {"args": {k: str(v) for k, v in vars(args).items()}, "trees": {"A": str(args.a.resolve()),
              "B": str(args.b.resolve())}, "runs": [], "skipped": []}  # fmt: skip
    longest_s: dict[str, float] = {}  # per model: its slowest process so far, to judge the budget
    for round_index in range(1, args.rounds + 1):  # round by round, so a short budget still pairs A and B
        for model in args.models.split(","):
            for tree in ("A", "B"):
                label = f"{tree}{round_index}"
                left_s = args.budget_s - (time.perf_counter() - started)
                if left_s < 1.2 * longest_s.get(model, 0.0) or left_s < 10:
                    result["skipped"].append(f"{model} {label}: {left_s:.0f} s left of the budget")
                    continue
                run = run_one(args, roots[tree], model, label, left_s)
                longest_s[model] = max(longest_s.get(model, 0.0), run["seconds"])
                result["runs"].append(run)
                print(f"[ab] {model} {label}: {run['seconds']:.0f} s {run.get('error', '')}", flush=True)
                result["ratios"] = ratio_rows(result["runs"])
                (args.out / "ab.json").write_text(json.dumps(result, indent=1) + "\n")
    print(f"\nA = {args.a}, B = {args.b}; {args.rounds} rounds, A then B, one process each")
    print_table(result.get("ratios", []))
    for line in result["skipped"]:
        print("skipped:", line)
    return result


if __name__ == "__main__":
    main()
