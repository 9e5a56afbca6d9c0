"""The pieces behind the dashboard, against a real Redis: chart series, queue keys, log lines."""

from __future__ import annotations

import json
import logging

import kombu
import pytest
from flask import Flask

import celeryconfig
from config.logs import JsonFormatter, RequestIdFilter
from services.timeseries import BUCKET_SECONDS, SeriesRecorder, latency_bin, percentile
from tasks.broker import BrokerStats, api_priority, celery_priority
from webapp.request_id import current_request_id, register_request_id

NOW = 1_700_000_000.0  # a bucket boundary: 170_000_000 * 10


def test_percentiles_from_bins_are_close_to_the_exact_ones():
    values = [0.010 + i * 0.001 for i in range(1000)]  # 10 ms .. 1009 ms, evenly
    bins: dict[int, int] = {}
    for v in values:
        bins[latency_bin(v)] = bins.get(latency_bin(v), 0) + 1
    assert percentile(bins, 0.5) == pytest.approx(0.51, rel=0.2)
    assert percentile(bins, 0.95) == pytest.approx(0.96, rel=0.2)
    assert percentile({}, 0.5) is None


def test_series_add_up_across_workers_and_buckets(redis_db):
    depths = {"pending|m1": 7, "celery|9": 2, "celery|0": 0}
    one, two = SeriesRecorder(redis_db), SeriesRecorder(redis_db)
    sample_one, sample_two = (lambda: dict(depths)), (lambda: {"pending|m1": 999})
    for _ in range(30):
        one.request("m1", 0.100, None, 200)
    for _ in range(10):
        two.request("m1", 0.100, 0.020, 200)
    two.request("m2", 0.001, None, 503)
    one.flush(NOW + 1, sample_one)
    two.flush(NOW + 2, sample_two)  # the same bucket: its sample was taken by `one` already
    one.request("m1", 2.0, None, 200)
    one.flush(NOW + BUCKET_SECONDS + 1, sample_one)
    one.engine_started("m1", "cold", 4.0, now=NOW + 3)
    one.engine_started("m1", "cold", 6.0, now=NOW + 4)

    series = one.read(60, now=NOW + BUCKET_SECONDS + 5)
    assert len(series["t"]) == 6
    i = series["t"].index(int(NOW))
    assert series["rps"]["m1"][i] == pytest.approx(40 / BUCKET_SECONDS)
    assert series["rps"]["m2"][i] == pytest.approx(0.1)
    assert series["errors_per_s"][i] == pytest.approx(0.1)
    # Read back from bins 1.5 times wide: within a bin's width of the true value.
    assert series["latency_p50"][i] == pytest.approx(0.1, rel=0.5)
    assert series["ttft_p95"][i] == pytest.approx(0.02, rel=0.5)
    # The current bucket's rate is over the 5 s gone by.
    assert series["rps"]["m1"][i + 1] == pytest.approx(1 / 5)
    assert series["latency_p50"][i + 1] == pytest.approx(2.0, rel=0.5)
    assert series["cold_starts"]["m1"][i] == 2
    assert series["start_seconds"]["m1"][i] == pytest.approx(5.0)
    assert series["pending"]["m1"][i] == 7  # one sample a bucket, from the first to claim it
    assert series["pending_total"][i] == 7
    assert series["celery"]["9"][i] == 2
    assert series["pending"]["m1"][i - 1] is None  # not sampled: a gap, not a zero
    assert series["latency_p50"][i - 1] is None
    assert redis_db.ttl(one.key(int(NOW // BUCKET_SECONDS))) > 3600


def test_a_failing_sampler_never_stops_the_reporter(redis_db, caplog):
    def broken():
        raise KeyError("celery")

    recorder = SeriesRecorder(redis_db)
    recorder.request("m1", 0.1, None, 200)
    with caplog.at_level(logging.ERROR):
        recorder.flush(NOW, broken)  # must not raise
    assert "chart series not written" in caplog.text


def test_queue_keys_match_what_kombu_writes(redis_server, redis_db):
    """Publish with kombu's Redis transport and our settings; find each message by priority."""
    options = celeryconfig.broker_transport_options
    with kombu.Connection(f"{redis_server.url}/1", transport_options=options) as connection:
        queue = kombu.Queue("batch", routing_key="batch")
        producer = connection.Producer(serializer="json")
        for step in (0, 0, 2, 9):
            producer.publish({"x": 1}, routing_key="batch", declare=[queue],
                             priority=step)
        producer.publish({"x": 1}, routing_key="control",
                         declare=[kombu.Queue("control", routing_key="control")])
    broker = BrokerStats(redis_db, options)
    lengths = broker.queue_lengths()
    assert lengths["batch"][0] == 2 and lengths["batch"][2] == 1 and lengths["batch"][9] == 1
    assert sum(lengths["batch"].values()) == 4
    assert sum(lengths["control"].values()) == 1
    # The API's priority 9 runs first: it is Celery's 0, both ways.
    assert api_priority(0) == 9 and api_priority(9) == 0
    assert celery_priority(9) == 0 and celery_priority(0) == 9 and celery_priority(42) == 0
    assert broker.batch_by_priority() == {9: 2, 7: 1, 0: 1, **{p: 0 for p in range(1, 7)}, 8: 0}


def _format(formatter: logging.Formatter) -> str:
    handler = logging.StreamHandler()
    handler.addFilter(RequestIdFilter(current_request_id))
    handler.setFormatter(formatter)
    record = logging.LogRecord("webapp.test", logging.INFO, __file__, 1, "hello %s", ("x",),
                               None)
    assert handler.filter(record)
    return handler.format(record)


def test_log_lines_carry_the_request_id():
    app = Flask(__name__)
    register_request_id(app)
    with app.test_request_context(headers={"X-Request-Id": "rid-123"}):
        app.preprocess_request()
        entry = json.loads(_format(JsonFormatter()))
        assert entry["request_id"] == "rid-123" and entry["message"] == "hello x"
        text = _format(logging.Formatter("rid=%(request_id)s: %(message)s"))
        assert text == "rid=rid-123: hello x"
    # Outside a request (a Celery task, the usage reporter): no id, and no error.
    assert "request_id" not in json.loads(_format(JsonFormatter()))
    assert _format(logging.Formatter("rid=%(request_id)s")) == "rid=-"
