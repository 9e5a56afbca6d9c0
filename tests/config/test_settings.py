"""Settings from the environment (and a `.env` file) and the model catalog: what start-up accepts,
the defaults it applies, and errors that name the variable or the catalog entry at fault."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from config.settings import (
    CHECKOUT_ENV_FILE,
    REPO_ROOT,
    Settings,
    SettingsError,
    load_settings,
)
from runtimes.catalog import CatalogError, ModelCatalog
from runtimes.engines import ENGINES

REQUIRED = {"REDIS_URL": "redis://127.0.0.1:6390/0", "AUTH_KEYS_FILE": "/etc/gw/keys.json"}
EXAMPLE_CATALOG = REPO_ROOT / "config" / "models.example.json"
GEMMA = "synquid/gemma-3-27b-it-FP8"
MISTRAL = "mistralai/Mistral-7B-Instruct-v0.1"
E5 = "intfloat/e5-mistral-7b-instruct"
LORA = "acme/mistral-support-lora"


# ---------------------------------------------------------------- settings


@pytest.mark.parametrize("missing", sorted(REQUIRED))
def test_missing_required_variable_is_named(missing: str):
    environ = {k: v for k, v in REQUIRED.items() if k != missing}
    with pytest.raises(SettingsError) as error:
        load_settings(environ=environ)
    assert missing in str(error.value)


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("RUNTIME_TYPE", "tgi"),
        ("RUNTIME_BACKEND", "kubernetes"),
        ("IDLE_TIMEOUT_SECONDS", "soon"),
        ("IDLE_TIMEOUT_SECONDS", "0"),
        ("MAX_REQUEST_BYTES", "1.5"),
        ("AUTOSCALE_INTERVAL_SECONDS", "0.01"),
        ("LOG_LEVEL", "chatty"),
        ("KEEP_RUNTIMES_ON_EXIT", "perhaps"),
    ],
)
def test_bad_value_is_named(name: str, value: str):
    with pytest.raises(SettingsError) as error:
        load_settings(environ={**REQUIRED, name: value})
    assert name in str(error.value)


def test_defaults_are_applied():
    settings = load_settings(environ=dict(REQUIRED))
    assert isinstance(settings, Settings)
    assert settings.redis_url == REQUIRED["REDIS_URL"]
    assert settings.auth_keys_file == Path(REQUIRED["AUTH_KEYS_FILE"])
    assert settings.model_catalog_file == EXAMPLE_CATALOG
    assert (settings.runtime_type, settings.runtime_backend) == ("vllm", "docker")
    assert settings.runtime_image is None
    assert settings.runtime_host == "127.0.0.1"
    assert settings.runtime_state_dir == REPO_ROOT / "var" / "runtimes"
    assert settings.keep_runtimes_on_exit is False
    assert settings.hf_home.parts[-2:] == (".cache", "huggingface")
    assert settings.hf_token is None
    assert settings.idle_timeout_seconds == 600.0
    assert settings.cold_start_hold_seconds == 0.0
    assert settings.default_start_seconds == 120.0
    assert settings.start_timeout_seconds == 1800.0
    assert settings.autoscale_interval_seconds == 5.0
    assert settings.restart_backoff_seconds == 5.0
    assert settings.max_request_bytes == 8 * 1024 * 1024
    assert settings.upstream_pool_size == 1024
    assert settings.keys_reload_interval_seconds == 2.0
    assert settings.registry_cache_seconds == 0.5
    assert (settings.log_level, settings.log_json) == ("INFO", False)


def test_given_values_are_parsed():
    settings = load_settings(environ={
        **REQUIRED, "RUNTIME_TYPE": "sim", "RUNTIME_BACKEND": "process",
        "IDLE_TIMEOUT_SECONDS": "42.5", "KEEP_RUNTIMES_ON_EXIT": "true", "HF_TOKEN": "hf_x",
        "RUNTIME_IMAGE": "", "MAX_REQUEST_BYTES": "2048",
    })
    assert (settings.runtime_type, settings.runtime_backend) == ("sim", "process")
    assert settings.idle_timeout_seconds == 42.5
    assert settings.keep_runtimes_on_exit is True
    assert settings.hf_token == "hf_x"
    assert "hf_x" not in repr(settings)  # kept out of logs
    assert settings.runtime_image is None  # empty means unset
    assert settings.max_request_bytes == 2048


def test_env_file_fills_unset_variables_only(tmp_path: Path):
    env_file = tmp_path / ".env"
    env_file.write_text(
        "REDIS_URL=redis://from-file:6379/0\n"
        "AUTH_KEYS_FILE=/from/file/keys.json\n"
        "IDLE_TIMEOUT_SECONDS=77\n"
        "RUNTIME_TYPE=sim\n"
    )
    environ = {"REDIS_URL": "redis://from-environment:6379/0", "RUNTIME_TYPE": "sglang"}
    before = dict(os.environ)
    settings = load_settings(environ=environ, env_file=env_file)
    assert settings.redis_url == "redis://from-environment:6379/0"  # set: not overridden
    assert settings.runtime_type == "sglang"
    assert settings.auth_keys_file == Path("/from/file/keys.json")  # unset: filled
    assert settings.idle_timeout_seconds == 77.0
    assert dict(os.environ) == before  # nothing leaks into the process environment
    assert environ == {"REDIS_URL": "redis://from-environment:6379/0", "RUNTIME_TYPE": "sglang"}


def test_env_file_bad_value_is_named(tmp_path: Path):
    env_file = tmp_path / ".env"
    env_file.write_text("START_TIMEOUT_SECONDS=forever\n")
    with pytest.raises(SettingsError) as error:
        load_settings(environ=dict(REQUIRED), env_file=env_file)
    assert "START_TIMEOUT_SECONDS" in str(error.value)


def test_no_env_file_means_the_checkout_defaults(tmp_path: Path):
    """As `make run` without a .env: config/checkout.env stands in for the missing file."""
    missing = tmp_path / "no.env"
    before = dict(os.environ)
    settings = load_settings(environ={}, env_file=missing)
    assert (settings.runtime_type, settings.runtime_backend) == ("sim", "process")
    assert settings.auth_keys_file == Path("config/example.keys.json")
    assert settings.redis_url == "redis://127.0.0.1:6379/0"
    assert dict(os.environ) == before
    # The environment still wins over them.
    settings = load_settings(environ={"RUNTIME_BACKEND": "docker"}, env_file=missing)
    assert (settings.runtime_type, settings.runtime_backend) == ("sim", "docker")
    # A .env that exists replaces them all: what it lacks gets the ordinary defaults, or stops
    # start-up when required.
    present = tmp_path / ".env"
    present.write_text("REDIS_URL=redis://10.0.0.5:6379/0\n")
    with pytest.raises(SettingsError) as error:
        load_settings(environ={}, env_file=present)
    assert "AUTH_KEYS_FILE" in str(error.value)
    present.write_text("REDIS_URL=redis://10.0.0.5:6379/0\nAUTH_KEYS_FILE=/etc/gw/keys.json\n")
    settings = load_settings(environ={}, env_file=present)
    assert (settings.runtime_type, settings.runtime_backend) == ("vllm", "docker")


def test_checkout_defaults_stay_out_of_images():
    """The orchestrator image must not start on the example keys: .dockerignore leaves the file
    out of the build context (and setup.cfg's package data, `*.json`, out of packages)."""
    assert CHECKOUT_ENV_FILE.is_file()
    ignored = (REPO_ROOT / ".dockerignore").read_text().splitlines()
    assert str(CHECKOUT_ENV_FILE.relative_to(REPO_ROOT)) in ignored


# ---------------------------------------------------------------- model catalog


def test_example_catalog_on_vllm():
    catalog = ModelCatalog.from_file(EXAMPLE_CATALOG, "vllm")
    assert {spec.id for spec in catalog} == {GEMMA, MISTRAL, E5}
    gemma, mistral = catalog.get(GEMMA), catalog.get(MISTRAL)
    assert gemma.engine == mistral.engine == "vllm"
    assert (gemma.kind, mistral.kind, catalog.get(E5).kind) == ("generate", "generate",
                                                                "embedding")
    assert gemma.args == ("--max-model-len", "16384", "--gpu-memory-utilization", "0.90",
                          "--enable-sleep-mode", "--scheduling-policy", "priority")
    assert mistral.args[:2] == ("--max-model-len", "8192")
    assert (gemma.expected_start_seconds, mistral.expected_start_seconds) == (240, 90)
    assert (gemma.idle_timeout_seconds, mistral.idle_timeout_seconds) == (900, 600)
    assert (gemma.gpus, gemma.weights_gb, gemma.repo_id) == (1, 29.5, GEMMA)
    assert (gemma.min_replicas, gemma.max_replicas) == (0, 1)
    assert GEMMA in catalog and "nope/model" not in catalog and len(catalog) == 3
    # The example adapter is no model of its own: its base's engines serve it, with LoRA on.
    assert LORA not in catalog and catalog.get(LORA) is None
    adapter = catalog.adapter(LORA)
    assert (adapter.base, adapter.hf_repo, adapter.path) == (MISTRAL, LORA, None)
    assert mistral.serves_adapters and not gemma.serves_adapters
    assert (mistral.max_loras, mistral.max_lora_rank) == (4, 16)


def test_example_catalog_on_sim():
    catalog = ModelCatalog.from_file(EXAMPLE_CATALOG, "sim")
    gemma, mistral = catalog.get(GEMMA), catalog.get(MISTRAL)
    assert gemma.engine == mistral.engine == "sim"
    assert gemma.args[:2] == ("--load-seconds", "4")
    assert mistral.args[:2] == ("--load-seconds", "2")
    assert "--enable-sleep-mode" not in gemma.args
    assert (gemma.expected_start_seconds, mistral.expected_start_seconds) == (5, 3)


def test_fingerprint_follows_the_engine_and_the_entry():
    on_vllm = ModelCatalog.from_file(EXAMPLE_CATALOG, "vllm")
    on_sim = ModelCatalog.from_file(EXAMPLE_CATALOG, "sim")
    again = ModelCatalog.from_file(EXAMPLE_CATALOG, "vllm")
    assert on_vllm.get(GEMMA).fingerprint == again.get(GEMMA).fingerprint
    assert on_vllm.get(GEMMA).fingerprint != on_sim.get(GEMMA).fingerprint
    assert on_vllm.get(GEMMA).fingerprint != on_vllm.get(MISTRAL).fingerprint

    document = json.loads(EXAMPLE_CATALOG.read_text())
    document["models"][0]["idle_timeout_seconds"] = 901
    edited = ModelCatalog.from_document(document, "vllm")
    assert edited.get(GEMMA).fingerprint != on_vllm.get(GEMMA).fingerprint
    assert edited.get(MISTRAL).fingerprint == on_vllm.get(MISTRAL).fingerprint


def test_engine_flags_of_kind_and_adapters():
    """An embedding model starts with vLLM's pooling runner (SGLang: --is-embedding); a base of
    adapters with LoRA enabled at run time, its bounds from the catalog; the operator's own
    engine_args win over both."""
    catalog = ModelCatalog.from_file(EXAMPLE_CATALOG, "vllm")
    e5 = catalog.get(E5)
    argv = ENGINES["vllm"].launch(e5, "127.0.0.1", 8000, in_container=False).argv
    assert argv[argv.index("--runner") + 1] == "pooling"
    launch = ENGINES["vllm"].launch(catalog.get(MISTRAL), "127.0.0.1", 8001, in_container=False)
    assert "--enable-lora" in launch.argv
    assert launch.argv[launch.argv.index("--max-loras") + 1] == "4"
    assert launch.argv[launch.argv.index("--max-lora-rank") + 1] == "16"
    assert launch.env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert launch.env["VLLM_ENABLE_RESPONSES_API_STORE"] == "1"
    gemma = ENGINES["vllm"].launch(catalog.get(GEMMA), "127.0.0.1", 8002, in_container=False)
    assert "--enable-lora" not in gemma.argv and "--runner" not in gemma.argv
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in gemma.env

    sglang = ModelCatalog.from_file(EXAMPLE_CATALOG, "sglang")
    argv = ENGINES["sglang"].launch(sglang.get(E5), "127.0.0.1", 8000, in_container=False).argv
    assert "--is-embedding" in argv and "--runner" not in argv
    argv = ENGINES["sglang"].launch(sglang.get(MISTRAL), "h", 1, in_container=False).argv
    assert argv[argv.index("--max-loras-per-batch") + 1] == "4"

    own = ModelCatalog.from_document({"models": [
        {"id": "e", "kind": "embedding", "engine_args": {"vllm": ["--runner", "pooling",
                                                                  "--max-loras", "2"]}},
        {"id": "b", "engine_args": {"vllm": ["--max-loras", "2"]}},
        {"id": "b/lora", "base": "b", "path": "/adapters/b"}]}, "vllm")
    argv = ENGINES["vllm"].launch(own.get("e"), "h", 1, in_container=False).argv
    assert argv.count("--runner") == 1
    argv = ENGINES["vllm"].launch(own.get("b"), "h", 1, in_container=False).argv
    assert argv.count("--max-loras") == 1 and argv[argv.index("--max-loras") + 1] == "2"
    # The gateway keeps as many loaded as the engine's own flag says.
    assert ENGINES["vllm"].max_loras(own.get("b")) == 2
    assert ENGINES["vllm"].max_loras(catalog.get(MISTRAL)) == 4


def test_adapters_change_their_base_fingerprint_once():
    document = json.loads(EXAMPLE_CATALOG.read_text())
    with_one = ModelCatalog.from_document(document, "vllm")
    document["models"].append({"id": "acme/second-lora", "base": MISTRAL, "path": "/x"})
    with_two = ModelCatalog.from_document(document, "vllm")
    document["models"] = [m for m in document["models"] if "base" not in m]
    without = ModelCatalog.from_document(document, "vllm")
    assert with_one.get(MISTRAL).fingerprint == with_two.get(MISTRAL).fingerprint
    assert with_one.get(MISTRAL).fingerprint != without.get(MISTRAL).fingerprint
    assert with_one.get(GEMMA).fingerprint == without.get(GEMMA).fingerprint
    assert [a.id for a in with_two.adapters()] == [LORA, "acme/second-lora"]


def test_upstreams_and_fallbacks():
    catalog = ModelCatalog.from_document({"models": [
        {"id": "here", "fallback": "there"},
        {"id": "there", "upstream": {"base_url": "https://api.example.com/v1",
                                     "api_key_env": "THERE_KEY"}},
    ]}, "vllm")
    there = catalog.get("there")
    assert (there.upstream_url, there.upstream_key_env) == ("https://api.example.com/v1",
                                                            "THERE_KEY")
    assert there.download_weights is False  # nothing of it is fetched or started here
    assert catalog.get("here").fallback == "there" and catalog.get("here").upstream_url is None
    for models, complaint in (
            ([{"id": "a", "fallback": "nowhere"}], "'nowhere' is not another model"),
            ([{"id": "a", "fallback": "a"}], "'a' is not another model"),
            ([{"id": "a", "fallback": "e"}, {"id": "e", "kind": "embedding"}],
             "is a embedding model"),
            ([{"id": "a", "upstream": {"base_url": "http://x:1/v1"}, "fallback": "b"},
              {"id": "b"}], "takes no fallback")):
        with pytest.raises(CatalogError, match=complaint):
            ModelCatalog.from_document({"models": models}, "vllm", source="t.json")


def test_explicit_engine_and_plain_seconds():
    catalog = ModelCatalog.from_document({"models": [
        {"id": "a", "engine": "sglang", "expected_start_seconds": 12,
         "engine_args": {"sglang": ["--tp", "2"], "vllm": ["--x"]}, "env": {"B": "2", "A": "1"}},
        {"id": "b", "expected_start_seconds": {"sim": 1}},
    ]}, "vllm")
    a, b = catalog.get("a"), catalog.get("b")
    assert (a.engine, a.args, a.expected_start_seconds) == ("sglang", ("--tp", "2"), 12)
    assert a.env == (("A", "1"), ("B", "2"))
    assert (b.engine, b.args, b.expected_start_seconds) == ("vllm", (), None)


VALID = {"id": "ok/model", "gpus": 0}


@pytest.mark.parametrize(
    ("entries", "index", "name", "complaint"),
    [
        ([VALID, {"id": "bad/gpus", "gpus": "two"}], 1, "bad/gpus", "gpus"),
        ([{"id": "bad/engine", "engine": "tgi"}], 0, "bad/engine", "engine"),
        ([VALID, {"id": "bad/args", "engine_args": {"tgi": ["--x"]}}], 1, "bad/args",
         "engine_args"),
        ([{"id": "bad/expected", "expected_start_seconds": {"tgi": 3}}], 0, "bad/expected",
         "expected_start_seconds"),
        ([{"id": "bad/expected", "expected_start_seconds": -1}], 0, "bad/expected",
         "expected_start_seconds"),
        ([VALID, {"id": "dup"}, {"id": "dup", "gpus": 2}], 2, "dup", "duplicate id"),
        ([{"id": "bad/replicas", "min_replicas": 2, "max_replicas": 1}], 0, "bad/replicas",
         "min_replicas > max_replicas"),
        ([VALID, VALID], 1, "ok/model", "duplicate id"),
        ([{"id": "bad/kind", "kind": "rerank"}], 0, "bad/kind", "kind"),
        ([VALID, {"id": "a/lora", "base": "no/such", "path": "/a"}], 1, "a/lora",
         "base 'no/such' is not a model of the catalog"),
        ([{"id": "e", "kind": "embedding"}, {"id": "e/lora", "base": "e", "path": "/a"}], 1,
         "e/lora", "embedding model"),
        ([VALID, {"id": "a/lora", "base": "ok/model"}], 1, "a/lora", "'path' or 'hf_repo'"),
        ([VALID, {"id": "a/lora", "base": "ok/model", "path": "/a", "hf_repo": "a/b"}], 1,
         "a/lora", "'path' or 'hf_repo'"),
        ([VALID, {"id": "ok/model", "base": "ok/model", "path": "/a"}], 1, "ok/model",
         "duplicate id"),
        ([VALID, {"id": "a/lora", "base": 3, "path": "/a"}], 1, "a/lora", "base"),
        ([{"id": "up", "upstream": {"base_url": "ftp://x/v1"}}], 0, "up", "base_url"),
        ([{"id": "up", "upstream": {"api_key_env": "K"}}], 0, "up", "base_url"),
        ([{"id": "up", "upstream": {"base_url": "http://x:1/v1", "api_key_env": "A KEY"}}], 0,
         "up", "api_key_env"),
    ],
)
def test_malformed_entry_is_named(entries, index, name, complaint):
    with pytest.raises(CatalogError) as error:
        ModelCatalog.from_document({"models": entries}, "sim", source="test.json")
    message = str(error.value)
    assert f"entry {index} ({name})" in message
    assert complaint in message
    assert "test.json" in message


def test_entry_without_an_id_is_named_by_index():
    with pytest.raises(CatalogError) as error:
        ModelCatalog.from_document({"models": [VALID, {"gpus": 1}]}, "sim")
    message = str(error.value)
    assert "entry 1:" in message and "'id'" in message and "ok/model" not in message


@pytest.mark.parametrize("document", [{}, {"models": {}}, [], {"models": None}])
def test_document_without_a_models_list(document):
    with pytest.raises(CatalogError, match=r'expected \{"models"'):
        ModelCatalog.from_document(document, "sim")


def test_invalid_json_file(tmp_path: Path):
    path = tmp_path / "models.json"
    path.write_text('{"models": [ {"id": "x",, } ]}')
    with pytest.raises(CatalogError) as error:
        ModelCatalog.from_file(path, "sim")
    assert str(path) in str(error.value) and "not valid JSON" in str(error.value)


def test_missing_catalog_file(tmp_path: Path):
    path = tmp_path / "absent.json"
    with pytest.raises(CatalogError) as error:
        ModelCatalog.from_file(path, "sim")
    assert str(path) in str(error.value) and "cannot read" in str(error.value)
