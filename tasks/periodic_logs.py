"""Celery's routine lines about the periodic tasks (autoscaler tick, batch sweep) at DEBUG.

At INFO a worker logs `Task autoscale.tick[...] received` and `... succeeded in ...`, and beat
`Scheduler: Sending due task autoscale-tick`, every few seconds: noise that buries what matters.
What a tick decides is logged at INFO by `runtimes.control` itself, and errors of these tasks are
not INFO, so they stay; other tasks (batch chunks, downloads, engine starts) keep their lines.
With LOG_LEVEL=DEBUG the routine lines come back, marked DEBUG.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping

# Where Celery logs those lines: the worker's receipt, the task's outcome, beat's sending.
CELERY_LOGGERS = ("celery.worker.strategy", "celery.app.trace", "celery.beat")


class PeriodicTaskLines(logging.Filter):
    """Lowers to DEBUG the INFO records about one of `names` (task names and beat entry names),
    and lets them through only where DEBUG is enabled."""

    def __init__(self, names: Iterable[str]):
        super().__init__()
        self.names = frozenset(names)

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno != logging.INFO or not self._about_periodic_task(record):
            return True
        record.levelno, record.levelname = logging.DEBUG, logging.getLevelName(logging.DEBUG)
        return logging.getLogger(record.name).isEnabledFor(logging.DEBUG)

    def _about_periodic_task(self, record: logging.LogRecord) -> bool:
        args = record.args
        if isinstance(args, Mapping):  # the worker's lines: a context that names the task
            return args.get("name") in self.names
        # beat's line: the entry's name and the task's, as format arguments
        return isinstance(args, tuple) and any(isinstance(a, str) and a in self.names
                                               for a in args)


def quiet_periodic_task_lines(beat_schedule: Mapping[str, Mapping]) -> None:
    """Install the filter for the tasks of `beat_schedule` (Celery's `beat_schedule` setting)."""
    names = set(beat_schedule) | {entry["task"] for entry in beat_schedule.values()}
    lines = PeriodicTaskLines(names)
    for name in CELERY_LOGGERS:
        logger = logging.getLogger(name)
        # One filter per logger, even when the app is made more than once in a process (tests).
        for old in [f for f in logger.filters if isinstance(f, PeriodicTaskLines)]:
            logger.removeFilter(old)
        logger.addFilter(lines)
