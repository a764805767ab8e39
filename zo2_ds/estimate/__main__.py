"""``python -m zo2_ds.estimate MODEL [options]``: see :mod:`zo2_ds.estimate`; ``--help`` lists the options."""

from __future__ import annotations

import sys

from zo2_ds.estimate.cli import main

if __name__ == "__main__":
    sys.exit(main())
