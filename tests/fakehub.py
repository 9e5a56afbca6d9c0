"""A small Hugging Face Hub on loopback, for real `snapshot_download` calls in the tests.

It serves the part of the Hub's HTTP API that huggingface_hub uses to download a snapshot:

- `GET /api/models/{repo}/revision/{rev}`: the repo's info with `sha`, the commit of `rev`;
- `GET /api/models/{repo}/tree/{rev}?recursive=...`: the file list with sizes, git blob ids and,
  for weight files, LFS metadata (sha256 and size);
- `HEAD|GET /{repo}/resolve/{rev}/{path}`: the file, with `ETag` (`X-Linked-Etag` for LFS files),
  `X-Repo-Commit`, `Content-Length`, and `Range` requests answered with 206.

It can cut a file's first transfer halfway (to test resuming), send slowly (to see progress and
an ETA), and demand a token for a gated repo. Every request is logged for the assertions.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

import numpy as np
from safetensors.numpy import save as save_safetensors


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class FakeRepo:
    repo_id: str
    files: dict[str, bytes]
    commit: str = ""
    gated_token: str | None = None  # when set, only this bearer token may read the repo
    bytes_per_second: float = 0.0  # pace of this repo's files (0: the hub's)
    lfs_suffixes: tuple[str, ...] = (".safetensors", ".bin")

    def __post_init__(self):
        if not self.commit:
            digest = hashlib.sha1(self.repo_id.encode())
            for name in sorted(self.files):
                digest.update(name.encode() + hashlib.sha1(self.files[name]).digest())
            self.commit = digest.hexdigest()

    def is_lfs(self, path: str) -> bool:
        return path.endswith(self.lfs_suffixes)

    def etag(self, path: str) -> str:
        data = self.files[path]
        return hashlib.sha256(data).hexdigest() if self.is_lfs(path) else git_blob_id(data)

    def tree(self) -> list[dict]:
        entries = []
        for path in sorted(self.files):
            data = self.files[path]
            entry = {"type": "file", "oid": git_blob_id(data), "size": len(data), "path": path}
            if self.is_lfs(path):
                entry["lfs"] = {"oid": hashlib.sha256(data).hexdigest(), "size": len(data),
                                "pointerSize": 134}
            entries.append(entry)
        return entries


def make_model_repo(repo_id: str, shard_mb: float = 2.0, shards: int = 2, **kwargs) -> FakeRepo:
    """A small but real model repo: safetensors shards with an index, config, tokenizer, and
    the copies a real repo carries that an engine does not need."""
    files: dict[str, bytes] = {}
    weight_map = {}
    rows = max(1, int(shard_mb * 1024 * 1024 / (4 * 256)))
    rng = np.random.default_rng(len(repo_id))
    for index in range(1, shards + 1):
        name = f"model-{index:05d}-of-{shards:05d}.safetensors"
        tensor = f"layers.{index}.weight"
        files[name] = save_safetensors(
            {tensor: rng.standard_normal((rows, 256), dtype=np.float32)},
            metadata={"format": "pt"},
        )
        weight_map[tensor] = name
    files["model.safetensors.index.json"] = json.dumps(
        {"metadata": {"total_size": sum(len(v) for v in files.values())},
         "weight_map": weight_map}).encode()
    files["config.json"] = json.dumps(
        {"architectures": ["LlamaForCausalLM"], "hidden_size": 256, "num_hidden_layers": shards,
         "model_type": "llama", "vocab_size": 32}).encode()
    files["tokenizer.json"] = json.dumps(
        {"version": "1.0", "model": {"type": "WordLevel",
                                     "vocab": {f"t{i}": i for i in range(32)}}}).encode()
    files["tokenizer_config.json"] = json.dumps({"model_max_length": 4096}).encode()
    # What a real repo also holds and an engine must not fetch: a pickled copy of the weights,
    # a consolidated copy the index does not name, and the model card.
    files["pytorch_model.bin"] = b"\x80\x02pickled weights" * 4096
    files["consolidated.safetensors"] = save_safetensors(
        {"all": np.zeros((rows, 64), dtype=np.float32)})
    files["README.md"] = b"# a test model\n"
    return FakeRepo(repo_id, files, **kwargs)


@dataclass
class Transfer:
    method: str
    path: str
    range: str | None
    authorization: str | None
    status: int
    sent: int = 0


@dataclass
class FakeHub:
    repos: dict[str, FakeRepo] = field(default_factory=dict)
    # Files (repo paths) whose first GET stops halfway and drops the connection.
    cut_once: set[str] = field(default_factory=set)
    # Body bytes per second per transfer; 0: as fast as possible.
    bytes_per_second: float = 0.0
    # Files (repo paths) whose GET answers 500 while they are listed here.
    broken: set[str] = field(default_factory=set)
    log: list[Transfer] = field(default_factory=list)
    _server: ThreadingHTTPServer | None = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, repo: FakeRepo) -> FakeRepo:
        self.repos[repo.repo_id] = repo
        return repo

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def start(self) -> FakeHub:
        hub = self

        class Handler(_HubHandler):
            fake = hub

        self._server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()

    def record(self, transfer: Transfer) -> None:
        with self._lock:
            self.log.append(transfer)

    def gets(self, path: str) -> list[Transfer]:
        """The GETs of one repo file, in order."""
        with self._lock:
            return [t for t in self.log
                    if t.method == "GET" and "/resolve/" in t.path and t.path.endswith("/" + path)]

    def files_fetched(self) -> set[str]:
        with self._lock:
            return {t.path.split("/resolve/", 1)[1].split("/", 1)[1] for t in self.log
                    if t.method == "GET" and "/resolve/" in t.path}


class _HubHandler(BaseHTTPRequestHandler):
    fake: FakeHub
    protocol_version = "HTTP/1.1"

    def log_message(self, format, *args):  # the tests read FakeHub.log instead
        pass

    # -- plumbing ----------------------------------------------------------------------------

    def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        body = json.dumps({"error": message}).encode()
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("X-Error-Message", message)
        if commit:
            self.send_header("X-Repo-Commit", commit)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _json(self, document) -> None:
        body = json.dumps(document).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _repo(self, repo_id: str) -> FakeRepo | None:
        repo = self.fake.repos.get(repo_id)
        if repo is None:
            self._error(404, "RepoNotFound", f"Repository not found: {repo_id}")
            return None
        if repo.gated_token is not None and (
            self.headers.get("Authorization") != f"Bearer {repo.gated_token}"
        ):
            self._error(401, "GatedRepo", f"Access to model {repo_id} is restricted.")
            return None
        return repo

    def _revision_ok(self, repo: FakeRepo, revision: str) -> bool:
        if revision in ("main", repo.commit):
            return True
        self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return False

    # -- endpoints ---------------------------------------------------------------------------

    def do_GET(self):
        self._dispatch()

    def do_HEAD(self):
        self._dispatch()

    def _dispatch(self):
        path = unquote(urlsplit(self.path).path)
        transfer = Transfer(self.command, path, self.headers.get("Range"),
                            self.headers.get("Authorization"), 0)
        self.fake.record(transfer)
        if path.startswith("/api/models/"):
            rest = path[len("/api/models/"):]
            for marker, view in (("/revision/", self._info), ("/tree/", self._tree)):
                if marker in rest:
                    repo_id, revision = rest.split(marker, 1)
                    return view(repo_id, revision.split("/", 1)[0], transfer)
            return self._info(rest, "main", transfer)
        if "/resolve/" in path:
            repo_id, rest = path.lstrip("/").split("/resolve/", 1)
            revision, filename = rest.split("/", 1)
            return self._resolve(repo_id, revision, filename, transfer)
        transfer.status = 404
        self._error(404, "EntryNotFound", f"no such endpoint {path}")

    def _info(self, repo_id: str, revision: str, transfer: Transfer) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._revision_ok(repo, revision):
            return
        transfer.status = 200
        self._json({"id": repo.repo_id, "modelId": repo.repo_id, "sha": repo.commit,
                    "private": False, "gated": "manual" if repo.gated_token else False,
                    "siblings": [{"rfilename": p} for p in sorted(repo.files)]})

    def _tree(self, repo_id: str, revision: str, transfer: Transfer) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._revision_ok(repo, revision):
            return
        transfer.status = 200
        self._json(repo.tree())

    def _resolve(self, repo_id: str, revision: str, filename: str, transfer: Transfer) -> None:
        repo = self._repo(repo_id)
        if repo is None or not self._revision_ok(repo, revision):
            return
        data = repo.files.get(filename)
        if data is None:
            transfer.status = 404
            return self._error(404, "EntryNotFound", f"{filename} not found", repo.commit)
        if self.command == "GET" and filename in self.fake.broken:
            transfer.status = 500
            return self._error(500, "InternalError", "the storage backend failed", repo.commit)
        start, end = 0, len(data) - 1
        wanted = self.headers.get("Range")
        status = 200
        if wanted and wanted.startswith("bytes="):
            first, _, last = wanted[len("bytes="):].partition("-")
            start = int(first or 0)
            end = int(last) if last else len(data) - 1
            status = 206
        transfer.status = status
        self.send_response(status)
        etag = repo.etag(filename)
        self.send_header("ETag", f'"{etag}"')
        if repo.is_lfs(filename):
            self.send_header("X-Linked-Etag", f'"{etag}"')
            self.send_header("X-Linked-Size", str(len(data)))
        self.send_header("X-Repo-Commit", repo.commit)
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(end - start + 1))
        if status == 206:
            self.send_header("Content-Range", f"bytes {start}-{end}/{len(data)}")
        self.end_headers()
        if self.command == "HEAD":
            return
        body = data[start:end + 1]
        cut = None
        with self.fake._lock:
            if filename in self.fake.cut_once:
                self.fake.cut_once.discard(filename)
                cut = len(body) // 2
        self._send_body(body, cut, transfer, repo.bytes_per_second or self.fake.bytes_per_second)

    def _send_body(self, body: bytes, cut: int | None, transfer: Transfer, pace: float) -> None:
        chunk = 64 * 1024
        limit = len(body) if cut is None else cut
        started = time.monotonic()
        while transfer.sent < limit:
            piece = body[transfer.sent:min(limit, transfer.sent + chunk)]
            self.wfile.write(piece)
            transfer.sent += len(piece)
            if pace:
                # Pace the transfer: sleep until this many bytes are due.
                due = started + transfer.sent / pace
                time.sleep(max(0.0, due - time.monotonic()))
        if cut is not None:
            self.wfile.flush()
            self.close_connection = True
            self.connection.shutdown(2)  # SHUT_RDWR: the client sees the body end early
