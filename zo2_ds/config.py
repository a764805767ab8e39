"""The ``"zo2"`` block of a DeepSpeed config: one typed model, validated once at initialize.

Example::

    "zo2": {"enabled": true, "eps": 1e-3, "seed": 0, "num_perturbations": 1,
            "offload": {"enabled": false}}

Learning rate and weight decay are not here: they come from DeepSpeed's standard ``optimizer`` block
(``{"type": "SGD", "params": {"lr": 1e-6, "weight_decay": 0.0}}``), and DeepSpeed's ``scheduler``
block drives the lr, as in any DeepSpeed job.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from deepspeed.runtime.config_utils import DeepSpeedConfigModel
from pydantic import ConfigDict, Field, ValidationError, model_validator

__all__ = ["ZO2Config", "OffloadConfig", "parse_zo2_config", "ZO2_KEY"]

ZO2_KEY = "zo2"


class OffloadConfig(DeepSpeedConfigModel):
    """``zo2.offload``: stream transformer blocks through the GPU from pinned host memory (ZO2)."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, validate_assignment=True)

    enabled: bool = False
    """Keep the transformer blocks in pinned CPU memory and upload one at a time."""

    prefetch_depth: Annotated[int, Field(ge=0, le=8)] | Literal["auto"] = "auto"
    """Size of the GPU slot ring beyond the computing unit (a block, or a block's sub-module, see
    ``granularity``): the ring holds ``prefetch_depth + 2`` slots (one computing, ``prefetch_depth``
    uploading ahead, one more whose write-back of the previous unit overlaps the next upload). Up to
    ``prefetch_depth + 1`` uploads are in flight; the last of them waits for the write-back of the slot's
    previous unit. 0 (two slots) saves one slot of GPU memory: the next upload then queues behind the
    previous unit's write-back on the link. "auto": 1, but 0 for sub-modules of 192 MiB or more (OPT-13B and up;
    H200, OPT-13B 1x2048: 3.55 against 3.75 GiB NVML for a 3% longer step, 1.07x the transfer floor), and 2
    for smaller ones with partitioned masters, where each rank uploads 1/N of a unit ("192 MiB" counts that
    share; 2 x H200, OPT-13B: 273-280 ms a step against 297 at 0). See zo2_ds/offload/sizing.py."""

    write_back_interval: Annotated[int, Field(ge=1, le=16)] | Literal["auto"] = "auto"
    """A streamed block's updated theta is copied back to its pinned master every this many steps (1-16),
    staggered over the blocks (with 4, a quarter of them each step); at the uploads in between, the GPU
    re-applies the updates the master lacks, in order, so the trajectory is bit-identical for every value.
    1 writes every block back every step (each block crosses the link once each way per step). Larger
    values cut the device-to-host traffic, which on PCIe slows the host-to-device uploads when both run at
    once (H100: OPT-13B 1x2048 547 / 512 / 486 ms per step with 1 / 2 / 4), for at most interval - 1 extra
    in-place update kernels per block and step. "auto": 4 on a device with streams (CUDA), 1 on a
    synchronized device (CPU: no link to save, and re-applying an update there means drawing z again on
    the CPU). Checkpoints, eval, ``state_dict`` and ``flush`` write every block back first."""

    max_gpu_memory: int | str | None = None
    """Bytes of GPU memory blocks may keep permanently resident (int, or a string like "8GB");
    the rest are streamed. None streams every block."""

    num_resident_blocks: int | None = Field(None, ge=0)
    """Alternative to max_gpu_memory: keep this many blocks permanently on the GPU."""

    transfer_dtype: Literal["auto", "fp32", "fp16", "bf16"] = "auto"
    """dtype wider block parameters cross the link in. "auto" (or the parameters' own dtype): every block
    crosses as it is, and offload on equals offload off bit for bit. Narrower (e.g. "bf16" for an fp32
    model): the host keeps the exact fp32 masters plus a bf16 copy of each streamed block (+50% host
    memory); a block uploads its exact master only at its write-back steps (one step in
    ``write_back_interval``, staggered) and its bf16 copy at the others, which the GPU widens and brings up
    to date with the pending updates. The masters' updates are exact (the same arithmetic as offload
    off); the forwards between a block's write-back steps see its master as of its last write-back step
    rounded to bf16, plus the updates since (a flush, e.g. eval or a checkpoint save, is a write-back of every
    block; loading masters remakes the copies from them). Traffic per streamed block and step, for fp32 with "bf16"
    and an interval of k: (2(k-1) + 4) / k bytes per parameter up, 6 / k down. With interval 1 (the CPU's
    "auto") every upload is exact. "fp16" rejects a model with values beyond fp16's range. See
    zo2_ds/offload/README.md."""

    cuda_graphs: bool = False
    """Replay each block's forward from a CUDA graph (captured at its second call per input shape, at most
    4 shapes per block; zo2_ds/offload/graphs.py): the host cost of a block's pass becomes one graph launch
    instead of the layer's Python, for small models whose offloaded step is host-bound. The same kernels
    run, so results are the same bits. A block whose forward cannot be captured (a host sync inside) runs
    eagerly, with a warning. No effect on CPU."""

    prefetch_next_step: bool = True
    """At the end of a training step, upload the next step's first blocks into the slots the last blocks
    free, so the link keeps working through the step boundary (the host's work between steps). False
    uploads each step's blocks only once it starts (benchmarks compare the two)."""

    granularity: Literal["auto", "block", "layer"] = "auto"
    """What streams as one unit: "block" (a whole transformer block: one upload, one slot, one perturbation
    scratch of the block), or "layer" (each of a block's large sub-modules, e.g. OPT's attention, fc1 and
    fc2: slots and scratch the size of the largest sub-module; a block's small modules, its layer norms,
    stay on the GPU). Same uploads per step and the same bits either way; "layer" cuts the offloader's GPU
    memory about threefold for more turns between the passes. "auto": "layer" when what each rank uploads of the
    largest block (all of it; 1/N with partitioned masters) is at least 256 MiB (one GPU: OPT-6.7B and up; two
    ranks partitioned: OPT-13B and up) and ``cuda_graphs`` is off, else "block". See zo2_ds/offload/units.py."""

    stream_head: bool | Literal["auto"] = "auto"
    """Keep the model's untied head in pinned host memory too and stream it through two buffers of a few thousand
    rows (zo2_ds/offload/head.py): once per training run, where the head takes the chunked loss
    (``zo2.vocab_chunks``), its update applied and written back on the way; eval and forwards without labels
    stream it for their full logits. Same bits as the resident head in training (the logits of other forwards
    differ in rounding only). "auto": on CUDA, for heads ``zo2.vocab_chunks`` chunks (Qwen2.5-7B: 1.02 GiB off
    the GPU); true: any untied chunked head (tests; refused with the reason otherwise); false: never."""

    blocks_attr: str | None = None
    """Dotted path from the model to its nn.ModuleList of repeated blocks (e.g. "model.decoder.layers"),
    for models where automatic discovery fails."""

    partition: Literal["auto", "none", "node"] = "auto"
    """Data parallel: "none", every rank pins its own copy of the streamed units' masters; "node", the ranks
    of a node (all ranks on CPU, ``device_count()`` consecutive ranks on an accelerator) share one copy: each
    pins a 1/N shard of every streamed unit, uploads it and all-gathers the rest from the other ranks (see
    zo2_ds/offload/partition.py). Same bits either way. Resident units (``num_resident_blocks``,
    ``max_gpu_memory``) are whole on every rank's device: only the streamed ones are sharded, and so are
    their ``transfer_dtype`` copies. "node" needs offload enabled, a world of whole nodes and every rank in
    one data-parallel group (no model or sequence parallelism), else it is refused. "auto": "node" when
    offload is enabled and a node has more than one rank, else "none"; where "node" would be refused it is
    "none", with a warning in the log. Partitioned, every forward of the model is a collective of the node's
    ranks (each unit's upload gathers): run eval and generation on every rank, not on rank 0 alone."""

    gather: Literal["auto", "copy_engine", "collective"] = "auto"
    """With partitioned masters on GPUs, how a node's ranks gather each unit's shards into their slots.
    "copy_engine": the slots live in symmetric memory (torch.distributed._symmetric_memory) and each rank
    copies the other shards straight out of its peers' slots, on the GPU's copy engines (no SMs taken from
    the forward beside it), between two device-side barriers; needs every GPU of the node to be a peer of the
    others (NVLink or PCIe P2P). "collective": the process group's all-gather (NCCL's kernels on GPUs, gloo
    on CPU). "auto": "copy_engine" where the node's GPUs are peers and symmetric memory is available, else
    "collective". Same bits either way."""

    @model_validator(mode="after")
    def _partition_supported(self) -> OffloadConfig:
        if self.partition == "node" and not self.enabled:
            raise ValueError('zo2.offload.partition="node" needs zo2.offload.enabled true (it partitions the masters)')
        return self


