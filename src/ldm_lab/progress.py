"""Progress bars for the long steps that print nothing else: latent/text cache encoding, class-image
generation, evaluation and validation sampling. tqdm bars on a terminal, from the main process
only (``RANK`` / ``LOCAL_RANK`` 0 or unset); nothing when stderr is not a terminal (logs, CI)
or on other ranks. The training step's own progress line is trainers/runlog.py's."""

from __future__ import annotations

import os
import sys

from tqdm.auto import tqdm


def main_rank() -> bool:
    return all(os.environ.get(k, "0") in ("", "0") for k in ("RANK", "LOCAL_RANK"))


def bar(total: int, desc: str, unit: str = "it", stream=None) -> tqdm:
    """A bar of ``total`` units, shown only on a terminal of the main process (update it with ``.update(n)``)."""
    stream = stream or sys.stderr
    shown = main_rank() and bool(getattr(stream, "isatty", lambda: False)())
    return tqdm(total=total, desc=desc, unit=unit, file=stream, disable=not shown, leave=False, dynamic_ncols=True)
