"""The model catalog: which models may be served, on which engine, with what arguments.

The catalog is a JSON file (`MODEL_CATALOG_FILE`) of the form `{"models": [{...}, ...]}`. An entry
that leaves out `engine` runs on the default engine (`RUNTIME_TYPE`), so one catalog serves a GPU
box (vLLM) and a laptop (sim) alike; `engine_args` holds the arguments per engine.

An entry's `kind` says what it serves: `generate` (the default: completions, chat, Responses,
Messages) or `embedding` (embeddings, score, rerank: vLLM's pooling runner). An entry with a
`base` is not a model but a LoRA adapter of one (`AdapterSpec`): it is served by an engine of its
base, which the gateway loads it into on first use; its base must be a generate model of the
catalog, and that base's engines are then started with LoRA enabled (`max_loras`,
`max_lora_rank`).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field, replace
from pathlib import Path

from marshmallow import EXCLUDE, Schema, ValidationError, fields, validate

ENGINES = ("vllm", "sglang", "sim")
GENERATE = "generate"
EMBEDDING = "embedding"
KINDS = (GENERATE, EMBEDDING)


class CatalogError(ValueError):
    """The catalog file is unreadable or an entry is malformed; the message names the entry."""


@dataclass(frozen=True)
class ModelSpec:
    id: str
    engine: str
    gpus: int = 1
    image: str | None = None
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    hf_repo: str | None = None
    revision: str | None = None
    idle_timeout_seconds: float | None = None
    expected_start_seconds: float | None = None
    start_timeout_seconds: float | None = None
    cold_start_hold_seconds: float | None = None
    sleep_after_seconds: float | None = None
    weights_gb: float | None = None
    # KV cache to give the engine, GB over all its GPUs; None: a share of weights_gb (placement).
    kv_cache_gb: float | None = None
    min_replicas: int = 0
    max_replicas: int = 1
    max_concurrency: int | None = None  # sequences the engine runs at once; None: its default
    batch_max_inflight: int | None = None  # batch lines per ready engine; None: see policy
    # Fetch the weights into the shared HF cache before the engine starts (runtimes.weights).
    download_weights: bool = False
    hf_allow_patterns: tuple[str, ...] | None = None
    hf_ignore_patterns: tuple[str, ...] | None = None
    kind: str = GENERATE
    # An engine the orchestrator does not run (runtimes.upstreams): its base URL and the
    # environment variable that holds its API key. None: a managed model.
    upstream_url: str | None = None
    upstream_key_env: str | None = None
    # Another catalog model that answers this one's realtime calls while it is cold or failed
    # (for keys that opt in).
    fallback: str | None = None
    # LoRA: whether the catalog declares adapters of this model, and the engine's bounds for them.
    serves_adapters: bool = False
    max_loras: int = 4
    max_lora_rank: int = 16
    fingerprint: str = field(default="", compare=False)

    @property
    def repo_id(self) -> str:
        return self.hf_repo or self.id


@dataclass(frozen=True)
class AdapterSpec:
    """A LoRA adapter of `base`: its weights are a local `path`, or a Hub repo in the HF cache."""

    id: str
    base: str
    path: str | None = None
    hf_repo: str | None = None
    revision: str | None = None

    @property
    def repo_id(self) -> str:
        return self.hf_repo or self.id


def _check_seconds_by_engine(value) -> None:
    if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
        return
    if isinstance(value, dict) and all(
        k in ENGINES and isinstance(v, int | float) and v >= 0 for k, v in value.items()
    ):
        return
    raise ValidationError(f"a number of seconds, or an object of seconds by engine {ENGINES}")


def _patterns(value: list[str] | None) -> tuple[str, ...] | None:
    return tuple(value) if value is not None else None


class _UpstreamSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    base_url = fields.Url(required=True, schemes={"http", "https"}, require_tld=False)
    api_key_env = fields.String(load_default=None, allow_none=True,
                                validate=validate.Regexp(r"^[A-Za-z_][A-Za-z0-9_]*$"))


class _EntrySchema(Schema):
    class Meta:
        unknown = EXCLUDE

    id = fields.String(required=True, validate=validate.Length(min=1, max=256))
    engine = fields.String(validate=validate.OneOf(ENGINES), load_default=None)
    gpus = fields.Integer(load_default=1, validate=validate.Range(min=0, max=64))
    image = fields.String(load_default=None, allow_none=True)
    engine_args = fields.Dict(
        keys=fields.String(validate=validate.OneOf(ENGINES)),
        values=fields.List(fields.String()),
        load_default=dict,
    )
    env = fields.Dict(keys=fields.String(), values=fields.String(), load_default=dict)
    hf_repo = fields.String(load_default=None, allow_none=True)
    revision = fields.String(load_default=None, allow_none=True)
    idle_timeout_seconds = fields.Float(load_default=None, validate=validate.Range(min=1))
    # A number, or a number per engine: a 27B model loads in minutes on vLLM, seconds on sim.
    expected_start_seconds = fields.Raw(load_default=None, validate=_check_seconds_by_engine)
    start_timeout_seconds = fields.Float(load_default=None, validate=validate.Range(min=1))
    cold_start_hold_seconds = fields.Float(
        load_default=None, validate=validate.Range(min=0, max=600)
    )
    sleep_after_seconds = fields.Float(load_default=None, validate=validate.Range(min=0))
    weights_gb = fields.Float(load_default=None, validate=validate.Range(min=0))
    kv_cache_gb = fields.Float(load_default=None, validate=validate.Range(min=0))
    min_replicas = fields.Integer(load_default=0, validate=validate.Range(min=0, max=64))
    max_replicas = fields.Integer(load_default=1, validate=validate.Range(min=1, max=64))
    # Sequences the engine runs at once (vLLM --max-num-seqs, SGLang --max-running-requests);
    # unset: the engine's own default, or what engine_args say.
    max_concurrency = fields.Integer(load_default=None, validate=validate.Range(min=1))
    # Batch lines in flight per ready engine; unset: 3/4 of the engine's concurrency when it is
    # known, else BATCH_MAX_INFLIGHT_PER_RUNTIME.
    batch_max_inflight = fields.Integer(load_default=None, validate=validate.Range(min=1))
    # Default: true for engines that load from the Hub (vllm, sglang), false for sim.
    download_weights = fields.Boolean(load_default=None, allow_none=True)
    hf_allow_patterns = fields.List(fields.String(), load_default=None, allow_none=True)
    hf_ignore_patterns = fields.List(fields.String(), load_default=None, allow_none=True)
    kind = fields.String(load_default=GENERATE, validate=validate.OneOf(KINDS))
    # vLLM's --max-loras (adapters in one batch) and --max-lora-rank; only for a base of adapters.
    max_loras = fields.Integer(load_default=4, validate=validate.Range(min=1, max=256))
    max_lora_rank = fields.Integer(load_default=16, validate=validate.Range(min=1, max=512))
    upstream = fields.Nested(_UpstreamSchema, load_default=None, allow_none=True)
    fallback = fields.String(load_default=None, allow_none=True,
                             validate=validate.Length(min=1, max=256))


class _AdapterSchema(Schema):
    class Meta:
        unknown = EXCLUDE

    id = fields.String(required=True, validate=validate.Length(min=1, max=256))
    base = fields.String(required=True, validate=validate.Length(min=1, max=256))
    path = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1))
    hf_repo = fields.String(load_default=None, allow_none=True, validate=validate.Length(min=1))
    revision = fields.String(load_default=None, allow_none=True)


class ModelCatalog:
    """The models that may be served, by id, and the LoRA adapters of some of them."""

    def __init__(self, specs: list[ModelSpec], adapters: list[AdapterSpec] = ()):
        self._specs = {spec.id: spec for spec in specs}
        self._adapters = {adapter.id: adapter for adapter in adapters}

    def get(self, model_id: str) -> ModelSpec | None:
        return self._specs.get(model_id)

    def adapter(self, adapter_id: str) -> AdapterSpec | None:
        return self._adapters.get(adapter_id)

    def adapters(self, base: str | None = None) -> list[AdapterSpec]:
        """The adapters, or those of one base model."""
        return [a for a in self._adapters.values() if base is None or a.base == base]

    def weights_spec(self, name: str) -> ModelSpec | None:
        """What to download for `name`: a model's own spec, or for an adapter from the Hub a
        spec of its repo that downloads as its base's weights do (None: nothing to fetch)."""
        spec = self._specs.get(name)
        if spec is not None:
            return spec
        adapter = self._adapters.get(name)
        if adapter is None or adapter.hf_repo is None:
            return None
        base = self._specs[adapter.base]
        return ModelSpec(id=adapter.id, engine=base.engine, gpus=0, hf_repo=adapter.hf_repo,
                         revision=adapter.revision, download_weights=base.download_weights,
                         fingerprint=adapter.id)

    def __contains__(self, model_id: object) -> bool:
        return model_id in self._specs

    def __iter__(self):
        return iter(self._specs.values())

    def __len__(self) -> int:
        return len(self._specs)

    @classmethod
    def from_file(cls, path: Path, default_engine: str) -> ModelCatalog:
        try:
            document = json.loads(Path(path).read_text())
        except OSError as exc:
            raise CatalogError(f"model catalog {path}: cannot read: {exc.strerror}") from None
        except json.JSONDecodeError as exc:
            raise CatalogError(f"model catalog {path}: not valid JSON: {exc}") from None
        return cls.from_document(document, default_engine, source=str(path))

    @classmethod
    def from_document(cls, document, default_engine: str, source: str = "catalog") -> ModelCatalog:
        if not isinstance(document, dict) or not isinstance(document.get("models"), list):
            raise CatalogError(f'model catalog {source}: expected {{"models": [...]}}')
        specs: list[ModelSpec] = []
        adapters: list[tuple[str, AdapterSpec]] = []
        seen: set[str] = set()
        for index, raw in enumerate(document["models"]):
            name = raw.get("id") if isinstance(raw, dict) else None
            label = f"entry {index}" + (f" ({name})" if name else "")
            if isinstance(raw, dict) and "base" in raw:
                adapter = _load_adapter(raw, f"model catalog {source}: {label}")
                if adapter.id in seen:
                    raise CatalogError(f"model catalog {source}: {label}: duplicate id")
                seen.add(adapter.id)
                adapters.append((label, adapter))
                continue
            try:
                entry = _EntrySchema().load(raw)
            except ValidationError as exc:
                raise CatalogError(f"model catalog {source}: {label}: {exc.messages}") from None
            if entry["id"] in seen:
                raise CatalogError(f"model catalog {source}: {label}: duplicate id")
            if entry["min_replicas"] > entry["max_replicas"]:
                raise CatalogError(f"model catalog {source}: {label}: min_replicas > max_replicas")
            seen.add(entry["id"])
            engine = entry["engine"] or default_engine
            expected = entry["expected_start_seconds"]
            if isinstance(expected, dict):
                expected = expected.get(engine)
            fingerprint = hashlib.sha256(
                json.dumps([raw, engine], sort_keys=True).encode()
            ).hexdigest()[:16]
            specs.append(
                ModelSpec(
                    id=entry["id"],
                    engine=engine,
                    gpus=entry["gpus"],
                    image=entry["image"],
                    args=tuple(entry["engine_args"].get(engine, ())),
                    env=tuple(sorted(entry["env"].items())),
                    hf_repo=entry["hf_repo"],
                    revision=entry["revision"],
                    idle_timeout_seconds=entry["idle_timeout_seconds"],
                    expected_start_seconds=expected,
                    start_timeout_seconds=entry["start_timeout_seconds"],
                    cold_start_hold_seconds=entry["cold_start_hold_seconds"],
                    sleep_after_seconds=entry["sleep_after_seconds"],
                    weights_gb=entry["weights_gb"],
                    kv_cache_gb=entry["kv_cache_gb"],
                    min_replicas=entry["min_replicas"],
                    max_replicas=entry["max_replicas"],
                    max_concurrency=entry["max_concurrency"],
                    batch_max_inflight=entry["batch_max_inflight"],
                    download_weights=False if entry["upstream"] else (
                        engine != "sim" if entry["download_weights"] is None
                        else entry["download_weights"]),
                    hf_allow_patterns=_patterns(entry["hf_allow_patterns"]),
                    hf_ignore_patterns=_patterns(entry["hf_ignore_patterns"]),
                    kind=entry["kind"],
                    upstream_url=(entry["upstream"] or {}).get("base_url"),
                    upstream_key_env=(entry["upstream"] or {}).get("api_key_env"),
                    fallback=entry["fallback"],
                    max_loras=entry["max_loras"],
                    max_lora_rank=entry["max_lora_rank"],
                    fingerprint=fingerprint,
                )
            )
        _check_fallbacks(specs, source)
        return cls(_with_adapters(specs, adapters, source), [a for _, a in adapters])


