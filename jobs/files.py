"""Files of the OpenAI Files API: content on a volume, metadata in Redis.

Content is written and read as streams in blocks, never whole in memory, and a file appears only
once completely written (temporary name, then an atomic rename). Every file belongs to a project
(the tenant of the key that uploaded it, or of the job that wrote it); files stored before
projects existed belong to `default`. Shared by the web app and the workers; no Flask or Celery
here.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import redis

from jobs.tenancy import DEFAULT_PROJECT, UnknownCursor

BLOCK = 1024 * 1024


class FileTooLarge(ValueError):
    def __init__(self, limit: int):
        super().__init__(f"file is larger than the limit of {limit} bytes")
        self.limit = limit


@dataclass(frozen=True)
class StoredFile:
    id: str
    bytes: int
    created_at: int
    filename: str
    purpose: str
    owner: str  # the key (or the job's key) that made it
    object: str = "file"
    status: str = "processed"
    project: str = DEFAULT_PROJECT

    def public(self) -> dict:
        data = asdict(self)
        del data["owner"], data["project"]
        return data


class FileStore:
    def __init__(self, client: redis.Redis, root: Path, prefix: str = "gw"):
        self.redis = client
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.prefix = prefix

    def _meta_key(self, file_id: str) -> str:
        return f"{self.prefix}:file:{file_id}"

    def path(self, file_id: str) -> Path:
        return self.root / file_id

    def save(self, owner: str, purpose: str, filename: str, chunks: Iterable[bytes],
             max_bytes: int | None = None, project: str = DEFAULT_PROJECT) -> StoredFile:
        """Write `chunks` to a new file; raise FileTooLarge (keeping nothing) past `max_bytes`."""
        file_id = f"file-{uuid.uuid4().hex[:24]}"
        final = self.path(file_id)
        partial = final.with_suffix(".part")
        size = 0
        try:
            with open(partial, "wb") as out:
                for chunk in chunks:
                    size += len(chunk)
                    if max_bytes is not None and size > max_bytes:
                        raise FileTooLarge(max_bytes)
                    out.write(chunk)
            partial.replace(final)
        finally:
            partial.unlink(missing_ok=True)
        stored = StoredFile(id=file_id, bytes=size, created_at=int(time.time()),
                            filename=filename, purpose=purpose, owner=owner, project=project)
        pipe = self.redis.pipeline()
        pipe.set(self._meta_key(file_id), json.dumps(asdict(stored)))
        pipe.zadd(f"{self.prefix}:files", {file_id: time.time()})
        pipe.execute()
        return stored

    def save_stream(self, owner: str, purpose: str, filename: str, stream: BinaryIO,
                    max_bytes: int | None = None,
                    project: str = DEFAULT_PROJECT) -> StoredFile:
        return self.save(owner, purpose, filename, iter(lambda: stream.read(BLOCK), b""),
                         max_bytes, project)

    def get(self, file_id: str, project: str | None = None) -> StoredFile | None:
        """The file; with `project`, only if it belongs to that project (else None, as if it
        did not exist: another tenant's file is never revealed)."""
        if not isinstance(file_id, str) or not file_id:
            return None
        raw = self.redis.get(self._meta_key(file_id))
        if not raw:
            return None
        stored = StoredFile(**json.loads(raw))
        return stored if project is None or stored.project == project else None

    def list(self, purpose: str | None = None, after: str | None = None,
             limit: int = 100, project: str | None = None) -> tuple[list[StoredFile], bool]:
        """Newest first, of one project (or all); `after` is the id of the last file of the
        previous page, and must be one of the list's (UnknownCursor otherwise)."""
        ids = [i.decode() for i in self.redis.zrevrange(f"{self.prefix}:files", 0, -1)]
        if after is not None:
            if after not in ids or self.get(after, project) is None:
                raise UnknownCursor(after)
            ids = ids[ids.index(after) + 1:]
        files: list[StoredFile] = []
        for file_id in ids:
            stored = self.get(file_id, project)
            if stored is not None and (purpose is None or stored.purpose == purpose):
                files.append(stored)
                if len(files) > limit:
                    break
        return files[:limit], len(files) > limit

    def read(self, file_id: str) -> Iterator[bytes]:
        with open(self.path(file_id), "rb") as fh:
            yield from iter(lambda: fh.read(BLOCK), b"")

    def delete(self, file_id: str) -> bool:
        pipe = self.redis.pipeline()
        pipe.delete(self._meta_key(file_id))
        pipe.zrem(f"{self.prefix}:files", file_id)
        deleted, _ = pipe.execute()
        self.path(file_id).unlink(missing_ok=True)
        return bool(deleted)
