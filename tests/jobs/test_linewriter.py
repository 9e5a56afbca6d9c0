"""Group commit of finished lines (`jobs.linewriter.LineWriter`), with real threads."""

from __future__ import annotations

import threading
import time

import pytest

from jobs.linewriter import LineWriter


def test_lines_finishing_during_a_write_go_together_in_the_next():
    writes: list[list[int]] = []

    def store(batch: list[int]) -> None:
        time.sleep(0.02)  # a round trip
        writes.append(batch)

    writer: LineWriter[int] = LineWriter(store)
    numbers = []
    for n in range(200):
        numbers.append(writer.add(n))
        time.sleep(0.0005)
    assert numbers == list(range(1, 201))
    writer.wait(1, 200)
    stored = [item for batch in writes for item in batch]
    assert stored == list(range(200))  # every line, once, in order
    assert len(writes) < 100  # many per write, not one write per line
    assert max(len(batch) for batch in writes) > 1


def test_a_line_finishing_alone_is_written_at_once():
    writes: list[list[str]] = []
    writer: LineWriter[str] = LineWriter(writes.append)
    writer.wait(1, writer.add("a"))
    assert writes == [["a"]]  # nothing waited to fill a batch
    time.sleep(0.05)
    writer.wait(2, writer.add("b"))
    assert writes == [["a"], ["b"]]


def test_wait_returns_when_its_own_lines_are_written_while_others_keep_coming():
    """Chunks share a job's writer: one chunk must not wait for the lines of the others."""
    release = threading.Event()
    writes: list[list[int]] = []

    def store(batch: list[int]) -> None:
        if 99 in batch:
            release.wait(5)  # another chunk's line, written slowly
        writes.append(batch)

    writer: LineWriter[int] = LineWriter(store)
    mine = writer.add(1)
    writer.wait(mine, mine)
    time.sleep(0.05)
    writer.add(99)  # under way and stuck
    time.sleep(0.05)
    later = writer.add(2)
    waited = threading.Event()
    waiter = threading.Thread(target=lambda: (writer.wait(later, later), waited.set()))
    waiter.start()
    time.sleep(0.1)
    assert not waited.is_set()  # its line queues behind the write under way
    release.set()
    waiter.join(5)
    assert waited.is_set()
    assert writes == [[1], [99], [2]]


def test_a_failed_write_raises_in_the_chunks_whose_lines_it_held():
    calls: list[list[int]] = []

    def store(batch: list[int]) -> None:
        calls.append(batch)
        if len(calls) == 1:
            raise ConnectionError("redis went away")

    writer: LineWriter[int] = LineWriter(store)
    lost = writer.add(1)
    with pytest.raises(ConnectionError):
        writer.wait(lost, lost)
    kept = writer.add(2)  # the writer goes on: nothing is stuck "writing"
    writer.wait(kept, kept)
    assert calls == [[1], [2]]
