"""Benchmark helpers shared by ``launch/bench_step.py``, ``bench_offload.py``, ``bench_tasks.py``, ``bench_ab.py``
and ``bench_materialize.py``.

- :mod:`~zo2_ds.bench.models`: random-init OPT / Llama / Qwen shapes built on the device, and batches;
- :mod:`~zo2_ds.bench.measure`: steady-state step times (medians), device memory, NVML, host RSS, link bandwidth;
- :mod:`~zo2_ds.bench.driver`: an engine driven through zo2_ds's public API only, switches feature-detected;
- :mod:`~zo2_ds.bench.baselines`: two plain forwards and MeZO's step pattern;
- :mod:`~zo2_ds.bench.step`, :mod:`~zo2_ds.bench.offload`, :mod:`~zo2_ds.bench.kernel_micro`: the measured modes;
- :mod:`~zo2_ds.bench.materialize`: a model materialized into pinned memory against page-locking alone;
- :mod:`~zo2_ds.bench.report`: the environment record, JSON files, tables.

Only ``zo2_ds``'s public API is imported (lazily), so these helpers also time another checkout of zo2_ds
(``launch/bench_ab.py`` overlays this folder onto it).
"""

from zo2_ds.bench.models import DTYPES, SHAPES, ModelShape, build_model, make_batch

__all__ = ["DTYPES", "SHAPES", "ModelShape", "build_model", "make_batch"]
