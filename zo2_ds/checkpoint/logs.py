"""Continuing a run's ``log.jsonl`` after a resume without duplicated steps."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

from zo2_ds.checkpoint.atomic import write_text_atomic

__all__ = ["truncate_jsonl"]

logger = logging.getLogger(__name__)


def truncate_jsonl(path: str | os.PathLike, last_step: int, *, step_key: str = "step") -> int:
    """Keep the records of ``path`` up to ``last_step`` (the step a run resumes from) and drop the rest.

    The records after it were logged by the stopped run past its last checkpoint; the resumed run logs those
    steps again. A line that does not parse (the last one, torn by a kill) is dropped too; a record without
    ``step_key`` is kept. The file is replaced atomically; a missing file is left missing. Returns the
    number of lines dropped.
    """
    path = Path(path)
    if not path.is_file():
        return 0
    kept, dropped = [], 0
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            dropped += 1
            continue
        if isinstance(record, dict) and isinstance(record.get(step_key), int) and record[step_key] > last_step:
            dropped += 1
            continue
        kept.append(line)
    if dropped:
        write_text_atomic(path, "".join(f"{line}\n" for line in kept))
        logger.info(f"{path}: dropped {dropped} records after step {last_step} (logged again by the resumed run)")
    return dropped
