"""Where each block's parameters live: one flat buffer per block, pinned on the host or resident on the device.

Built once, inside ``ZOEngine._configure_distributed_model`` (after DeepSpeed's fp16/bf16 cast, before
anything is moved to the device), by :func:`build_store`:

- every parameter of a block (trainable or frozen) gets a slice of its block's flat ``uint8`` buffer, at
  an offset aligned to :data:`ALIGN_BYTES`, so one block crosses the link as one large DMA and a slice on
  the GPU has the alignment of a normal allocation (cuBLAS / vectorised kernels see no difference);
- ``Parameter.data`` is re-pointed at its slice ("home"), block by block, so the original storage is
  freed as we go: host memory peaks at the model plus one block, never two copies of it. state_dict,
  checkpoints and load_state_dict then read and write the host masters directly;
- streamed blocks' homes are page-locked host memory (:func:`pinned_host_buffer`); the
  ``num_resident`` blocks of the budget (``zo2.offload.max_gpu_memory`` / ``num_resident_blocks``) live
  on the device for good;
- a streamed block whose parameters already live in one page-locked buffer of exactly this layout (what
  :func:`zo2_ds.offload.materialize.materialize` builds) is adopted as it is: no second buffer, no copy;
  partitioned, so is the shard of a unit ``materialize`` built with the same partition;
- everything that is not a block parameter (embeddings, final norm, head, all buffers) moves to the device.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from zo2_ds.dtypes import DTYPES
from zo2_ds.models import BlockList, find_blocks
from zo2_ds.offload.adopt import adopted_home
from zo2_ds.offload.hostmem import available_host_bytes, check_host_memory, pinned_host_buffer
from zo2_ds.offload.partition import Partition, build_shard
from zo2_ds.offload.resident import num_resident_units, parse_bytes
from zo2_ds.offload.units import block_order, stream_units

__all__ = [
    "ALIGN_BYTES",
    "BlockStore",
    "Narrow",
    "build_store",
    "block_layout",
    "flat_layout",
    "plan_store",
    "block_nbytes",
    "parse_bytes",
    "available_host_bytes",
]

ALIGN_BYTES = 256


@dataclass
class Entry:
    """One parameter's slice of its block's flat buffer."""

    param: nn.Parameter
    offset: int  # bytes
    nbytes: int
    dtype: torch.dtype
    shape: torch.Size

    def view(self, flat: torch.Tensor) -> torch.Tensor:
        return flat[self.offset : self.offset + self.nbytes].view(self.dtype).view(self.shape)


@dataclass
class Narrow:
    """A streamed block's copy in ``zo2.offload.transfer_dtype`` (its "shadow"): one flat pinned buffer per
    block, each parameter at ``offset`` in ``dtype`` (the transfer dtype for wider floating parameters,
    the parameter's own dtype otherwise)."""

    entries: list[list[Entry]]  # per block, parallel to BlockStore.entries
    sizes: list[int]  # flat bytes per block
    dtype: torch.dtype
    homes: list[torch.Tensor | None]  # per block: pinned host buffer (None for resident blocks)
    flat: list[bool]  # per block: element i of the copy is element i of the block's flat buffer (one dtype)


class BlockStore:
    """The streamed units (:mod:`zo2_ds.offload.units`), each unit's flat home buffer and its parameter slices.

    A unit is a whole block (``granularity`` "block") or one of a block's large sub-modules ("layer"). The
    offloader indexes everything by unit, and calls unit b "block b" throughout (they are the same thing at
    the default granularity of all but the largest models): ``num_blocks``, ``entries[b]``, ``homes[b]``.
    ``blocks`` is the model's block list, ``units`` the modules streamed, ``block_of[b]`` the block of unit b.
    """

    def __init__(
        self,
        blocks: BlockList,
        device: torch.device,
        entries: list[list[Entry]],
        sizes: list[int],
        num_resident: int,
        units: tuple[nn.Module, ...] | None = None,
        block_of: tuple[int, ...] | None = None,
        granularity: str = "block",
    ):
        self.blocks = blocks
        self.units = tuple(blocks.blocks) if units is None else units
        self.block_of = tuple(range(len(self.units))) if block_of is None else block_of
        self.granularity = granularity
        self.device = device
        self.entries = entries
        self.sizes = sizes  # flat bytes per block
        self.num_resident = num_resident
        # Resident blocks are spread evenly (0, N/k, 2N/k, ...), not bunched at one end: while the GPU
        # computes a resident block, the link keeps streaming the next streamed ones, so a budget of half
        # the model halves the transfer-bound step instead of only shortening its streamed part.
        n = len(sizes)
        self.resident = frozenset(i * n // num_resident for i in range(num_resident)) if num_resident else frozenset()
        self.homes: list[torch.Tensor] = []
        self.host_pinned: list[bool] = []  # per block: home is page-locked host memory
        self.home_views: list[list[torch.Tensor]] = []
        self.narrow: Narrow | None = None  # zo2.offload.transfer_dtype narrower than the masters
        # zo2.offload.partition "node": each streamed unit's home is this rank's shard of it (partition.py).
        self.partition: Partition | None = None

    @property
    def num_blocks(self) -> int:
        """The number of units (blocks, at granularity "block")."""
        return len(self.units)

    def is_streamed(self, index: int) -> bool:
        return index not in self.resident

    @property
    def streamed(self) -> list[int]:
        return [b for b in range(self.num_blocks) if b not in self.resident]

    @property
    def param_ids(self) -> set[int]:
        return {id(e.param) for block in self.entries for e in block}

    def streamed_bytes(self) -> int:
        return sum(self.sizes[b] for b in self.streamed)

    def home_nbytes(self, index: int, narrow: bool = False) -> int:
        """Bytes of unit ``index``'s home on this rank (``narrow``: of its transfer_dtype copy): its flat
        buffer, or this rank's shard of it."""
        size = self.narrow.sizes[index] if narrow else self.sizes[index]
        partitioned = self.partition is not None and self.is_streamed(index)
        return self.partition.shard_nbytes(size) if partitioned else size

    def slot_nbytes(self, index: int, narrow: bool = False) -> int:
        """Bytes of device buffer streamed unit ``index`` needs (``narrow``: for its transfer_dtype copy): its
        flat buffer (every shard, padded, when partitioned)."""
        size = self.narrow.sizes[index] if narrow else self.sizes[index]
        return size if self.partition is None else self.partition.padded_nbytes(size)

    def views(self, index: int, flat: torch.Tensor) -> list[torch.Tensor]:
        return [e.view(flat) for e in self.entries[index]]

    def whole_master(self, index: int) -> torch.Tensor:
        """Unit ``index``'s whole flat master: its home, or when partitioned a new one gathered from the node's
        shards on the device (a collective: every rank of the node calls it)."""
        if self.partition is None or not self.is_streamed(index):
            return self.homes[index]
        return self.partition.gather_whole(self.homes[index], self.sizes[index], self.device)

    def narrow_from_master(self, index: int, whole: torch.Tensor | None = None) -> torch.Tensor:
        """Remake streamed unit ``index``'s transfer_dtype copy (this rank's shard of it, when partitioned) from
        its master: ``whole``, the unit's whole flat buffer on any device, by default :meth:`whole_master`.
        Returns the whole narrow copy (the narrow home itself, unless partitioned)."""
        home = self.narrow.homes[index]
        whole = self.whole_master(index) if whole is None else whole
        if self.partition is None:
            narrow = home
        else:
            narrow = torch.zeros(self.slot_nbytes(index, narrow=True), dtype=torch.uint8, device=whole.device)
        for e, n in zip(self.entries[index], self.narrow.entries[index]):
            n.view(narrow).copy_(e.view(whole))
        if self.partition is not None:
            home.copy_(self.partition.own(narrow, self.narrow.sizes[index]))
        return narrow

    def point_params_home(self, index: int) -> None:
        for e, v in zip(self.entries[index], self.home_views[index]):
            e.param.data = v


def block_nbytes(block: nn.Module) -> int:
    """Bytes of ``block``'s flat home buffer (each distinct parameter at an ALIGN_BYTES boundary)."""
    return block_layout(block)[1]


def block_layout(block: nn.Module) -> tuple[list[tuple[nn.Parameter, int, int]], int]:
    """``block``'s flat home buffer (:func:`flat_layout` of its parameters in
    :func:`zo2_ds.offload.units.block_order`: its units' parameters first, unit by unit, so each unit is a
    contiguous, aligned part of it). Only shapes and dtypes are read: it also lays out a meta block."""
    return flat_layout(block_order(block))


def flat_layout(params) -> tuple[list[tuple[nn.Parameter, int, int]], int]:
    """A flat buffer for ``params``: ``(parameter, byte offset, bytes)`` for each distinct one, in order, each
    at an ALIGN_BYTES boundary, and the buffer's size in bytes (a multiple of ALIGN_BYTES)."""
    out, offset = [], 0
    seen: set[int] = set()
    for p in params:
        if id(p) in seen:
            continue
        seen.add(id(p))
        nbytes = p.numel() * p.element_size()
        out.append((p, offset, nbytes))
        offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return out, max(offset, ALIGN_BYTES)


def plan_store(model: nn.Module, cfg, device: torch.device, ranks_sharing: int = 1) -> tuple[BlockStore, list]:
    """The :class:`BlockStore` ``build_store`` makes for ``model``, planned but not filled: the units
    (:func:`zo2_ds.offload.units.stream_units`), each parameter's slice of its unit's home, which units stay
    resident, the ``transfer_dtype`` layout; no home allocated, nothing moved, no memory checked
    (``ranks_sharing``: the ranks of a partition, for the units "auto" picks). Also returns each unit's
    :func:`flat_layout`. ``zo2_ds.estimate`` plans with it on the meta device, so its
    figures follow the offloader's rules."""
    blocks = find_blocks(model, cfg.blocks_attr)
    block_sizes = [block_layout(b)[1] for b in blocks.blocks]
    granularity, units, block_of = stream_units(
        blocks.blocks,
        cfg.granularity,
        cuda_graphs=cfg.cuda_graphs,
        block_bytes=block_sizes,
        ranks_sharing=ranks_sharing,
    )
    if granularity == "block":
        layouts = [block_layout(b) for b in blocks.blocks]
    else:
        layouts = [flat_layout(u.parameters()) for u in units]
    sizes = [size for _, size in layouts]
    num_resident = num_resident_units(cfg, sizes, len(blocks.blocks))
    transfer = _transfer_dtype(cfg, layouts)
    entries = [[Entry(p, off, n, p.dtype, p.shape) for p, off, n in layout] for layout, _ in layouts]
    store = BlockStore(blocks, device, entries, sizes, num_resident, tuple(units), tuple(block_of), granularity)
    if transfer is not None:
        layouts_n = [_narrow_layout(block_entries, size, transfer) for block_entries, size in zip(entries, sizes)]
        store.narrow = Narrow(
            [e for e, _, _ in layouts_n],
            [size for _, size, _ in layouts_n],
            transfer,
            [None] * len(sizes),
            [flat for _, _, flat in layouts_n],
        )
    return store, layouts


def build_store(
    model: nn.Module, cfg, device: torch.device, move_rest: bool = True, partition: Partition | None = None
) -> BlockStore:
    """Find the blocks, give every block parameter its home slice, move the rest of the model to ``device``.

    ``cfg`` is the ``zo2.offload`` config; with a ``partition`` each streamed unit's home is this rank's shard
    of it (:mod:`~zo2_ds.offload.partition`; every rank must hold the same weights now). Raises ValueError
    for a model without a block list, a budget smaller than one block, or not enough host memory for the
    pinned masters (checked before allocating).
    """
    from deepspeed.accelerator import get_accelerator

    store, layouts = plan_store(model, cfg, device, partition.num_ranks if partition is not None else 1)
    store.partition = partition
    entries = store.entries

    # Adopted before the memory check: an adopted block needs no new host memory. A resident block's home is
    # on the device: a whole pinned one is freed, and unpinned, once copied there; one materialized as shards
    # (a partition) is gathered there from the node's shards.
    adopted = [adopted_home(store, b, layout, size) for b, (layout, size) in enumerate(layouts)]
    check_host_memory(store, {b for b, home in enumerate(adopted) if home is not None})

    acc = get_accelerator()
    was_on_device = any(e.param.device.type != "cpu" for block_entries in entries for e in block_entries)
    for index in range(store.num_blocks):
        _move_home(store, index, adopted[index], acc)
        if store.narrow is not None and store.is_streamed(index):
            store.narrow.homes[index] = pinned_host_buffer(acc, store.home_nbytes(index, narrow=True))[0]
            whole = store.whole_master(index)  # partitioned: gathered, since each narrow shard has its own cut
            _check_narrow_range(model, cfg, store, index, whole, store.narrow_from_master(index, whole))

    if was_on_device:
        acc.empty_cache()  # the blocks' device storage (a model built on the GPU) goes back to the driver

    if move_rest:
        in_blocks = store.param_ids
        for mod in model.modules():
            for p in mod._parameters.values():
                if p is not None and id(p) not in in_blocks and p.device != device:
                    p.data = p.data.to(device)
            for name, buf in mod._buffers.items():
                if buf is not None and buf.device != device:
                    mod._buffers[name] = buf.to(device)
    return store


def _check_narrow_range(model: nn.Module, cfg, store: BlockStore, index: int, whole, narrowed) -> None:
    """Raise ValueError when unit ``index``'s master (``whole``) has finite values its narrow copy
    (``narrowed``, rounded from it once) cannot hold."""
    for e, n in zip(store.entries[index], store.narrow.entries[index]):
        wide = e.view(whole)
        if n.dtype != e.dtype and not torch.isfinite(n.view(narrowed)).all() and torch.isfinite(wide).all():
            name = next(k for k, p in model.named_parameters(remove_duplicate=False) if p is e.param)
            raise ValueError(
                f"zo2.offload.transfer_dtype={cfg.transfer_dtype!r}: {name} has values outside the range "
                f'of {n.dtype} (largest magnitude {wide.abs().max().item():.4g}); use "bf16" '
                '(the range of fp32) or "auto"'
            )


def _move_home(store: BlockStore, index: int, adopted: torch.Tensor | None, acc) -> torch.Tensor:
    """Point block ``index``'s parameters at their slices of its home (``adopted``, or a new pinned host or
    device buffer they are copied into) and record it; returns the home."""
    home = adopted
    if store.partition is not None and store.is_streamed(index):
        if adopted is not None:  # a materialized shard: the parameters point at their placeholders already
            views = [e.param.data for e in store.entries[index]]
            pinned = adopted.is_pinned()
        else:
            home, pinned, views = build_shard(store.partition, store.entries[index], store.sizes[index], acc)
        store.host_pinned.append(pinned)
        store.homes.append(home)
        store.home_views.append(views)
        return home
    if home is not None:
        store.host_pinned.append(home.is_pinned())
    elif store.is_streamed(index):
        home, pinned = pinned_host_buffer(acc, store.sizes[index])
        store.host_pinned.append(pinned)
    else:
        home = torch.empty(store.sizes[index], dtype=torch.uint8, device=store.device)
        store.host_pinned.append(False)
    views = [e.view(home) for e in store.entries[index]]
    for e, v in zip(store.entries[index], views):
        if adopted is None:
            v.copy_(e.param.data)
        e.param.data = v  # the old storage is released here (unless someone else holds it)
    store.homes.append(home)
    store.home_views.append(views)
    return home


def _transfer_dtype(cfg, layouts) -> torch.dtype | None:
    """The dtype wider block parameters cross the link in, or None (they cross in their own dtype)."""
    if cfg.transfer_dtype == "auto":
        return None
    wanted = DTYPES[cfg.transfer_dtype]
    dtypes = {p.dtype for layout, _ in layouts for p, _, _ in layout}
    if dtypes == {wanted}:
        return None
    bad = sorted(str(d) for d in dtypes if d != wanted and not (d.is_floating_point and d.itemsize > wanted.itemsize))
    if bad:
        raise ValueError(
            f"zo2.offload.transfer_dtype={cfg.transfer_dtype!r} must be narrower than the block parameters it "
            f'carries, but the blocks hold {bad} parameters. Use "auto" (each parameter crosses in its own '
            'dtype), or a narrower one: "bf16" / "fp16" for fp32 parameters.'
        )
    return wanted


def _narrow_layout(block_entries: list[Entry], size: int, transfer: torch.dtype) -> tuple[list[Entry], int, bool]:
    """Each parameter's slice of the block's narrow copy, its flat size, and whether the copy is the block's
    flat buffer element for element (every parameter of one wider dtype: offsets scaled by the itemsize
    ratio, so one flat conversion kernel widens or narrows the whole block, padding included)."""
    dtypes = {e.dtype for e in block_entries}
    wide = next(iter(dtypes))
    if len(dtypes) == 1 and wide.is_floating_point and wide.itemsize > transfer.itemsize:
        ratio = wide.itemsize // transfer.itemsize
        out = [Entry(e.param, e.offset // ratio, e.nbytes // ratio, transfer, e.shape) for e in block_entries]
        return out, size // ratio, True
    out, offset = [], 0
    for e in block_entries:
        dtype = transfer if e.dtype.is_floating_point and e.dtype.itemsize > transfer.itemsize else e.dtype
        nbytes = e.shape.numel() * dtype.itemsize
        out.append(Entry(e.param, offset, nbytes, dtype, e.shape))
        offset += -(-nbytes // ALIGN_BYTES) * ALIGN_BYTES
    return out, max(offset, ALIGN_BYTES), False
