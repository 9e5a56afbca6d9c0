"""Celery's lines about the periodic tasks are DEBUG-only; every other task keeps its INFO lines,
and a periodic task's errors stay errors. Records are made in the shapes Celery logs them (its own
format strings, the worker's context dict, beat's arguments) on Celery's own loggers."""

from __future__ import annotations

import logging

import pytest
from celery.app.trace import LOG_RECEIVED, LOG_SUCCESS

import celeryconfig
from tasks.periodic_logs import CELERY_LOGGERS, PeriodicTaskLines, quiet_periodic_task_lines


class Kept(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def lines(self) -> list[tuple[str, str]]:
        return [(r.levelname, r.getMessage()) for r in self.records]


@pytest.fixture
def kept():
    quiet_periodic_task_lines(celeryconfig.beat_schedule)
    handler = Kept()
    loggers = [logging.getLogger(name) for name in CELERY_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)
    yield handler
    for logger in loggers:
        logger.removeHandler(handler)
        logger.setLevel(logging.NOTSET)
        for periodic in [f for f in logger.filters if isinstance(f, PeriodicTaskLines)]:
            logger.removeFilter(periodic)


def _task_lines(name: str) -> None:
    context = {"id": "42", "name": name, "args": "()", "kwargs": "{}", "eta": None,
               "return_value": "None", "runtime": 0.01}
    logging.getLogger("celery.worker.strategy").info(LOG_RECEIVED, context,
                                                     extra={"data": context})
    logging.getLogger("celery.app.trace").info(LOG_SUCCESS, context, extra={"data": context})


def test_periodic_task_lines_are_left_out_at_info(kept):
    for name in ("autoscale.tick", "batch.sweep"):
        _task_lines(name)
    beat = logging.getLogger("celery.beat")
    beat.info("Scheduler: Sending due task %s (%s)", "autoscale-tick", "autoscale.tick")
    beat.info("Scheduler: Sending due task %s (%s)", "batch-sweep", "batch.sweep")
    assert kept.lines() == []

    _task_lines("batch.run_chunk")
    _task_lines("downloads.download_model_async")
    logging.getLogger("celery.app.trace").error("Task %(name)s[%(id)s] raised: %(exc)s",
                                                {"name": "autoscale.tick", "id": "7", "exc": "x"})
    beat.info("beat: Starting...")
    assert kept.lines() == [
        ("INFO", "Task batch.run_chunk[42] received"),
        ("INFO", "Task batch.run_chunk[42] succeeded in 0.01s: None"),
        ("INFO", "Task downloads.download_model_async[42] received"),
        ("INFO", "Task downloads.download_model_async[42] succeeded in 0.01s: None"),
        ("ERROR", "Task autoscale.tick[7] raised: x"),
        ("INFO", "beat: Starting..."),
    ]


def test_periodic_task_lines_come_back_as_debug(kept):
    for name in CELERY_LOGGERS:
        logging.getLogger(name).setLevel(logging.DEBUG)
    _task_lines("autoscale.tick")
    logging.getLogger("celery.beat").info("Scheduler: Sending due task %s (%s)",
                                          "autoscale-tick", "autoscale.tick")
    assert kept.lines() == [
        ("DEBUG", "Task autoscale.tick[42] received"),
        ("DEBUG", "Task autoscale.tick[42] succeeded in 0.01s: None"),
        ("DEBUG", "Scheduler: Sending due task autoscale-tick (autoscale.tick)"),
    ]


def test_the_filter_is_installed_once_however_often_the_app_is_made(kept):
    quiet_periodic_task_lines(celeryconfig.beat_schedule)
    for name in CELERY_LOGGERS:
        filters = logging.getLogger(name).filters
        assert len([f for f in filters if isinstance(f, PeriodicTaskLines)]) == 1
