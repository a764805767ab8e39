"""One rank that initialises DeepSpeed's comm on the CPU through zo2_ds.hygiene (or plainly, with --plain), does one
all-reduce, and then exits, fails (--fail) or hangs until it is killed (--hang). See tests/checkpoint/test_hygiene.py.

    python -m deepspeed.launcher.runner --num_gpus 2 tests/checkpoint/workers/shm_worker.py [--fail]
"""

import argparse
import os
import sys
import time

import torch


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--plain", action="store_true")
    p.add_argument("--fail", action="store_true")
    p.add_argument("--hang", action="store_true")
    p.add_argument("--local_rank", type=int, default=None)  # appended by the deepspeed launcher
    args = p.parse_args()
    import deepspeed

    from zo2_ds import hygiene

    if args.plain:
        deepspeed.init_distributed()
    else:
        hygiene.init_distributed()
    value = torch.ones(1)
    deepspeed.comm.all_reduce(value)
    shm = os.path.exists(hygiene.shm_buffer_path())
    sys.stdout.write(f"rank {deepspeed.comm.get_rank()} sum {value.item():g} shm {shm}\n")  # one write: whole line
    sys.stdout.flush()
    if args.hang:
        time.sleep(300)
    if args.fail and deepspeed.comm.get_rank() == 1:
        raise RuntimeError("rank 1 fails on purpose")
    deepspeed.comm.destroy_process_group()  # as launch/train.py: gloo can abort an exit without it


if __name__ == "__main__":
    main()
