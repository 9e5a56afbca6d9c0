"""Keys file reload through the running gateway: file change, SIGHUP, bad edits, no failed calls."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import psutil
import pytest

from tests.conftest import keys_document, raw_post, warm
from tests.harness import wait_for

BODY = {"model": "sim/fast", "prompt": "x", "max_tokens": 1}


@pytest.fixture
def restore_keys(keys_file):
    original = keys_file.read_text()
    yield keys_file
    keys_file.write_text(original)
    time.sleep(2.5)  # let every web worker pick the original keys up again


def _write(path, document) -> None:
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(document))
    tmp.replace(path)  # as an editor or a config tool does: an atomic replace


def test_a_new_key_works_within_five_seconds_and_no_call_fails_meanwhile(stack, restore_keys):
    warm(stack, "sim/fast")
    new_token = "freshly-added-token-123"
    assert raw_post(stack, "/v1/completions", BODY, token=new_token).status == 401

    failures: list[int] = []
    stop = threading.Event()

    def steady_traffic():
        while not stop.is_set():
            status = raw_post(stack, "/v1/completions", BODY).status
            if status != 200:
                failures.append(status)

    threads = [threading.Thread(target=steady_traffic) for _ in range(4)]
    for thread in threads:
        thread.start()
    document = keys_document()
    document["keys"].append({"name": "fresh", "token": new_token, "scopes": ["realtime"]})
    _write(restore_keys, document)
    changed = time.monotonic()
    # Both web workers must have it: ask enough times to hit each.
    wait_for(lambda: all(raw_post(stack, "/v1/completions", BODY, token=new_token).status == 200
                         for _ in range(6)), 5, interval=0.1, what="the new key")
    assert time.monotonic() - changed < 5
    stop.set()
    for thread in threads:
        thread.join()
    assert failures == []


def test_a_bad_edit_keeps_the_previous_keys(stack, restore_keys):
    restore_keys.write_text("{ this is not json")
    time.sleep(2.5)
    assert raw_post(stack, "/v1/completions", BODY).status == 200
    _write(restore_keys, {"keys": [{"name": "x", "scopes": ["realtime"]}]})  # no token
    time.sleep(2.5)
    assert raw_post(stack, "/v1/completions", BODY).status == 200
    log = stack.log_path("web").read_text(errors="replace")
    assert "keeping the previous keys" in log
    assert "not valid JSON" in log and "give exactly one of token or sha256" in log


def test_a_removed_key_stops_working(stack, restore_keys):
    document = keys_document()
    document["keys"] = [k for k in document["keys"] if k["name"] != "test-realtime"]
    _write(restore_keys, document)
    wait_for(lambda: all(raw_post(stack, "/v1/completions", BODY).status == 401
                         for _ in range(6)), 5, interval=0.1, what="the key to be revoked")


def test_sighup_rereads_the_keys_without_a_restart(stack, restore_keys):
    original = json.dumps(keys_document())
    document = keys_document()
    document["keys"].append({"name": "hup", "token": "token-via-sighup-1", "scopes": ["realtime"]})
    changed = json.dumps(document)
    # Same inode, size and mtime before and after the edit, so only SIGHUP can reveal it.
    restore_keys.write_text(original + " " * (len(changed) - len(original)))
    time.sleep(1.5)
    for _ in range(12):  # workers look at the file when asked: make each one look now
        raw_post(stack, "/v1/completions", BODY)
    stat = os.stat(restore_keys)
    with open(restore_keys, "r+") as fh:
        fh.write(changed)
    os.utime(restore_keys, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    time.sleep(2.5)
    assert raw_post(stack, "/v1/completions", BODY, token="token-via-sighup-1").status == 401

    master = psutil.Process(stack.procs["web"].pid)
    workers = sorted(w.pid for w in master.children())
    for pid in workers:
        os.kill(pid, signal.SIGHUP)
    wait_for(lambda: all(raw_post(stack, "/v1/completions", BODY,
                                  token="token-via-sighup-1").status == 200 for _ in range(6)),
             5, interval=0.1, what="the key read on SIGHUP")
    assert sorted(w.pid for w in master.children()) == workers
