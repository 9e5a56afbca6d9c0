"""The format of `REDIS_URL`: one Redis (`redis://`, `rediss://`, `unix://`) or its Sentinels.

A Sentinel URL lists every Sentinel, separated by `;`, the way kombu and Celery write it:

    sentinel://10.0.0.1:26379;sentinel://10.0.0.2:26379;sentinel://10.0.0.3:26379/0

The database is the path of any entry (all that give one must agree; none means 0) and the
master's password, if any, is the userinfo of an entry (`sentinel://:secret@host:26379`). The
master's name is not in the URL: it is `REDIS_SENTINEL_MASTER`. The parser raises marshmallow's
`ValidationError`, which `load_settings` turns into a `SettingsError` naming the variable.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from marshmallow import ValidationError

SENTINEL_SCHEME = "sentinel"
DEFAULT_SENTINEL_PORT = 26379


@dataclass(frozen=True)
class SentinelURL:
    """The Sentinels to ask for the master, and how to talk to the master once found."""

    sentinels: tuple[tuple[str, int], ...]
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    def celery_url(self) -> str:
        """The URL for kombu's and Celery's sentinel transports, with the database on every
        entry: kombu takes it from the first, Celery's result backend from each."""
        auth = ""
        if self.password is not None:
            auth = f"{self.username or ''}:{self.password}@"
        return ";".join(f"sentinel://{auth}{host}:{port}/{self.db}"
                        for host, port in self.sentinels)


def is_sentinel_url(url: str) -> bool:
    return url.strip().lower().startswith(f"{SENTINEL_SCHEME}://")


def parse_sentinel_url(url: str) -> SentinelURL:
    sentinels: list[tuple[str, int]] = []
    dbs: set[int] = set()
    username = password = None
    for part in (p.strip() for p in url.split(";")):
        if not part:
            continue
        try:
            split = urlsplit(part)
            port = split.port or DEFAULT_SENTINEL_PORT
        except ValueError as exc:
            raise ValidationError(f"a Sentinel URL entry does not parse: {exc}") from None
        if split.scheme.lower() != SENTINEL_SCHEME or not split.hostname:
            raise ValidationError("each entry must be sentinel://host[:port][/db]")
        path = split.path.strip("/")
        if path:
            if not path.isdigit():
                raise ValidationError(f"the database must be a number, not {path!r}")
            dbs.add(int(path))
        if split.password is not None:
            username, password = unquote(split.username or "") or None, unquote(split.password)
        sentinels.append((split.hostname, port))
    if not sentinels:
        raise ValidationError("no Sentinel in the URL")
    if len(dbs) > 1:
        raise ValidationError(f"the entries name different databases: {sorted(dbs)}")
    return SentinelURL(tuple(sentinels), dbs.pop() if dbs else 0, username, password)
