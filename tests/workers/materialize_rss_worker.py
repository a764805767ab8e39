"""Peak host RSS of one materialization, in a fresh process (see tests/test_materialize.py).

    python tests/workers/materialize_rss_worker.py --save DIR   # write the ~350 MB fp32 test model to DIR
    python tests/workers/materialize_rss_worker.py config fp32  # materialize it from its config
    python tests/workers/materialize_rss_worker.py DIR fp32     # ... from the checkpoint in DIR

    python tests/workers/materialize_rss_worker.py --ranks SOURCE DIR  # one of 2+ ranks (zo2_ds.testing.run_ranks):
        materialize SOURCE ("config" or a checkpoint folder) with this rank's partition and initialize a
        partitioned offloaded engine on it; writes DIR/rss{RANK}.json (with the bytes of the largest block)

Prints one JSON line: the RSS after the imports (baseline), the peak RSS (VmHWM) after materializing, and
the bytes of the model's parameters. The peak is reset after the imports where the kernel allows it.
"""

import json
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")

import torch  # noqa: E402
import transformers  # noqa: E402
from deepspeed.accelerator import get_accelerator  # noqa: E402

from zo2_ds.offload.materialize import materialize  # noqa: E402

# OPT with 12 blocks of 28 MB (fp32): about 350 MB in all, the blocks 97% of it.
SHAPE = {"hidden_size": 768, "ffn_dim": 3072, "num_hidden_layers": 12, "num_attention_heads": 12}


def config():
    return transformers.OPTConfig(**SHAPE, vocab_size=2000, max_position_embeddings=256, word_embed_proj_dim=768)


def status(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


def reset_peak():
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
    except OSError:
        pass


def partitioned_rank(source, out_dir):
    """materialize + initialize of one rank of a node sharing one copy of the masters (fp32, offload on)."""
    import zo2_ds
    from zo2_ds import hygiene
    from zo2_ds.config import parse_zo2_config
    from zo2_ds.offload.node import materialize_partition
    from zo2_ds.testing import ds_config

    hygiene.init_distributed()
    ds = ds_config(zo2={"offload": {"enabled": True, "granularity": "block", "partition": "node"}})
    partition = materialize_partition(parse_zo2_config(ds).offload, torch.device("cpu"))
    transformers.OPTForCausalLM  # noqa: B018
    torch.distributed.barrier()
    reset_peak()
    baseline = status("VmRSS")
    torch.manual_seed(0)  # from a config every rank draws the same numbers
    source = config() if source == "config" else source
    model = materialize(source, device="cpu", progress=False, partition=partition, granularity="block")
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())  # placeholders: shapes only
    block_bytes = max(sum(p.numel() * p.element_size() for p in b.parameters()) for b in model.model.decoder.layers)
    engine, *_ = zo2_ds.initialize(model=model, config=ds)
    assert engine.zo_offload_store.partition is not None
    out = {"baseline_bytes": baseline, "peak_bytes": status("VmHWM"), "model_bytes": model_bytes}
    out["block_bytes"] = block_bytes
    with open(os.path.join(out_dir, f"rss{os.environ['RANK']}.json"), "w") as f:
        json.dump(out, f)
    torch.distributed.destroy_process_group()  # as launch/train.py: gloo can abort an exit without it


def main():
    if sys.argv[1] == "--ranks":
        partitioned_rank(sys.argv[2], sys.argv[3])
        return
    if sys.argv[1] == "--save":
        torch.manual_seed(0)
        materialize(config(), device="cpu", progress=False).save_pretrained(sys.argv[2], max_shard_size="10GB")
        return
    source = config() if sys.argv[1] == "config" else sys.argv[1]
    get_accelerator()
    transformers.OPTForCausalLM  # noqa: B018  (the lazy import of the model's module, before the baseline)
    reset_peak()
    baseline = status("VmRSS")
    model = materialize(source, dtype=sys.argv[2], device="cpu", progress=False)
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"baseline_bytes": baseline, "peak_bytes": status("VmHWM"), "model_bytes": model_bytes}))


if __name__ == "__main__":
    main()
