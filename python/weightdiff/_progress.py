"""What a running job shows: tqdm bars when tqdm is installed, messages as log records."""

import logging
from typing import Any, Optional

log = logging.getLogger("weightdiff")

_LEVELS = {"info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


class Reporter:
    """Called by the native code every 100 ms while a job runs (and once at its end).

    ``progress`` gets the current stage (``"diff"``: bytes of tensors compared;
    ``"low rank"``: elements of matrices analysed; ``""``: none), its counts and the
    number of stages ended so far. ``message`` gets the lines the command line prints on
    stderr; they go to the ``weightdiff`` logger.
    """

    def __init__(self, progress: bool) -> None:
        self._tqdm: Optional[Any] = None
        if progress:
            try:
                from tqdm.auto import tqdm

                self._tqdm = tqdm
            except ImportError:
                pass
        self._bar: Optional[Any] = None
        self._stage = ""
        self._stages_done = 0

    def message(self, level: str, line: str) -> None:
        log.log(_LEVELS.get(level, logging.INFO), "%s", line)

    def progress(
        self, stage: str, done: int, total: int, items_done: int, items_total: int, stages_done: int
    ) -> None:
        if self._tqdm is None:
            return
        if stages_done != self._stages_done or stage != self._stage:
            self.close()
            self._stages_done = stages_done
            self._stage = stage
        if not stage or total == 0:
            return
        if self._bar is None:
            unit = "B" if stage == "diff" else " elements"
            self._bar = self._tqdm(
                total=total, unit=unit, unit_scale=True, desc=stage, leave=False
            )
        self._bar.n = done
        items = "tensors" if stage == "diff" else "matrices"
        self._bar.set_postfix_str(f"{items_done}/{items_total} {items}", refresh=False)
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