def _check_fallbacks(specs: list[ModelSpec], source: str) -> None:
    by_id = {spec.id: spec for spec in specs}
    for spec in specs:
        if spec.fallback is None:
            continue
        label = f"model catalog {source}: entry ({spec.id})"
        other = by_id.get(spec.fallback)
        if spec.upstream_url is not None:
            raise CatalogError(f"{label}: an upstream is never cold; it takes no fallback")
        if other is None or other.id == spec.id:
            raise CatalogError(f"{label}: its fallback '{spec.fallback}' is not another model "
                               "of the catalog")
        if other.kind != spec.kind:
            raise CatalogError(f"{label}: its fallback '{spec.fallback}' is a {other.kind} "
                               f"model, it a {spec.kind} one")


def _load_adapter(raw: dict, label: str) -> AdapterSpec:
    try:
        entry = _AdapterSchema().load(raw)
    except ValidationError as exc:
        raise CatalogError(f"{label}: {exc.messages}") from None
    if (entry["path"] is None) == (entry["hf_repo"] is None):
        raise CatalogError(f"{label}: an adapter needs one of 'path' or 'hf_repo'")
    return AdapterSpec(id=entry["id"], base=entry["base"], path=entry["path"],
                       hf_repo=entry["hf_repo"], revision=entry["revision"])


def _with_adapters(specs: list[ModelSpec], adapters: list[tuple[str, AdapterSpec]],
                   source: str) -> list[ModelSpec]:
    """The specs, each base of an adapter marked as serving adapters (a new fingerprint: its
    engines start with LoRA enabled); an adapter whose base is missing is refused by name."""
    by_id = {spec.id: spec for spec in specs}
    bases: set[str] = set()
    for label, adapter in adapters:
        base = by_id.get(adapter.base)
        if base is None:
            raise CatalogError(f"model catalog {source}: {label}: its base '{adapter.base}' "
                               "is not a model of the catalog")
        if base.kind != GENERATE:
            raise CatalogError(f"model catalog {source}: {label}: its base '{adapter.base}' "
                               "is an embedding model; adapters need a generate model")
        bases.add(base.id)
    return [replace(spec, serves_adapters=True, fingerprint=spec.fingerprint + "+lora")
            if spec.id in bases else spec for spec in specs]
