"""The offloader's exact device budget and host memory, computed on the meta device (no memory, no copies).

The model is built on the meta device and in the training dtype (as DeepSpeed's fp16 / bf16 block casts
it); :func:`meta_store` lays its blocks out with the offloader's own layout rules
(:mod:`zo2_ds.offload.store`), with meta tensors where the store would pin host memory, and
:func:`offloader_parts` builds the real :class:`~zo2_ds.offload.OffloadRunner` on that store: its slot ring,
perturbation scratch and staging buffers are then meta tensors of exactly the sizes a training run
allocates, and :func:`zo2_ds.offload.trace.device_bytes` counts them as the runner does.

The plan itself is :func:`zo2_ds.offload.store.plan_store`, the same function ``build_store`` starts with:
the estimator keeps no second copy of the layout rules.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zo2_ds.config import ZO2Config
from zo2_ds.offload import pending as rules
from zo2_ds.offload.head import stream_rows, streamed_head
from zo2_ds.offload.partition import Partition
from zo2_ds.offload.runner import OffloadRunner
from zo2_ds.offload.store import ALIGN_BYTES, BlockStore, block_layout, plan_store
from zo2_ds.offload.trace import device_bytes
from zo2_ds.ops import Ops
from zo2_ds.perturb import ResidentRunner, trainable_params
from zo2_ds.vocab import z_group_rows

__all__ = ["META", "OffloadLayout", "meta_store", "offloader_parts", "in_gpu_scratch_bytes", "chunked_head_shape"]

META = torch.device("meta")


def meta_store(model: nn.Module, offload, partition_ranks: int = 1) -> BlockStore:
    """The :class:`BlockStore` that ``build_store(model, offload, ...)`` would make, with every home a meta
    tensor (nothing allocated, nothing copied, no host-memory check). ``offload``: the ``zo2.offload`` config;
    ``partition_ranks`` > 1: the store of a rank of a node of that many ranks sharing one copy of the masters
    (``zo2.offload.partition`` "node"): each streamed unit's home (and narrow copy) is the rank's shard, its slot
    the padded whole (:class:`~zo2_ds.offload.partition.Partition`'s rules, as ``build_store`` applies them)."""
    store, _ = plan_store(model, offload, META, partition_ranks)
    if partition_ranks > 1:  # every rank's shard is the same size: rank 0 stands for any
        store.partition = Partition(0, partition_ranks, None, ALIGN_BYTES)
    if store.narrow is not None:
        store.narrow.homes[:] = [
            _meta_bytes(store.home_nbytes(b, narrow=True)) if store.is_streamed(b) else None
            for b in range(store.num_blocks)
        ]
    for index, block_entries in enumerate(store.entries):
        home = _meta_bytes(store.home_nbytes(index))
        store.homes.append(home)
        store.host_pinned.append(store.is_streamed(index))
        # The parameters' views are of the whole unit (a shard holds no whole parameter).
        store.home_views.append([e.view(_meta_bytes(store.sizes[index])) for e in block_entries])
    return store


def _meta_bytes(nbytes: int) -> torch.Tensor:
    return torch.empty(nbytes, dtype=torch.uint8, device=META)


@dataclass(frozen=True)
class OffloadLayout:
    """What the offloader would hold, in bytes: on the device by part (``device_bytes``, the keys of
    ``OffloadRunner.device_bytes()``) and on the host (``host_pinned_bytes``: the pinned masters of the
    streamed blocks plus their ``transfer_dtype`` copies, this rank's shards of them when partitioned); and
    what one step moves over this rank's host link (the node's all-gather brings ``partition_ranks - 1`` times
    as much)."""

    device_bytes: dict[str, int]
    host_pinned_bytes: int
    host_masters_bytes: int  # the pinned masters alone (this rank's)
    host_narrow_bytes: int  # their transfer_dtype copies
    num_blocks: int
    num_units: int  # what streams: the blocks, or at granularity "layer" their large sub-modules
    granularity: str  # "block" or "layer", as resolved
    num_resident: int  # units kept on the device
    num_slots: int
    block_bytes: int  # the largest block's flat buffer
    unit_bytes: int  # the largest unit's (a slot)
    streamed_exact_bytes: int  # one upload of every streamed block as its master (this rank's shards)
    streamed_narrow_bytes: int  # ... as its transfer_dtype copy (= exact without one)
    write_back_interval: int
    partition_ranks: int  # ranks sharing one copy of the masters (1: replicated)
    head_bytes: int = 0  # a streamed head's pinned master, which crosses the link once per step


def offloader_parts(model: nn.Module, config: ZO2Config, on_cuda: bool, partition_ranks: int = 1) -> OffloadLayout:
    """The offloader's parts for ``model`` (built on the meta device) under the ``zo2`` ``config``, on one rank of
    a node whose ``partition_ranks`` ranks share one copy of the masters (1: replicated; see :func:`meta_store`).

    ``on_cuda``: count the budget as a CUDA run does (the fused multi-tensor kernels perturb the tied
    embedding / head into the block scratch, and ``write_back_interval`` "auto" is 4), else as a CPU run.
    """
    store = meta_store(model, config.offload, partition_ranks)
    params = trainable_params(model)
    # A streamed head (zo2.offload.stream_head) needs real memory to be built: counted here instead.
    fused = on_cuda and config.kernels != "torch"
    head = streamed_head(model, params, config.offload.stream_head, config.vocab_chunks, "cuda" if on_cuda else "cpu")
    resident_head = config.model_copy(update={"offload": config.offload.model_copy(update={"stream_head": False})})
    runner = OffloadRunner(model, params, store, resident_head, ops=Ops("torch"))
    try:
        # As OffloadRunner.device_bytes(), with the streams / kernels of the target instead of this machine's.
        outside = [tp for tp in runner.resident.params if head is None or tp.param is not head.param]
        shares = on_cuda and config.kernels in ("auto", "multi_tensor") and bool(outside)
        resident = sum(store.sizes[b] for b in store.resident)
        head_module = None if head is None else head.uses[0][0]

        def whole(mod: nn.Module) -> bool:
            return mod is not head_module and runner.resident.vocab.takes_whole(mod)

        parts = device_bytes(model, store.param_ids, META, runner.device_buffers(), resident, shares, whole)
        num_slots = runner.num_slots
    finally:
        runner.close()
    head_bytes = 0
    if head is not None:
        weight = head.param
        head_bytes = weight.numel() * weight.element_size()
        rows = stream_rows(1, weight.shape, weight.element_size(), z_group_rows(weight.shape[1]) if fused else 1)
        parts["outside_blocks"] -= head_bytes
        parts["head_chunks"] = 2 * rows * weight.shape[1] * weight.element_size()
    streamed = store.streamed
    masters = sum(store.home_nbytes(b) for b in streamed)
    narrow = sum(store.home_nbytes(b, narrow=True) for b in streamed) if store.narrow is not None else 0
    return OffloadLayout(
        device_bytes=parts,
        host_pinned_bytes=masters + narrow,
        host_masters_bytes=masters,
        host_narrow_bytes=narrow,
        num_blocks=len(store.blocks.blocks),
        num_units=store.num_blocks,
        granularity=store.granularity,
        num_resident=store.num_resident,
        num_slots=num_slots,
        block_bytes=max(block_layout(b)[1] for b in store.blocks.blocks),
        unit_bytes=max(store.sizes),
        streamed_exact_bytes=masters,
        streamed_narrow_bytes=narrow or masters,
        head_bytes=head_bytes,
        write_back_interval=rules.resolve_interval(config.offload.write_back_interval, on_cuda),
        partition_ranks=partition_ranks,
    )


def in_gpu_scratch_bytes(model: nn.Module, config: ZO2Config) -> int:
    """The in-GPU engine's perturbation scratch: the largest unit's trainable tensors in the multi-tensor
    layout (each at a 64-element boundary), the largest block's tensors in practice (a gathered embedding and a
    head in vocabulary chunks have no perturbed copy: zo2_ds/vocab.py)."""
    runner = ResidentRunner(model, trainable_params(model), config, Ops("torch"))
    try:
        return max(
            (
                sum(-(-tp.param.numel() // 64) * 64 * tp.param.element_size() for tp in u.tensors)
                for u in runner.units
                if runner.vocab.takes_whole(u.module)
            ),
            default=0,
        )
    finally:
        runner.close()


def chunked_head_shape(model: nn.Module, config: ZO2Config) -> tuple[int, int] | None:
    """(vocabulary, width) of the head whose loss the runner computes in vocabulary chunks (``zo2.vocab_chunks``,
    in training forwards with labels), or None where the whole head and its logits are computed."""
    runner = ResidentRunner(model, trainable_params(model), config, Ops("torch"))
    try:
        heads = runner.vocab.chunked_heads()
        return tuple(heads[0].weight.shape) if heads else None
    finally:
        runner.close()
