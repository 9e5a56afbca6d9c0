"""LoRA adapters on the sim engine, the way vLLM 0.32.0 serves them (`--enable-lora`).

vLLM's surface, mirrored here (measured on the CPU build; docs/SIM_VS_VLLM.md):

- `--enable-lora`, `--max-loras N` (adapters in one batch), `--max-lora-rank R` (one of vLLM's
  allowed ranks), `--max-cpu-loras` and `--lora-modules name=path|JSON ...` (loaded at start).
- `POST /v1/load_lora_adapter` {"lora_name", "lora_path"} and `POST /v1/unload_lora_adapter`
  {"lora_name"} exist only when the environment has VLLM_ALLOW_RUNTIME_LORA_UPDATING set to
  "1" or "true" (any case); otherwise they answer 404 `{"detail": "Not Found"}` (FastAPI's
  unknown route) whether or not `--enable-lora` is given. Success is 200 with a plain-text
  sentence; a refusal is vLLM's error body (`InvalidUserInput`, `NotFoundError`, or the
  `InternalServerError` an adapter the engine rejects gets).
- vLLM does not bound how many adapters are registered: `--max-loras` bounds how many serve in
  one batch and `--max-cpu-loras` how many the worker keeps loaded (it drops the least recently
  used and reloads it from its path when asked). So a load over `--max-loras` succeeds here too.
- A registered adapter is listed by /v1/models (id its name, `root` the path as given, `parent`
  the base model) and is a model name completions and chat accept; the answer names it.

The adapter files are read as vLLM reads them: `adapter_config.json` (its rank `r`, and any
`rank_pattern`) and `adapter_model.safetensors` (or .bin/.pt), found at a path or, for a repo id,
in the HF cache at $HF_HOME.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from runtimes.sim.fields import ApiError, lax_bool, validation_error
from runtimes.sim.protocol import read_json_object
from runtimes.storage import RepoCache

RUNTIME_UPDATING_ENV = "VLLM_ALLOW_RUNTIME_LORA_UPDATING"
MAX_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's MaxLoRARanks
_WEIGHT_FILES = ("adapter_model.safetensors", "adapter_model.bin", "adapter_model.pt")


@dataclass(frozen=True, slots=True)
class LoraOptions:
    """The LoRA part of the command line, and whether the load/unload routes exist."""

    enabled: bool = False  # --enable-lora
    max_loras: int = 1
    max_lora_rank: int = 16
    max_cpu_loras: int | None = None
    modules: tuple[tuple[str, str], ...] = ()  # --lora-modules: (name, path)
    runtime_updating: bool = False  # VLLM_ALLOW_RUNTIME_LORA_UPDATING


def add_lora_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--enable-lora", action="store_true", help="serve LoRA adapters")
    parser.add_argument("--max-loras", type=int, default=1,
                        help="vLLM's: adapters in one batch (not a bound on registered ones)")
    parser.add_argument("--max-lora-rank", type=int, choices=MAX_LORA_RANKS, default=16,
                        help="adapters of a higher rank are refused")
    parser.add_argument("--max-cpu-loras", type=int, default=None,
                        help="vLLM's: adapters its worker keeps loaded (default --max-loras)")
    parser.add_argument("--lora-modules", nargs="+", type=_module, default=None,
                        metavar="NAME=PATH",
                        help='adapters loaded at start: name=path or JSON {"name","path"}')


def lora_options(args: argparse.Namespace, environ: dict[str, str] | None = None) -> LoraOptions:
    environ = os.environ if environ is None else environ
    if args.max_loras < 1:
        raise SystemExit("sim engine: error: --max-loras must be >= 1")
    if args.max_cpu_loras is not None and args.max_cpu_loras < args.max_loras:
        raise SystemExit(f"sim engine: error: max_cpu_loras ({args.max_cpu_loras}) must be >= "
                         f"max_loras ({args.max_loras}).")
    return LoraOptions(
        enabled=args.enable_lora,
        max_loras=args.max_loras,
        max_lora_rank=args.max_lora_rank,
        max_cpu_loras=args.max_cpu_loras,
        modules=tuple(module for module in args.lora_modules or () if module),
        runtime_updating=environ.get(RUNTIME_UPDATING_ENV, "0").strip().lower() in ("1", "true"),
    )


def _module(item: str) -> tuple[str, str] | None:
    """One --lora-modules item, read as vLLM's LoRAParserAction reads it (empty: skipped)."""
    if not item:
        return None
    if "=" in item and "," not in item:
        name, path = item.split("=", 1)
        return name, path
    try:
        module = json.loads(item)
        return str(module["name"]), str(module["path"])
    except (ValueError, KeyError, TypeError):
        raise argparse.ArgumentTypeError(f"Invalid JSON format for --lora-modules: {item}") \
            from None


