"""The formats of the settings that name machines: Docker hosts, GPU ids, host paths.

`DOCKER_HOSTS` is a JSON list (inline, or the path of a file holding it):

    [{"name": "gpu1", "url": "tcp://gpu1.internal:2376", "address": "10.0.0.11",
      "gpus": [0, 1, 2, 3], "tls": {"ca": "/certs/ca.pem", "cert": "/certs/cert.pem",
                                    "key": "/certs/key.pem"}}]

`url` is the Docker Engine API (`unix://` locally, `tcp://` with TLS remotely); `address` is
where the web app reaches ports published on that host; `bind` (optional) is the host interface
published ports listen on: by default `address` when that is an IP address, else all interfaces.
The parsers raise marshmallow's `ValidationError`, which `load_settings` turns into a
`SettingsError` naming the variable. `runtimes.inventory` builds the inventory from them.
"""

from __future__ import annotations

import ipaddress
import json
import re
from dataclasses import dataclass
from pathlib import Path

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates_schema

LOCAL_HOST = "local"
DEFAULT_DOCKER_URL = "unix:///var/run/docker.sock"
# A host name goes into container labels and backend handles ("<host>/<container id>").
_HOST_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,62}$")
_DOCKER_URL = re.compile(r"^(unix|tcp|ssh|https?)://.+")


@dataclass(frozen=True)
class TlsFiles:
    """Client certificate and key, and the CA that signed the remote Docker engine's certificate."""

    ca: str | None = None
    cert: str | None = None
    key: str | None = None


@dataclass(frozen=True)
class GpuHost:
    name: str
    url: str
    address: str
    gpus: tuple[int, ...] = ()
    tls: TlsFiles | None = None
    bind: str = ""

    @property
    def bind_address(self) -> str:
        """The interface ports published on this host listen on."""
        if self.bind:
            return self.bind
        try:
            ipaddress.ip_address(self.address)
        except ValueError:
            return "0.0.0.0"  # a DNS name: which interface it resolves to is not known here
        return self.address


class _TlsSchema(Schema):
    class Meta:
        unknown = RAISE

    ca = fields.String(load_default=None)
    cert = fields.String(load_default=None)
    key = fields.String(load_default=None)

    @validates_schema
    def _pair(self, data, **kwargs):
        if bool(data.get("cert")) != bool(data.get("key")):
            raise ValidationError("cert and key go together")


class _HostSchema(Schema):
    class Meta:
        unknown = RAISE

    name = fields.String(required=True, validate=validate.Regexp(_HOST_NAME))
    url = fields.String(
        required=True,
        validate=validate.Regexp(_DOCKER_URL, error="a Docker URL: unix://, tcp:// or ssh://"),
    )
    address = fields.String(required=True, validate=validate.Length(min=1))
    gpus = fields.List(fields.Integer(strict=True, validate=validate.Range(min=0)),
                       load_default=list)
    tls = fields.Nested(_TlsSchema, load_default=None)
    bind = fields.String(load_default="")

    @validates_schema
    def _unique_gpus(self, data, **kwargs):
        if len(set(data["gpus"])) != len(data["gpus"]):
            raise ValidationError("a GPU id is listed twice", "gpus")


def parse_docker_hosts(raw: str | None) -> tuple[GpuHost, ...]:
    """DOCKER_HOSTS: a JSON list of hosts, inline or in a file; empty means the default host."""
    text = (raw or "").strip()
    if not text:
        return ()
    if not text.startswith("["):
        try:
            text = Path(text).read_text()
        except OSError as exc:
            raise ValidationError(f"cannot read the hosts file {text}: {exc.strerror}") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValidationError(f"not valid JSON: {exc}") from None
    if not isinstance(document, list) or not document:
        raise ValidationError("expected a non-empty JSON list of hosts")
    hosts = []
    for index, entry in enumerate(document):
        try:
            data = _HostSchema().load(entry)
        except ValidationError as exc:
            raise ValidationError(f"host {index}: {exc.messages}") from None
        tls = TlsFiles(**data["tls"]) if data["tls"] else None
        hosts.append(GpuHost(name=data["name"], url=data["url"], address=data["address"],
                             gpus=tuple(data["gpus"]), tls=tls, bind=data["bind"]))
    names = [h.name for h in hosts]
    if len(set(names)) != len(names):
        raise ValidationError(f"host names must be unique: {names}")
    return tuple(hosts)


def parse_gpu_ids(raw: str | None) -> tuple[int, ...] | None:
    """GPUS: comma-separated GPU ids ("0,1"); empty means none; unset (None) means detect."""
    if raw is None:
        return None
    ids = []
    for part in filter(None, (p.strip() for p in raw.split(","))):
        if not part.isdigit():
            raise ValidationError(f"expected comma-separated GPU ids like 0,1; got {part!r}")
        ids.append(int(part))
    if len(set(ids)) != len(ids):
        raise ValidationError("a GPU id is listed twice")
    return tuple(ids)


def parse_docker_url(raw: str | None) -> str:
    """DOCKER_HOST: the local Docker engine's API; empty means the default socket."""
    url = (raw or "").strip() or DEFAULT_DOCKER_URL
    if not _DOCKER_URL.match(url):
        raise ValidationError(f"a Docker URL (unix://, tcp:// or ssh://), got {url!r}")
    return url


def parse_host_path(raw: str | None) -> Path | None:
    """HF_HOME_HOST: an absolute path on the Docker host; empty means unset."""
    if not raw:
        return None
    path = Path(raw)
    if not path.is_absolute():
        raise ValidationError(f"an absolute path on the Docker host, got {raw!r}")
    return path
