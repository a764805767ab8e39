"""``python -m zo2_ds.estimate MODEL [options]``: see :mod:`zo2_ds.estimate`; ``--help`` lists the options."""

from __future__ import annotations

import os
import sys

# --check measures a run as the benchmarks do: with the allocator's expandable segments (before CUDA starts).
os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")

from zo2_ds.estimate.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