@dataclass(slots=True)
class Adapter:
    name: str
    path: str  # as the caller gave it: what /v1/models reports as `root`


@dataclass(slots=True)
class LoraRegistry:
    """The adapters an engine serves, by name, as vLLM's OpenAIServingModels keeps them."""

    options: LoraOptions
    base_model: str
    adapters: dict[str, Adapter] = field(default_factory=dict)  # in load order, as listed

    def __contains__(self, name: object) -> bool:
        return name in self.adapters

    def load(self, name: str, path: str, inplace: bool = False) -> str:
        """Register an adapter; returns vLLM's success text, raises its refusal."""
        if not name or not path:
            raise ApiError(400, "Both 'lora_name' and 'lora_path' must be provided.",
                           "InvalidUserInput")
        if name == self.base_model:
            raise ApiError(400, f"The lora adapter '{name}' conflicts with a served base "
                           "model.", "InvalidUserInput")
        if name in self.adapters and not inplace:
            raise ApiError(400, f"The lora adapter '{name}' has already been loaded. If you "
                           "want to load the adapter in place, set 'load_inplace' to True.",
                           "InvalidUserInput")
        self._check_adapter(name, path)
        self.adapters[name] = Adapter(name, path)  # in place: keeps its place in the listing
        return f"Success: LoRA adapter '{name}' added successfully."

    def unload(self, name: str) -> str:
        if not name:
            raise ApiError(400, "'lora_name' needs to be provided to unload a LoRA adapter.",
                           "InvalidUserInput")
        if name not in self.adapters:
            raise ApiError(404, f"The lora adapter '{name}' cannot be found.", "NotFoundError")
        del self.adapters[name]
        return f"Success: LoRA adapter '{name}' removed successfully."

    def cards(self, created: int) -> list[dict]:
        return [{"id": a.name, "object": "model", "created": created, "owned_by": "vllm",
                 "root": a.path, "parent": self.base_model, "max_model_len": None}
                for a in self.adapters.values()]

    def _check_adapter(self, name: str, path: str) -> None:
        """Refuse the adapter as vLLM's worker would while loading it."""
        if not self.options.enabled:
            raise _worker_failed(_NOT_ENABLED)
        directory = Path(resolve_adapter_path(path))
        try:
            config = json.loads((directory / "adapter_config.json").read_text())
        except (FileNotFoundError, NotADirectoryError):
            raise ApiError(404, sanitize(f"Loading lora {name} failed: No adapter found for "
                                         f"{path}"), "NotFoundError") from None
        rank = max([int(config.get("r", 0)), *config.get("rank_pattern", {}).values()])
        if rank > self.options.max_lora_rank:
            raise _worker_failed(f"LoRA rank {rank} is greater than max_lora_rank "
                                 f"{self.options.max_lora_rank}.")
        if not any((directory / weights).is_file() for weights in _WEIGHT_FILES):
            raise _worker_failed(f"{directory} doesn't contain tensors")


_NOT_ENABLED = "LoRA is not enabled. Use --enable-lora to enable LoRA."


def _worker_failed(reason: str) -> ApiError:
    """An adapter vLLM's worker refused: its API server answers 500, quoting the worker."""
    return ApiError(500, sanitize(f"Call to add_lora method failed: Worker failed with error "
                                  f"'{reason}', please check the stack trace above for the "
                                  "root cause"), "InternalServerError")


