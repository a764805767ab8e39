"""zo2_ds: zeroth-order (MeZO / ZO2) fine-tuning inside DeepSpeed.

Two ways in:
- ``zo2_ds.initialize(...)``: same signature and return values as ``deepspeed.initialize``.
- ``import zo2_ds`` and keep calling ``deepspeed.initialize(...)`` (also what HF Trainer and accelerate
  do): a config with ``"zo2": {"enabled": true}`` then gets a :class:`ZOEngine`.
"""

from zo2_ds.config import OffloadConfig, ZO2Config, parse_zo2_config
from zo2_ds.engine import ZOEngine, ZOOptimizer
from zo2_ds.patch import initialize, install
from zo2_ds.runner import ZORunner

__all__ = [
    "initialize",
    "ZOEngine",
    "ZOOptimizer",
    "ZORunner",
    "ZO2Config",
    "OffloadConfig",
    "parse_zo2_config",
    "__version__",
]
__version__ = "0.1.0"

install()
