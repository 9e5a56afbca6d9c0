"""REDIS_URL as Sentinels: what start-up accepts, what it refuses (naming the variable), and the
URL Celery is given."""

from __future__ import annotations

import pytest

from config.redis_url import SentinelURL
from config.settings import SettingsError, load_settings
from tasks.celery_app import GatewayCelery
from tasks.sentinel_transport import SentinelTransport

KEYS = {"AUTH_KEYS_FILE": "/etc/gw/keys.json"}
URL = "sentinel://10.0.0.1:26379;sentinel://10.0.0.2;sentinel://10.0.0.3:26380/2"


def test_a_plain_url_has_no_sentinels():
    settings = load_settings(environ={**KEYS, "REDIS_URL": "redis://127.0.0.1:6379/0"})
    assert settings.redis_sentinel is None
    assert settings.redis_sentinel_master == "mymaster"


def test_a_sentinel_url_lists_every_sentinel_and_the_database():
    settings = load_settings(environ={**KEYS, "REDIS_URL": URL, "REDIS_SENTINEL_MASTER": "gw"})
    assert settings.redis_sentinel == SentinelURL(
        (("10.0.0.1", 26379), ("10.0.0.2", 26379), ("10.0.0.3", 26380)), db=2)
    assert settings.redis_sentinel_master == "gw"


def test_the_master_password_comes_from_an_entry_and_stays_out_of_repr():
    settings = load_settings(
        environ={**KEYS, "REDIS_URL": "sentinel://:s3cret@h1:26379;sentinel://h2:26379/0"})
    assert settings.redis_sentinel.password == "s3cret"
    assert "s3cret" not in repr(settings.redis_sentinel)


@pytest.mark.parametrize("url", [
    "sentinel://h1:26379;redis://h2:6379/0",  # a plain Redis among the Sentinels
    "sentinel://h1:26379/1;sentinel://h2:26379/2",  # two databases
    "sentinel://h1:26379/zero",
    "sentinel://h1:notaport",
    "sentinel://",
])
def test_a_malformed_sentinel_url_names_the_variable(url: str):
    with pytest.raises(SettingsError, match="REDIS_URL"):
        load_settings(environ={**KEYS, "REDIS_URL": url})


def test_a_bad_master_name_names_the_variable():
    with pytest.raises(SettingsError, match="REDIS_SENTINEL_MASTER"):
        load_settings(environ={**KEYS, "REDIS_URL": URL, "REDIS_SENTINEL_MASTER": "a b"})


def test_celery_gets_the_sentinel_transport_with_the_master_name():
    settings = load_settings(environ={**KEYS, "REDIS_URL": URL, "REDIS_SENTINEL_MASTER": "gw"})
    conf = GatewayCelery(settings).conf
    expected = ("sentinel://10.0.0.1:26379/2;sentinel://10.0.0.2:26379/2;"
                "sentinel://10.0.0.3:26380/2")
    assert conf.broker_url == expected and conf.result_backend == expected
    assert conf.broker_transport_options["master_name"] == "gw"
    # What celeryconfig sets stays.
    assert conf.broker_transport_options["queue_order_strategy"] == "priority"
    assert conf.result_backend_transport_options["master_name"] == "gw"


def test_the_broker_uses_the_transport_that_survives_a_failover():
    settings = load_settings(environ={**KEYS, "REDIS_URL": URL})
    with GatewayCelery(settings).connection_for_write() as connection:
        assert isinstance(connection.transport, SentinelTransport)
        connection.switch(connection.alt[1])  # kombu moving on to the next Sentinel
        assert isinstance(connection.transport, SentinelTransport)


def test_celery_on_one_redis_is_as_before():
    settings = load_settings(environ={**KEYS, "REDIS_URL": "redis://127.0.0.1:6379/3"})
    conf = GatewayCelery(settings).conf
    assert conf.broker_url == "redis://127.0.0.1:6379/3"
    assert "master_name" not in conf.broker_transport_options
