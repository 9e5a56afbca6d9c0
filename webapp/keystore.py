"""API keys from the static JSON keys file, with live reload.

The file (`AUTH_KEYS_FILE`) is `{"keys": [{...}, ...]}`; an entry has a `name`, either the
`token` itself or its `sha256` (so the file need not hold secrets), `scopes`, and optionally a
`project` (default `default`: the tenant whose files, jobs and evals the key shares), a `models`
allowlist, `requests_per_minute` and `max_concurrency`, and budgets: `tokens_per_minute`,
`tokens_per_day`, `requests_per_day` (`webapp.budgets`). A project may have budgets of its own,
shared by its keys: `{"keys": [...], "projects": {"name": {"tokens_per_day": N, ...}}}`. Keys are
looked up by the sha256 of the presented token, so a token is never kept or compared in the
clear.

A file that is not valid JSON or has a bad entry stops start-up with a `KeysFileError` naming
the entry. After start-up, a changed file (or SIGHUP) is re-read; a bad edit is logged and the
previous keys stay in force, so no request fails during a reload.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

from jobs.tenancy import DEFAULT_PROJECT

log = logging.getLogger(__name__)

SCOPES = ("realtime", "batch", "upload", "eval", "monitor")


class KeysFileError(ValueError):
    """The keys file cannot be used; the message names the file and the entry."""


BUDGET_FIELDS = ("tokens_per_minute", "tokens_per_day", "requests_per_day")


@dataclass(frozen=True)
class Budget:
    """The budgets of a key or a project (`scope`), by `name`; None: no such budget."""

    scope: str
    name: str
    tokens_per_minute: int | None = None
    tokens_per_day: int | None = None
    requests_per_day: int | None = None


@dataclass(frozen=True)
class ApiKey:
    name: str
    scopes: frozenset[str]
    project: str = DEFAULT_PROJECT
    models: frozenset[str] | None = None
    requests_per_minute: int | None = None
    max_concurrency: int | None = None
    budgets: tuple[Budget, ...] = ()  # its own, then its project's
    fallback: bool = False  # a cold model's catalog fallback may answer this key's calls

    def allows_model(self, model: str) -> bool:
        return self.models is None or model in self.models


class _KeySchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=validate.Length(min=1, max=128))
    token = fields.String(validate=validate.Length(min=8, max=512))
    sha256 = fields.String(validate=validate.Regexp(r"^[0-9a-f]{64}$", error="64 hex digits"))
    project = fields.String(
        load_default=DEFAULT_PROJECT,
        validate=validate.Regexp(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$",
                                 error="1-64 letters, digits, '.', '_' or '-'"),
    )
    scopes = fields.List(
        fields.String(validate=validate.OneOf(SCOPES)),
        required=True,
        validate=validate.Length(min=1),
    )
    models = fields.List(fields.String(), load_default=None)
    requests_per_minute = fields.Integer(load_default=None, validate=validate.Range(min=1))
    max_concurrency = fields.Integer(load_default=None, validate=validate.Range(min=1))
    tokens_per_minute = fields.Integer(load_default=None, validate=validate.Range(min=1))
    tokens_per_day = fields.Integer(load_default=None, validate=validate.Range(min=1))
    requests_per_day = fields.Integer(load_default=None, validate=validate.Range(min=1))
    fallback = fields.Boolean(load_default=False)
    note = fields.String()

    @validates_schema
    def _one_secret(self, data, **_):
        if ("token" in data) == ("sha256" in data):
            raise ValidationError("give exactly one of token or sha256", "token")


class _ProjectSchema(Schema):
    class Meta:
        unknown = RAISE

    tokens_per_minute = fields.Integer(load_default=None, validate=validate.Range(min=1))
    tokens_per_day = fields.Integer(load_default=None, validate=validate.Range(min=1))
    requests_per_day = fields.Integer(load_default=None, validate=validate.Range(min=1))
    note = fields.String()


def _project_budgets(document, source: str) -> dict[str, Budget]:
    projects = document.get("projects", {})
    if not isinstance(projects, dict):
        raise KeysFileError(f'keys file {source}: "projects" must be an object')
    budgets = {}
    for name, raw in projects.items():
        try:
            entry = _ProjectSchema().load(raw if isinstance(raw, dict) else {"_": raw})
        except ValidationError as exc:
            raise KeysFileError(f"keys file {source}: project {name!r}: {exc.messages}") from None
        budgets[name] = Budget("project", name, *(entry[f] for f in BUDGET_FIELDS))
    return budgets


def _budgets(entry: dict, projects: dict[str, Budget]) -> tuple[Budget, ...]:
    own = () if all(entry[f] is None for f in BUDGET_FIELDS) else (
        Budget("key", entry["name"], *(entry[f] for f in BUDGET_FIELDS)),)
    project = projects.get(entry["project"])
    return own + ((project,) if project is not None else ())


def token_digest(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def parse_keys(document, source: str) -> dict[str, ApiKey]:
    """Validate a keys document; return the keys by token digest."""
    if not isinstance(document, dict) or not isinstance(document.get("keys"), list):
        raise KeysFileError(f'keys file {source}: expected {{"keys": [...]}}')
    projects = _project_budgets(document, source)
    keys: dict[str, ApiKey] = {}
    names: set[str] = set()
    for index, raw in enumerate(document["keys"]):
        name = raw.get("name") if isinstance(raw, dict) else None
        label = f"entry {index}" + (f" ({name!r})" if isinstance(name, str) else "")
        if not isinstance(raw, dict):
            raise KeysFileError(f"keys file {source}: {label}: expected an object")
        try:
            entry = _KeySchema().load(raw)
        except ValidationError as exc:
            # The messages name fields, never values, so a token cannot leak into the log.
            raise KeysFileError(f"keys file {source}: {label}: {exc.messages}") from None
        if entry["name"] in names:
            raise KeysFileError(f"keys file {source}: {label}: duplicate name")
        digest = entry.get("sha256") or token_digest(entry["token"])
        if digest in keys:
            raise KeysFileError(f"keys file {source}: {label}: same token as another entry")
        names.add(entry["name"])
        keys[digest] = ApiKey(
            name=entry["name"],
            scopes=frozenset(entry["scopes"]),
            project=entry["project"],
            models=frozenset(entry["models"]) if entry["models"] is not None else None,
            requests_per_minute=entry["requests_per_minute"],
            max_concurrency=entry["max_concurrency"],
            budgets=_budgets(entry, projects),
            fallback=entry["fallback"],
        )
    return keys


def read_keys_file(path: Path) -> dict[str, ApiKey]:
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise KeysFileError(f"keys file {path}: cannot read: {exc.strerror}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise KeysFileError(f"keys file {path}: not valid JSON: {exc}") from None
    return parse_keys(document, str(path))


class KeyStore:
    """The keys in force, re-read when the file changes (checked at most every `interval` s)."""

    def __init__(self, path: Path, interval: float = 2.0):
        self.path = Path(path)
        self.interval = interval
        self._keys = read_keys_file(self.path)
        self._stamp = self._file_stamp()
        self._next_check = time.monotonic() + interval
        self._reload_requested = False
        self._lock = threading.Lock()

    def lookup(self, token: str) -> ApiKey | None:
        now = time.monotonic()
        if now >= self._next_check or self._reload_requested:
            self._check(now)
        return self._keys.get(token_digest(token))

    def request_reload(self) -> None:
        """Ask for a re-read at the next lookup (safe to call from a signal handler)."""
        self._reload_requested = True

    def _file_stamp(self):
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        return (st.st_ino, st.st_mtime_ns, st.st_size)

    def _check(self, now: float) -> None:
        # Only one caller re-reads; the others keep using the keys in force.
        if not self._lock.acquire(blocking=False):
            return
        try:
            self._next_check = now + self.interval
            stamp = self._file_stamp()
            if stamp == self._stamp and not self._reload_requested:
                return
            self._reload_requested = False
            try:
                keys = read_keys_file(self.path)
            except KeysFileError as exc:
                log.error("keeping the previous keys: %s", exc)
                self._stamp = stamp
                return
            self._keys = keys
            self._stamp = stamp
            log.info("reloaded %d keys from %s", len(keys), self.path)
        finally:
            self._lock.release()
