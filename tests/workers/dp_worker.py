"""One rank of the data-parallel test; started by the real `deepspeed` launcher (see tests/test_dp.py).

    deepspeed --num_gpus 2 tests/workers/dp_worker.py --out DIR --steps 3 --global-batch 4

Every rank trains the same tiny model on its shard of each global batch and saves what it ends with.
"""

import argparse
import os

import torch

import zo2_ds
from zo2_ds.testing import ds_config, tiny_causal_lm


def global_batches(steps: int, global_batch: int, seq: int = 12, vocab: int = 96) -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(2024)
    return [torch.randint(0, vocab, (global_batch, seq), generator=gen) for _ in range(steps)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--global-batch", type=int, default=4)
    parser.add_argument("--local_rank", type=int, default=0)  # appended by the deepspeed launcher
    args = parser.parse_args()

    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    micro = args.global_batch // world
    config = ds_config(micro_batch=micro, lr=5e-3, zo2={"seed": 3, "num_perturbations": 2})
    # Rank 1 starts from a different init on purpose: DeepSpeed's broadcast from rank 0 must fix it.
    engine, *_ = zo2_ds.initialize(model=tiny_causal_lm("opt", seed=rank), config=config)
    engine.train()
    losses, gs = [], []
    for ids in global_batches(args.steps, args.global_batch):
        shard = ids[rank * micro : (rank + 1) * micro]
        out = engine(input_ids=shard, labels=shard)
        engine.backward(out.loss)
        engine.step()
        losses.append(out.loss.item())
        gs.append(engine.last_projected_grad)
    state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
    torch.save({"params": state, "losses": losses, "g": gs, "world": world}, os.path.join(args.out, f"rank{rank}.pt"))


if __name__ == "__main__":
    main()
    # As launch/train.py: gloo can abort an exit without it. Not in main(): test_dp calls main() inside pytest.
    torch.distributed.destroy_process_group()