_SYSTEM_PATH = re.compile(r"/(?:home|usr|opt|var|tmp|root|lib|mnt|srv)(?:/[\w.\-]+)+")
_FILE_PATH = re.compile(r"(?:/[\w\-]+)+/[\w\-]+\.\w+")


def sanitize(message: str) -> str:
    """vLLM's `sanitize_message`: every error message it sends has its file paths hidden."""
    return _FILE_PATH.sub("<path>", _SYSTEM_PATH.sub("<path>", message)).strip()


def resolve_adapter_path(path: str) -> str:
    """Where the adapter's files are, found as vLLM's get_adapter_absolute_path finds them: an
    absolute path as it is, `~` expanded, an existing relative path, else a repo id's snapshot
    in the HF cache (offline); a path found nowhere is returned as it was given."""
    if os.path.isabs(path):
        return path
    if path.startswith("~"):
        return os.path.expanduser(path)
    if os.path.exists(path):
        return os.path.abspath(path)
    hf_home = os.environ.get("HF_HOME") or str(Path.home() / ".cache" / "huggingface")
    if path.count("/") <= 1:
        snapshot = RepoCache(Path(hf_home), path).snapshot_dir(None)
        if snapshot.is_dir():
            return str(snapshot)
    return path


LORA_KEY = web.AppKey("lora", LoraRegistry)


def served_adapters(app: web.Application) -> LoraRegistry:
    """The app's adapters: what completions and chat accept as a model besides the base."""
    return app[LORA_KEY]


def register_lora_routes(app: web.Application, engine) -> None:
    """Keep the engine's adapters on the app and, when runtime updating is allowed, add the
    load and unload routes. `engine` is the server's SimEngine: its `models_body` is rendered
    again whenever the adapters change."""
    options = engine.config.lora or LoraOptions()
    registry = LoraRegistry(options, engine.config.model)
    app[LORA_KEY] = registry
    base = json.loads(engine.models_body)

    def relist() -> None:
        listing = {**base, "data": [*base["data"], *registry.cards(base["data"][0]["created"])]}
        engine.models_body = json.dumps(listing, separators=(",", ":"))

    for name, path in options.modules:
        try:
            registry.load(name, path)
        except ApiError as error:  # vLLM does not start with a static adapter it cannot load
            raise ValueError(error.message) from None
    relist()
    if not options.runtime_updating:
        # vLLM has no such routes then: FastAPI's answer to a path it does not know.
        for path in ("/v1/load_lora_adapter", "/v1/unload_lora_adapter"):
            app.router.add_post(path, _no_such_route)
        return

    async def load(request: web.Request) -> web.Response:
        try:
            body = await _lora_body(request, ("lora_name", "lora_path"))
            text = registry.load(body["lora_name"], body["lora_path"],
                                 lax_bool(body, "load_inplace"))
        except ApiError as error:
            return error.response()
        relist()
        return web.Response(body=text.encode())

    async def unload(request: web.Request) -> web.Response:
        try:
            body = await _lora_body(request, ("lora_name",))
            text = registry.unload(body["lora_name"])
        except ApiError as error:
            return error.response()
        relist()
        return web.Response(body=text.encode())

    app.router.add_post("/v1/load_lora_adapter", load)
    app.router.add_post("/v1/unload_lora_adapter", unload)


async def _no_such_route(request: web.Request) -> web.Response:
    return web.json_response({"detail": "Not Found"}, status=404)


async def _lora_body(request: web.Request, required: tuple[str, ...]) -> dict:
    """The body as vLLM's pydantic request models read it, after its content-type check."""
    if request.content_type != "application/json":
        raise ApiError(400, "1 validation error:\n  Unsupported Media Type: Only "
                       "'application/json' is allowed", "Bad Request")
    body = await read_json_object(request)
    for name in required:
        if name not in body:
            raise validation_error(f"body.{name}", "missing", "Field required", body)
        if not isinstance(body[name], str):
            raise validation_error(f"body.{name}", "string_type", "Input should be a valid "
                                   "string", body[name])
    return body
