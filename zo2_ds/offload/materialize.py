"""Building a model whose blocks never exist whole in pageable host memory: each block is made straight
in its page-locked home, in the flat layout the block store uses, so ``zo2_ds.initialize`` with
``zo2.offload`` on adopts the homes as they are (no second copy).

:func:`materialize` builds the Hugging Face causal LM's module tree with its parameters on the meta
device (buffers, e.g. rotary ``inv_freq``, are computed as a normal construction computes them), finds
the blocks (:func:`zo2_ds.models.find_blocks`) and walks the modules in the order transformers'
``initialize_weights`` does. Entering a block allocates its home
(:func:`~zo2_ds.offload.hostmem.pinned_host_buffer`, laid out by
:func:`~zo2_ds.offload.store.block_layout`) and binds the block's parameters to their slices of it; the
parameters outside the blocks (embeddings, positions, final norm, head) get storage on ``device``. The
values come

- from a config: the model's own ``_init_weights``, module by module. On an accelerator a block is
  initialized in a device buffer of the home's layout and copied down in one transfer; on the CPU
  straight into the home. Draws come from torch's global generators (seed them with ``torch.manual_seed``);
- from a checkpoint folder of safetensors (``model.safetensors`` or ``model.safetensors.index.json``):
  one tensor at a time (:mod:`~zo2_ds.offload.checkpoint_reader`), converted to ``dtype`` on the way.

With a ``partition`` (``zo2.offload.partition = "node"``) each rank pins only its shard of every streamed
unit, see :mod:`~zo2_ds.offload.materialize_shards`.

Tied weights are tied before the walk (one parameter, filled once) and again after it. The host memory
all this needs (the homes, the parts outside the blocks when ``device`` is the CPU, the largest
transient) is checked against MemAvailable before anything is allocated.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from zo2_ds.dtypes import torch_dtype
from zo2_ds.models import find_blocks
from zo2_ds.offload import hostmem
from zo2_ds.offload.checkpoint_reader import SafetensorsCheckpoint
from zo2_ds.offload.materialize_shards import ShardedBlocks
from zo2_ds.offload.partition import Partition
from zo2_ds.offload.store import block_layout

__all__ = ["materialize", "materialize_layout", "host_bytes_needed"]

_GIB = 1024**3


def materialize(
    source: str | os.PathLike | Any,
    *,
    dtype: str | torch.dtype = torch.float32,
    device: str | torch.device | None = None,
    blocks_attr: str | None = None,
    progress: bool = True,
    partition: Partition | None = None,
    granularity: str = "auto",
    cuda_graphs: bool = False,
) -> nn.Module:
    """A causal LM (``AutoModelForCausalLM``) whose blocks live in page-locked host buffers of the block
    store's layout, built without the whole model ever in pageable memory.

    ``source``: a folder with ``config.json`` and safetensors weights (the parameters and persistent
    buffers are read from it), or a ``transformers.PretrainedConfig`` (random init, as the model's own
    ``_init_weights``). ``dtype``: of every floating parameter ("fp32", "fp16", "bf16" or a torch dtype;
    use the dtype of the DeepSpeed config, else DeepSpeed casts every parameter into new pageable
    memory). ``device``: where the parts outside the blocks and all buffers go, and where blocks are
    initialized from a config (default: the accelerator's current device, else the CPU).
    ``blocks_attr``: as ``zo2.offload.blocks_attr``. ``progress``: a progress bar over the blocks.
    ``partition``: this rank's place in its node (:func:`~zo2_ds.offload.node.materialize_partition`)
    for an engine with ``zo2.offload.partition = "node"``: each rank pins only its shard of every streamed unit
    (the units as ``granularity`` and ``cuda_graphs``, the engine's ``zo2.offload`` settings, cut them), the
    units' parameters point at placeholders, and the engine adopts the shards. From a config, seed every rank
    alike: no rank holds a whole block to broadcast.
    Loaded from a folder, the model is returned in eval mode, as ``from_pretrained`` returns it.

    Raises ValueError for a folder without config or safetensors weights, a checkpoint lacking one of the
    model's parameters, or too little host memory (with the bytes needed and available), before any
    host memory is page-locked.
    """
    dtype = torch_dtype(dtype, what="materialize: dtype")
    device = _default_device() if device is None else torch.device(device)
    checkpoint = None
    if isinstance(source, (str, os.PathLike)):
        checkpoint = SafetensorsCheckpoint(source)
        config = checkpoint.config()
    else:
        config = source
    model = _skeleton(config, dtype)
    blocks = find_blocks(model, blocks_attr).blocks
    layouts = [block_layout(b) for b in blocks]

    from deepspeed.accelerator import get_accelerator
    from tqdm.auto import tqdm

    acc = get_accelerator()
    shards = None if partition is None else ShardedBlocks(partition, blocks, layouts, granularity, cuda_graphs, acc)
    transient = checkpoint.max_transient_bytes() if checkpoint is not None else 0
    if shards is not None and checkpoint is None and device.type == "cpu":
        transient = max(size for _, size in layouts)  # each block built whole in one host buffer
    homes = None if shards is None else shards.shard_nbytes()
    _check_host_memory(host_bytes_needed(model, blocks_attr, on_host=device.type == "cpu", homes=homes) + transient)

    if checkpoint is not None:
        checkpoint.base_prefix = getattr(model, "base_model_prefix", "")
    bar = tqdm(total=len(blocks), desc="materializing blocks", unit="block", disable=not progress)
    builder = _Builder(model, blocks, layouts, device, acc, checkpoint, lambda: bar.update(1), shards)
    try:
        with _init_guard():
            _walk(model, model._initialize_weights, builder)
    finally:
        bar.close()
    assert not any(p.is_meta for p in model.parameters()), "every module was visited"
    if checkpoint is not None:
        _load_buffers(model, checkpoint, device)
        model.eval()  # as from_pretrained leaves a loaded model
    else:
        model.apply(lambda m: _move_buffers(m, device))
    model.tie_weights()
    return model


def materialize_layout(offload: dict) -> dict:
    """:func:`materialize`'s layout arguments for the engine the ``zo2.offload`` block ``offload`` configures:
    its blocks and units, and with ``partition`` "node" on more than one rank of a node this rank's place
    (each rank builds only its shards; torch.distributed must be initialized then)."""
    from deepspeed.accelerator import get_accelerator

    from zo2_ds.config import parse_zo2_config
    from zo2_ds.offload.node import materialize_partition

    cfg = parse_zo2_config({"zo2": {"offload": offload}}).offload
    device = torch.device(get_accelerator().device_name())
    return {
        "blocks_attr": cfg.blocks_attr,
        "partition": materialize_partition(cfg, device),
        "granularity": cfg.granularity,
        "cuda_graphs": cfg.cuda_graphs,
    }


def host_bytes_needed(
    model: nn.Module, blocks_attr: str | None = None, *, on_host: bool, homes: int | None = None
) -> int:
    """Host bytes :func:`materialize` keeps for ``model`` (its blocks' homes, or ``homes`` bytes of them, and
    with ``on_host`` the parameters outside the blocks), without the transient of reading a checkpoint."""
    blocks = find_blocks(model, blocks_attr).blocks
    if homes is None:
        homes = sum(block_layout(b)[1] for b in blocks)
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    rest = sum(p.numel() * p.element_size() for p in model.parameters() if id(p) not in in_blocks)
    return homes + (rest if on_host else 0)


def _check_host_memory(needed: int) -> None:
    available = hostmem.available_host_bytes()
    if needed > available:
        raise ValueError(
            f"materialize: the model needs {needed / _GIB:.2f} GiB of host memory ({needed} bytes: the blocks' "
            f"pinned homes, the parts outside the blocks when they stay on the CPU, and the largest tensor read), "
            f"but only {available / _GIB:.2f} GiB ({available} bytes) is available (MemAvailable). Free host "
            "memory or use a host with more."
        )


def _default_device() -> torch.device:
    from deepspeed.accelerator import get_accelerator

    acc = get_accelerator()
    return torch.device(acc.current_device_name()) if acc.is_available() else torch.device("cpu")


def _skeleton(config: Any, dtype: torch.dtype) -> nn.Module:
    """The model's module tree with every parameter on the meta device, untied init skipped, then tied."""
    from transformers import AutoModelForCausalLM

    try:
        from transformers.initialization import no_init_weights
    except ImportError:  # transformers 4.x
        from transformers.modeling_utils import no_init_weights

    with no_init_weights(), _parameters_on_meta():
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.tie_weights()  # no_init_weights skips post_init's tying; tied parameters are then filled once
    return model


@contextlib.contextmanager
def _parameters_on_meta() -> Iterator[None]:
    """Every parameter registered inside moves to the meta device (its constructor's tensor is freed
    before anything touches it); buffers keep their computed values."""
    register = nn.Module.register_parameter

    def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
        register(module, name, param)
        if param is not None and param.device.type != "meta":
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _init_guard() -> contextlib.AbstractContextManager:
    """transformers 5's guard that makes torch.nn.init skip tensors flagged ``_is_hf_initialized`` (as its
    ``initialize_weights`` runs); nothing on 4.x."""
    try:
        from transformers.initialization import guard_torch_init_functions
    except ImportError:
        return contextlib.nullcontext()
    return guard_torch_init_functions()


def _walk(module: nn.Module, init: Callable, builder: _Builder) -> None:
    """Post-order over the modules with each sub-model's own init, as transformers' ``smart_apply``."""
    from transformers import PreTrainedModel

    builder.enter(module)
    for child in module.children():
        _walk(child, child._initialize_weights if isinstance(child, PreTrainedModel) else init, builder)
    builder.leave(module, init)


class _Builder:
    """Gives the parameters storage and values as :func:`_walk` enters and leaves each module."""

    def __init__(self, model, blocks, layouts, device, acc, checkpoint, on_block_done, shards=None):
        self.block_index = {id(b): i for i, b in enumerate(blocks)}
        self.layouts, self.device, self.acc = layouts, device, acc
        self.shards: ShardedBlocks | None = shards
        self.scratch: torch.Tensor | None = None  # partitioned, from a config, on the CPU: the one block buffer
        self.checkpoint: SafetensorsCheckpoint | None = checkpoint
        self.on_block_done: Callable[[], None] = on_block_done
        self.names: dict[int, list[str]] = {}  # id(meta parameter) -> every name it has (tied: several)
        self.metas: list[nn.Parameter] = []  # kept alive, so no id in ``names`` / ``made`` is reused
        for name, p in model.named_parameters(remove_duplicate=False):
            if id(p) not in self.names:
                self.metas.append(p)
            self.names.setdefault(id(p), []).append(name)
        self.made: dict[int, nn.Parameter] = {}  # id(meta parameter) -> its materialized parameter
        self.initialized: set[int] = set()  # ids of materialized parameters whose module's init has run
        self._block: tuple[int, torch.Tensor, torch.Tensor | None] | None = None  # index, home, device staging

    def enter(self, module: nn.Module) -> None:
        """Entering a block: its home, and its parameters bound to their slices (filled from a checkpoint)."""
        index = self.block_index.get(id(module))
        if index is None:
            return
        if self.shards is not None:
            self._enter_sharded(module, index)
            return
        layout, size = self.layouts[index]
        home, _ = hostmem.pinned_host_buffer(self.acc, size)
        staging = None
        if self.checkpoint is None and self.device.type != "cpu":
            staging = torch.empty(size, dtype=torch.uint8, device=self.device)  # initialized here, one copy down
        flat = home if staging is None else staging
        for p, offset, nbytes in layout:
            view = flat[offset : offset + nbytes].view(p.dtype).view(p.shape)
            if self.checkpoint is not None:
                self.checkpoint.read_into(self.checkpoint.key_for(self.names[id(p)]), view)
            self.made[id(p)] = nn.Parameter(view, requires_grad=p.requires_grad)
        for mod in module.modules():
            self._bind(mod)
        self._block = (index, home, staging)

    def _enter_sharded(self, module: nn.Module, index: int) -> None:
        """Entering a block with a partition: its units' shards read, or the units bound to a whole-block
        buffer for the init (the parameters no unit holds are bound as the parts outside the blocks)."""
        if self.checkpoint is not None:
            self.shards.read(index, self.checkpoint, self.names, self.made)
            flat = None
        else:
            size = self.layouts[index][1]
            if self.device.type != "cpu":
                flat = torch.empty(size, dtype=torch.uint8, device=self.device)
            else:
                if self.scratch is None:
                    self.scratch = torch.empty(max(s for _, s in self.layouts), dtype=torch.uint8)
                flat = self.scratch[:size]
            for p, offset in self.shards.unit_params(index):
                view = flat[offset : offset + p.numel() * p.element_size()].view(p.dtype).view(p.shape)
                self.made[id(p)] = nn.Parameter(view, requires_grad=p.requires_grad)
        for mod in module.modules():
            self._bind(mod)
        self._block = (index, None, flat)

    def leave(self, module: nn.Module, init: Callable) -> None:
        """Leaving a module: its own parameters get storage (outside the blocks) and values; leaving a
        block: its device copy goes to its home."""
        self._bind(module)
        if self.checkpoint is None:
            self._init(module, init)
        if self._block is not None and self.block_index.get(id(module)) == self._block[0]:
            self._finish_block()

    def _bind(self, module: nn.Module) -> None:
        for name, p in module._parameters.items():
            if p is None or p.device.type != "meta":
                continue
            if id(p) not in self.made:  # outside the blocks: on the device, read or to be initialized
                if self.checkpoint is None:
                    data = torch.empty(p.shape, dtype=p.dtype, device=self.device)
                else:
                    key = self.checkpoint.key_for(self.names[id(p)])
                    data = self.checkpoint.read(key).to(device=self.device, dtype=p.dtype)
                self.made[id(p)] = nn.Parameter(data, requires_grad=p.requires_grad)
            module._parameters[name] = self.made[id(p)]

    def _init(self, module: nn.Module, init: Callable) -> None:
        """The model's init of ``module``. Its own parameters initialized before (a head tied to the
        embedding) keep their values, as transformers' loading marks them: ``_is_hf_initialized``, honoured
        by its init functions, for the call (a module with nothing else of its own is skipped)."""
        own = [p for p in module._parameters.values() if p is not None]
        done = [p for p in own if id(p) in self.initialized]
        if own and len(done) == len(own):
            return
        for p in done:
            p._is_hf_initialized = True
        with torch.no_grad():
            init(module)
        for p in done:
            del p._is_hf_initialized
        self.initialized.update(id(p) for p in own)

    def _finish_block(self) -> None:
        index, home, staging = self._block
        self._block = None
        if self.shards is not None:
            if staging is not None:
                self.shards.keep(index, staging, self.made)
            self.on_block_done()
            return
        if staging is not None:
            home.copy_(staging)  # one transfer per block; then the parameters move to their home slices
            for meta, offset, nbytes in self.layouts[index][0]:
                self.made[id(meta)].data = home[offset : offset + nbytes].view(meta.dtype).view(meta.shape)
        self.on_block_done()


def _move_buffers(module: nn.Module, device: torch.device) -> None:
    for name, buf in module._buffers.items():
        if buf is not None and buf.device != device:
            module._buffers[name] = buf.to(device)


def _load_buffers(model: nn.Module, checkpoint: SafetensorsCheckpoint, device: torch.device) -> None:
    """Persistent buffers the checkpoint holds are read from it (in their own dtype, as transformers
    does); the others keep the values the constructor computed. All go to ``device``."""
    persistent = {name for name, _ in model.named_buffers()} - _non_persistent(model)
    for mod_name, mod in model.named_modules():
        for name, buf in list(mod._buffers.items()):
            full = f"{mod_name}.{name}" if mod_name else name
            key = checkpoint.key_for([full], required=False) if full in persistent else None
            if key is not None:
                mod._buffers[name] = checkpoint.read(key).to(device=device, dtype=buf.dtype)
        _move_buffers(mod, device)


def _non_persistent(model: nn.Module) -> set[str]:
    out = set()
    for mod_name, mod in model.named_modules():
        out.update(f"{mod_name}.{n}" if mod_name else n for n in mod._non_persistent_buffers_set)
    return out
