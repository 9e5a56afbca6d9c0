"""The settings and catalog fields of model weights: defaults, parsing, and errors by name."""

from __future__ import annotations

import pytest

from config.settings import REPO_ROOT, SettingsError, load_settings
from runtimes.catalog import CatalogError, ModelCatalog
from runtimes.factory import build_model_weights
from runtimes.registry import RuntimeRegistry
from runtimes.storage import GB, default_prime_budget

REQUIRED = {"REDIS_URL": "redis://127.0.0.1:6390/0", "AUTH_KEYS_FILE": "/etc/gw/keys.json"}


def test_weights_settings_defaults_and_values():
    settings = load_settings(environ=dict(REQUIRED))
    assert settings.hf_endpoint is None
    assert settings.download_disk_margin_gb == 10.0
    assert settings.prime_budget_gb is None
    given = load_settings(environ={**REQUIRED, "HF_ENDPOINT": "http://127.0.0.1:9000",
                                   "DOWNLOAD_DISK_MARGIN_GB": "2.5", "PRIME_BUDGET_GB": "0"})
    assert given.hf_endpoint == "http://127.0.0.1:9000"
    assert (given.download_disk_margin_gb, given.prime_budget_gb) == (2.5, 0.0)


@pytest.mark.parametrize(("name", "value"), [
    ("HF_ENDPOINT", "huggingface.co"),
    ("DOWNLOAD_DISK_MARGIN_GB", "-1"),
    ("DOWNLOAD_DISK_MARGIN_GB", "lots"),
    ("PRIME_BUDGET_GB", "-2"),
])
def test_bad_weights_setting_is_named(name, value):
    with pytest.raises(SettingsError, match=name):
        load_settings(environ={**REQUIRED, name: value})


def test_every_weights_setting_is_documented():
    example = (REPO_ROOT / ".env.vllm.example").read_text()
    for name in ("HF_ENDPOINT=", "DOWNLOAD_DISK_MARGIN_GB=", "#PRIME_BUDGET_GB="):
        assert f"\n{name}" in example, name


def test_prime_budget_from_the_settings(redis_db):
    catalog = ModelCatalog.from_document({"models": []}, "sim")
    registry = RuntimeRegistry(redis_db)
    unset = build_model_weights(load_settings(environ=dict(REQUIRED)), redis_db, catalog,
                                registry)
    assert unset.config.prime_budget_bytes == default_prime_budget() > 0
    assert unset.config.download.disk_margin_bytes == 10 * GB
    off = build_model_weights(load_settings(environ={**REQUIRED, "PRIME_BUDGET_GB": "0"}),
                              redis_db, catalog, registry)
    assert off.config.prime_budget_bytes == 0


def test_download_weights_defaults_by_engine():
    entries = {"models": [
        {"id": "a/vllm", "engine": "vllm"},
        {"id": "a/sglang", "engine": "sglang"},
        {"id": "a/sim", "engine": "sim"},
        {"id": "a/sim-hub", "engine": "sim", "download_weights": True, "hf_repo": "org/x",
         "hf_allow_patterns": ["*.json"], "hf_ignore_patterns": ["tok*"]},
        {"id": "a/vllm-self", "engine": "vllm", "download_weights": False},
    ]}
    catalog = ModelCatalog.from_document(entries, "vllm")
    assert [s.download_weights for s in catalog] == [True, True, False, True, False]
    hub = catalog.get("a/sim-hub")
    assert (hub.repo_id, hub.hf_allow_patterns, hub.hf_ignore_patterns) == (
        "org/x", ("*.json",), ("tok*",))
    assert catalog.get("a/vllm").hf_allow_patterns is None
    with pytest.raises(CatalogError, match="hf_allow_patterns"):
        ModelCatalog.from_document({"models": [{"id": "x", "hf_allow_patterns": "*.json"}]},
                                   "sim")
