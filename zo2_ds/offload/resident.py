"""How many units stay resident on the device: ``zo2.offload.num_resident_blocks``, or as many as the byte
budget ``zo2.offload.max_gpu_memory`` holds (:func:`parse_bytes` reads it)."""

from __future__ import annotations

__all__ = ["num_resident_units", "parse_bytes"]

_GIB = 1024**3


def parse_bytes(value: int | str) -> int:
    """``8000000000``, ``"8GB"``, ``"7.5GiB"``, ``"512MB"`` -> bytes."""
    if isinstance(value, int):
        return value
    text = value.strip().upper().replace(" ", "")
    units = {
        "TIB": 1024**4,
        "GIB": 1024**3,
        "MIB": 1024**2,
        "KIB": 1024,
        "TB": 10**12,
        "GB": 10**9,
        "MB": 10**6,
        "KB": 10**3,
        "B": 1,
    }
    for unit, scale in units.items():
        if text.endswith(unit):
            try:
                return int(float(text[: -len(unit)]) * scale)
            except ValueError:
                break
    try:
        return int(text)
    except ValueError:
        raise ValueError(
            f'zo2.offload.max_gpu_memory: cannot read {value!r} as bytes (e.g. 8000000000 or "8GB")'
        ) from None


def num_resident_units(cfg, sizes: list[int], num_blocks: int) -> int:
    """How many units stay on the device: ``num_resident_blocks`` blocks' worth of units, or as many of the
    largest unit as ``max_gpu_memory`` holds."""
    if cfg.max_gpu_memory is not None and cfg.num_resident_blocks is not None:
        raise ValueError("zo2.offload: set max_gpu_memory or num_resident_blocks, not both")
    if cfg.num_resident_blocks is not None:
        return min(cfg.num_resident_blocks * len(sizes) // num_blocks, len(sizes))
    if cfg.max_gpu_memory is None:
        return 0
    budget = parse_bytes(cfg.max_gpu_memory)
    if budget < max(sizes):
        what = "block" if len(sizes) == num_blocks else "streamed unit (the largest sub-module of a block)"
        raise ValueError(
            f"zo2.offload.max_gpu_memory={cfg.max_gpu_memory!r} ({budget / _GIB:.3f} GiB, {budget} bytes) is smaller "
            f"than one {what}, the least it can keep resident: {max(sizes) / _GIB:.3f} GiB ({max(sizes)} bytes). "
            "Raise it to at least that, or leave it unset to stream every block"
        )
    return min(budget // max(sizes), len(sizes))  # resident units are spread out: count the largest
