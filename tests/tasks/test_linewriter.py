"""Group commit of finished lines (`tasks.linewriter.LineWriter`), with real threads."""

from __future__ import annotations

import threading
import time

import pytest

from tasks.linewriter import LineWriter


def test_lines_finishing_during_a_write_go_together_in_the_next():
    writes: list[list[int]] = []

    def store(batch: list[int]) -> None:
        writes.append(batch)
        time.sleep(0.02)  # a round trip

    writer: LineWriter[int] = LineWriter(store)
    threads = [threading.Thread(target=lambda n=n: writer.add(n)) for n in range(200)]
    for thread in threads:
        thread.start()
        time.sleep(0.0005)
    for thread in threads:
        thread.join(10)
    writer.close()
    stored = [item for batch in writes for item in batch]
    assert sorted(stored) == list(range(200))  # every line, once
    assert len(writes) < 100  # many per write, not one write per line
    assert max(len(batch) for batch in writes) > 1


def test_a_line_finishing_alone_is_written_at_once():
    writes: list[list[str]] = []
    writer: LineWriter[str] = LineWriter(writes.append)
    writer.add("a")
    assert writes == [["a"]]  # nothing waits to fill a batch
    writer.add("b")
    assert writes == [["a"], ["b"]]


def test_close_waits_for_a_write_under_way():
    started, release = threading.Event(), threading.Event()
    writes: list[list[int]] = []

    def store(batch: list[int]) -> None:
        started.set()
        release.wait(5)
        writes.append(batch)

    writer: LineWriter[int] = LineWriter(store)
    adder = threading.Thread(target=writer.add, args=(1,))
    adder.start()
    started.wait(5)
    writer.add(2)  # queued behind the write under way
    closed = threading.Event()
    closer = threading.Thread(target=lambda: (writer.close(), closed.set()))
    closer.start()
    time.sleep(0.1)
    assert not closed.is_set()
    release.set()
    closer.join(5)
    adder.join(5)
    assert closed.is_set()
    assert writes == [[1], [2]]


def test_a_failed_write_raises_and_what_was_queued_is_written_on_close():
    calls: list[list[int]] = []

    def store(batch: list[int]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise ConnectionError("redis went away")

    writer: LineWriter[int] = LineWriter(store)
    with pytest.raises(ConnectionError):
        writer.add(1)
    writer.add(2)  # the writer is usable again: nothing is stuck "writing"
    writer.close()
    assert calls == [[1], [2]]
