"""Where the time of one offloaded step goes: torch.profiler CPU/CUDA tables for an OPT shape (diagnostics).

DS_ACCELERATOR=cuda python launch/benchmarks/offload_probe.py opt-1.3b 1x2048
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "launch"))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import bench_offload as bo  # noqa: E402
import torch  # noqa: E402

name = sys.argv[1] if len(sys.argv) > 1 else "opt-1.3b"
b, s = (int(x) for x in (sys.argv[2] if len(sys.argv) > 2 else "1x2048").split("x"))
offload = sys.argv[3] != "off" if len(sys.argv) > 3 else True
model = bo.build_opt(name, torch.device("cuda"))
engine = bo._engine(model, {"enabled": offload}, b)
ids = torch.randint(0, 50272, (b, s), device="cuda")
batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
print("steps ms", [round(t, 1) for t in bo.time_zo_steps(engine, batch, 2, 3)])
from torch.profiler import ProfilerActivity, profile  # noqa: E402

with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
    bo.time_zo_steps(engine, batch, 0, 1)
print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=22, max_name_column_width=60))
print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=12, max_name_column_width=60))