class ZO2Config(DeepSpeedConfigModel):
    """``zo2``: zeroth-order (MeZO / ZO-SGD) training in place of backward + optimizer."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True, validate_assignment=True)

    enabled: bool = False
    """Turn ZO training on."""

    eps: float = Field(1e-3, gt=0.0, le=1.0)
    """Perturbation scale: the two forwards run at theta + eps*z and theta - eps*z."""

    seed: int = Field(0, ge=0, lt=2**63)
    """Base seed of the perturbation directions z (z is keyed by seed, step, index, parameter name)."""

    num_perturbations: int = Field(1, ge=1, le=64)
    """q: directions per step; the update averages the q estimates g_i z_i (n-SPSA)."""

    perturbation_parallel: int = Field(1, ge=1, le=64)
    """P: the 2q passes of a step are spread over groups of P consecutive ranks that see the same
    micro-batch (rank p of a group runs the passes j with j % P == p; the losses are summed over the group),
    so the step's latency falls instead of its batch growing. The groups are data parallel with each other:
    P x D ranks follow the trajectory of D data-parallel ranks bit for bit. P must divide the number of
    ranks and 2q. Feed a group one micro-batch: shard data by ``engine.zo_data_rank`` over
    ``engine.zo_data_world_size`` (``launch/train.py`` and DeepSpeed's own loader do). See zo2_ds/parallel.py."""

    async_step: bool | Literal["auto"] = "auto"
    """Keep each step's g on the device: the update reads its coefficients there, a step whose g is not finite
    is skipped there (its update multiplied by 0, theta unchanged bit for bit), and the host never waits for
    the step to end, so it issues the next step while the device finishes this one (no idle device at the
    step boundary). The host reads a step's loss, g and skip at the next step's boundary, or at once when asked
    (``engine.last_loss``, ``last_projected_grad``, ``zo_skipped_steps``, a save, eval, ``destroy``): warnings,
    the monitor and ``steps_per_print`` lines come one step late. The difference from false: a skipped step
    still advances the lr schedule (DeepSpeed's ``skipped_steps`` stays 0; ``zo_skipped_steps`` counts). Same
    trajectory bit for bit otherwise. "auto": on a device with streams (CUDA) without ``perturbation_parallel``
    (whose same-input check needs the host); false: read g every step (before the update, as DeepSpeed's
    overflow check does)."""

    kernels: Literal["auto", "multi_tensor", "per_tensor", "torch"] = "auto"
    """Which implementation perturbs and updates (zo2_ds/ops.py): "auto" = the multi-tensor Triton kernels
    on CUDA tensors when triton is installed, else torch; "multi_tensor" (one launch per block / update
    group); "per_tensor" (one Triton launch per tensor); "torch" (zo2_ds/zo.py, z from torch's generator:
    a different z than the kernels'). A kernel mode without triton or CUDA warns and runs torch. The two
    kernel modes give the same bits."""

    lean_loss: bool = True
    """Compute HF causal-LM losses chunk by chunk (zo2_ds.loss): the same value bit for bit as transformers'
    ``ForCausalLMLoss``, without its two fp32 copies of the logits (0.76 GiB for OPT at 1x2048)."""

    vocab_chunks: bool | Literal["auto"] = "auto"
    """Compute an HF causal-LM's head and loss over chunks of vocabulary rows in the perturbed forwards that get
    ``labels`` (zo2_ds/vocab.py): each chunk of the head's weight is perturbed into a chunk-sized buffer and
    reduced to an online log-sum-exp, so neither a whole perturbed copy of the head nor the logits exist (Qwen2.5-7B
    at 1x2048 in fp16: 1.02 GiB of perturbed head and 0.58 GiB of logits). The loss then differs from
    transformers' in rounding only, and those forwards return ``logits=None``; evaluation, generation and
    forwards without labels keep the whole head. Applies to a bias-free linear head of a model whose loss is the
    stock causal-LM one. "auto": heads of at least 256 MiB (OPT-6.7B and up, 7B-class models with large
    vocabularies); true: every such head (tests); false: never."""

    offload: OffloadConfig = Field(default_factory=OffloadConfig)
    """CPU offloading of the transformer blocks (ZO2)."""

    @model_validator(mode="after")
    def _async_step_supported(self) -> ZO2Config:
        if self.async_step is True and self.perturbation_parallel > 1:
            raise ValueError(
                "zo2.async_step=true cannot be used with zo2.perturbation_parallel > 1 (its check that a group's "
                'ranks saw the same input reads the step on the host); use "auto" or false'
            )
        return self


def _field_path(loc: tuple[Any, ...]) -> tuple[Any, ...]:
    """The config keys of an error location, without pydantic's union-branch tags (e.g. 'constrained-int', 'bool')."""
    tags = ("bool", "int", "str", "float")
    return tuple(part for part in loc if not (isinstance(part, str) and ("[" in part or "-" in part or part in tags)))


def _describe(err: dict[str, Any]) -> str:
    key = ".".join(str(part) for part in (ZO2_KEY, *_field_path(err["loc"])))
    if err["type"] == "extra_forbidden":
        parent = ZO2Config
        for part in err["loc"][:-1]:
            parent = parent.model_fields[part].annotation
        allowed = ", ".join(sorted(parent.model_fields))
        return f"{key}: unknown key; allowed keys are: {allowed}"
    value = err.get("input")
    return f"{key}: {err['msg']} (got {value!r})"


def parse_zo2_config(param_dict: dict[str, Any] | None) -> ZO2Config:
    """Validate the ``zo2`` block of a full DeepSpeed config dict. A missing block means disabled.

    Raises ValueError naming every bad key and what is allowed.
    """
    block = (param_dict or {}).get(ZO2_KEY)
    if block is None:
        return ZO2Config()
    if not isinstance(block, dict):
        raise ValueError(f"{ZO2_KEY}: expected a JSON object, got {type(block).__name__}")
    try:
        return ZO2Config(strict=True, **block)
    except ValidationError as exc:
        # One line per key: the messages of a union's branches joined ("... or ...").
        by_key: dict[tuple[Any, ...], list[dict[str, Any]]] = {}
        for e in exc.errors():
            by_key.setdefault(_field_path(e["loc"]), []).append(e)
        lines = []
        for errs in by_key.values():
            first = _describe(errs[0])
            if len(errs) > 1:
                first += "".join(f"; or {e['msg']}" for e in errs[1:])
            lines.append(first)
        problems = "\n  ".join(lines)
        raise ValueError(f"invalid '{ZO2_KEY}' block in the DeepSpeed config:\n  {problems}") from None
