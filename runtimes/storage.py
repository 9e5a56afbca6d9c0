"""Model weights on disk and in RAM: the shared Hugging Face cache, free space, the page cache.

Where a model's bytes are decides how long a cold start takes: on the Hub (a download, minutes),
on disk (the engine reads them, tens of seconds for 30 GB) or already in the OS page cache (a few
seconds). This module knows the three places and nothing else; it imports only the standard
library, so the sim engine (whose image has no huggingface_hub) can resolve snapshots with it.

- The cache layout is huggingface_hub's: `$HF_HOME/hub/models--<org>--<name>/` with `blobs/<etag>`
  (the file contents), `snapshots/<commit>/<path>` (symlinks into blobs) and `refs/<branch>`
  (a commit). A finished download also leaves `gateway/<commit>.json`, the list of files it
  fetched, so "complete" means every listed file is there, not merely that a folder exists.
- `select_files` decides what an engine needs from a repo: safetensors weights, configs and
  tokenizer files; `.bin` weights only when the repo has no safetensors.
- `residency` asks the kernel (`mincore(2)` on an mmap of each file) how much of the weights is
  in RAM; `prime` reads the rest in with large sequential reads after a `POSIX_FADV_WILLNEED`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import fnmatch
import json
import logging
import mmap
import os
import re
import shutil
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

GB = 1024**3
COMMIT_RE = re.compile(r"^[0-9a-f]{40}$")
# What an engine loads, when the repo has safetensors weights (vLLM's and SGLang's default).
SAFETENSORS_PATTERNS = (
    "*.safetensors", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja",
)  # fmt: skip
# The same for an older repo with only PyTorch pickles.
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.json", "*.model", "*.tiktoken", "*.txt", "*.jinja")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
# Reads of this size keep a disk (or an NFS mount) streaming; one buffer is reused.
PRIME_BLOCK_BYTES = 16 * 1024 * 1024
# mincore is asked about at most this much of a file at a time, so its vector stays small.
_MINCORE_WINDOW_BYTES = 1 * GB
# A file this resident counts as in RAM; a few pages are always evicted or not yet read.
RESIDENT_ENOUGH = 0.98


class StorageError(RuntimeError):
    """The cache or the page cache could not do what was asked; the message says why."""


class InsufficientDiskSpace(StorageError):
    """Not enough free disk space for a download (the message has the figures)."""


# -- the cache layout --------------------------------------------------------------------------


def hub_dir(hf_home: Path) -> Path:
    return Path(hf_home) / "hub"


def repo_folder_name(repo_id: str) -> str:
    return "models--" + repo_id.replace("/", "--")


def repo_id_from_folder(name: str) -> str | None:
    if not name.startswith("models--"):
        return None
    return name[len("models--"):].replace("--", "/")


@dataclass(frozen=True)
class RepoCache:
    """One model repository in the cache at `hf_home`."""

    hf_home: Path
    repo_id: str

    @property
    def path(self) -> Path:
        return hub_dir(self.hf_home) / repo_folder_name(self.repo_id)

    @property
    def blobs(self) -> Path:
        return self.path / "blobs"

    def commit_for(self, revision: str | None) -> str | None:
        """The commit that `revision` (a branch, tag or commit; None: main) names in the cache."""
        revision = revision or "main"
        if COMMIT_RE.match(revision):
            return revision if (self.path / "snapshots" / revision).is_dir() else None
        try:
            commit = (self.path / "refs" / revision).read_text().strip()
        except OSError:
            return None
        return commit or None

    def snapshot_dir(self, revision: str | None) -> Path:
        """Where the snapshot of `revision` is (or would be, once downloaded)."""
        commit = self.commit_for(revision) or revision or "main"
        return self.path / "snapshots" / commit

    def manifest_path(self, commit: str) -> Path:
        return self.path / "gateway" / f"{commit}.json"

    def read_manifest(self, commit: str) -> dict | None:
        try:
            return json.loads(self.manifest_path(commit).read_text())
        except (OSError, ValueError):
            return None

    def write_manifest(self, commit: str, revision: str | None, files: dict[str, int]) -> None:
        path = self.manifest_path(commit)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps({
            "repo_id": self.repo_id, "revision": revision or "main", "commit": commit,
            "files": files, "bytes": sum(files.values()), "completed_at": time.time(),
        }, indent=1))
        tmp.replace(path)

    def write_ref(self, revision: str | None, commit: str) -> None:
        revision = revision or "main"
        if revision == commit:
            return
        ref = self.path / "refs" / revision
        ref.parent.mkdir(parents=True, exist_ok=True)
        tmp = ref.with_name(f".{ref.name}.tmp")
        tmp.write_text(commit)
        tmp.replace(ref)

    def missing_files(self, revision: str | None) -> list[str] | None:
        """Files of the snapshot that are not on disk ([] when complete); None: no snapshot.

        With a manifest (left by our downloads) every listed file must be there with its size.
        Without one (a cache filled by another tool) the snapshot must hold config.json and
        weights, and every shard its safetensors index names.
        """
        commit = self.commit_for(revision)
        if commit is None:
            return None
        snapshot = self.path / "snapshots" / commit
        if not snapshot.is_dir():
            return None
        manifest = self.read_manifest(commit)
        if manifest is not None:
            missing = []
            for name, size in manifest.get("files", {}).items():
                try:
                    if (snapshot / name).stat().st_size != size:
                        missing.append(name)
                except OSError:
                    missing.append(name)
            return missing
        return _missing_without_manifest(snapshot)

    def is_complete(self, revision: str | None) -> bool:
        return self.missing_files(revision) == []

    def weight_files(self, revision: str | None) -> list[Path]:
        """The weight files of the snapshot, as the blob files they point to, in load order."""
        snapshot = self.snapshot_dir(revision)
        if not snapshot.is_dir():
            return []
        found = sorted(p for p in snapshot.rglob("*") if p.name.endswith(".safetensors"))
        if not found:
            found = sorted(p for p in snapshot.rglob("*") if p.name.endswith(WEIGHT_SUFFIXES[1:]))
        return [p.resolve() for p in found if p.is_file()]


def _missing_without_manifest(snapshot: Path) -> list[str]:
    missing = [] if (snapshot / "config.json").is_file() else ["config.json"]
    indexes = list(snapshot.glob("*.safetensors.index.json"))
    if indexes:
        for index in indexes:
            try:
                shards = set(json.loads(index.read_text()).get("weight_map", {}).values())
            except (OSError, ValueError):
                missing.append(index.name)
                continue
            missing += sorted(s for s in shards if not (snapshot / s).is_file())
    elif not any(p.name.endswith(WEIGHT_SUFFIXES) for p in snapshot.iterdir()):
        missing.append("*.safetensors")
    return missing


def snapshot_complete(hf_home: Path, repo_id: str, revision: str | None = None) -> bool:
    return RepoCache(Path(hf_home), repo_id).is_complete(revision)


# -- choosing files ----------------------------------------------------------------------------


def _matches(path: str, patterns: Iterable[str]) -> bool:
    # `*` crosses `/`, as in huggingface_hub's own filter, so `*.json` finds `sub/x.json` too.
    return any(fnmatch.fnmatchcase(path, p + "*" if p.endswith("/") else p) for p in patterns)


def default_allow_patterns(paths: Iterable[str]) -> tuple[str, ...]:
    """Safetensors and what goes with them, or pickled weights for a repo with no safetensors."""
    if any(p.endswith(".safetensors") for p in paths):
        return SAFETENSORS_PATTERNS
    return PICKLE_PATTERNS


def select_files(
    paths: Sequence[str],
    allow: Sequence[str] | None = None,
    ignore: Sequence[str] | None = None,
    weight_map: dict | None = None,
) -> list[str]:
    """The files of a repo an engine needs, from the repo's file list.

    `allow` and `ignore` (the catalog's `hf_allow_patterns` / `hf_ignore_patterns`) replace the
    defaults. `weight_map` is the safetensors index's map: with the default patterns, a
    safetensors file the index does not name (a `consolidated.safetensors` beside the shards,
    in Mistral's repos) is a second copy of the weights and is left out.
    """
    allow = tuple(allow) if allow is not None else default_allow_patterns(paths)
    chosen = [p for p in paths if _matches(p, allow) and not _matches(p, ignore or ())]
    if weight_map and not ignore and allow == SAFETENSORS_PATTERNS:
        shards = set(weight_map.values())
        chosen = [p for p in chosen if not p.endswith(".safetensors") or p in shards]
    return sorted(chosen)


# -- the cached repositories -------------------------------------------------------------------


@dataclass(frozen=True)
class CachedRevision:
    commit: str
    refs: tuple[str, ...]
    files: int
    complete: bool


@dataclass(frozen=True)
class CachedRepo:
    repo_id: str
    path: Path
    size_bytes: int
    revisions: tuple[CachedRevision, ...]
    last_access: float  # newest access time of a blob (coarse: relatime, noatime mounts)
    last_modified: float
    incomplete_bytes: int = 0  # downloads under way or abandoned
    blob_paths: tuple[Path, ...] = field(default=(), repr=False)


def scan_repo(hf_home: Path, repo_id: str) -> CachedRepo | None:
    cache = RepoCache(Path(hf_home), repo_id)
    if not cache.path.is_dir():
        return None
    size = incomplete = 0
    last_access = last_modified = 0.0
    blobs = []
    for blob in cache.blobs.glob("*") if cache.blobs.is_dir() else ():
        try:
            st = blob.stat()
        except OSError:
            continue
        if blob.name.endswith(".incomplete"):
            incomplete += st.st_size
            continue
        blobs.append(blob)
        size += st.st_size
        last_access = max(last_access, st.st_atime)
        last_modified = max(last_modified, st.st_mtime)
    refs: dict[str, list[str]] = {}
    refs_dir = cache.path / "refs"
    for ref in refs_dir.rglob("*") if refs_dir.is_dir() else ():
        if ref.is_file():
            try:
                refs.setdefault(ref.read_text().strip(), []).append(
                    str(ref.relative_to(refs_dir)))
            except OSError:
                continue
    revisions = []
    snapshots = cache.path / "snapshots"
    for snapshot in sorted(snapshots.iterdir()) if snapshots.is_dir() else ():
        if not snapshot.is_dir():
            continue
        files = sum(1 for p in snapshot.rglob("*") if p.is_file())
        revisions.append(CachedRevision(
            commit=snapshot.name, refs=tuple(sorted(refs.get(snapshot.name, ()))), files=files,
            complete=cache.missing_files(snapshot.name) == [],
        ))
    return CachedRepo(repo_id=repo_id, path=cache.path, size_bytes=size,
                      revisions=tuple(revisions), last_access=last_access,
                      last_modified=last_modified, incomplete_bytes=incomplete,
                      blob_paths=tuple(blobs))


def list_cached(hf_home: Path) -> list[CachedRepo]:
    """Every model repository in the cache, by repo id."""
    hub = hub_dir(Path(hf_home))
    repos = []
    for folder in sorted(hub.glob("models--*")) if hub.is_dir() else ():
        repo_id = repo_id_from_folder(folder.name)
        scanned = scan_repo(Path(hf_home), repo_id) if repo_id and folder.is_dir() else None
        if scanned is not None:
            repos.append(scanned)
    return repos


def delete_repo(hf_home: Path, repo_id: str) -> int:
    """Remove a repository (every revision) from the cache; return the bytes freed."""
    scanned = scan_repo(Path(hf_home), repo_id)
    if scanned is None:
        return 0
    shutil.rmtree(scanned.path)
    shutil.rmtree(hub_dir(Path(hf_home)) / ".locks" / repo_folder_name(repo_id),
                  ignore_errors=True)
    return scanned.size_bytes + scanned.incomplete_bytes


# -- disk space --------------------------------------------------------------------------------


def free_bytes(path: Path) -> int:
    """Free bytes on the file system that holds `path` (or would, once created)."""
    path = Path(path).absolute()
    for candidate in (path, *path.parents):
        if candidate.exists():
            return shutil.disk_usage(candidate).free
    raise StorageError(f"no existing directory above {path}")


def check_free_space(path: Path, needed_bytes: int, margin_bytes: int, what: str) -> int:
    """Raise `InsufficientDiskSpace` unless `needed + margin` bytes are free; return free bytes."""
    free = free_bytes(path)
    if free < needed_bytes + margin_bytes:
        raise InsufficientDiskSpace(
            f"not enough disk space to download {what}: it needs {needed_bytes / GB:.2f} GB "
            f"plus a margin of {margin_bytes / GB:.2f} GB (DOWNLOAD_DISK_MARGIN_GB), and "
            f"{path} has {free / GB:.2f} GB free"
        )
    return free


# -- the page cache ----------------------------------------------------------------------------


class _Libc:
    """mmap, munmap and mincore from the C library, loaded on first use (Linux)."""

    _lib = None

    @classmethod
    def get(cls):
        if cls._lib is None:
            name = ctypes.util.find_library("c")
            lib = ctypes.CDLL(name, use_errno=True)
            if not hasattr(lib, "mincore"):
                raise StorageError("this C library has no mincore(2): residency is unknown here")
            lib.mmap.restype = ctypes.c_void_p
            lib.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int,
                                 ctypes.c_int, ctypes.c_long]
            lib.munmap.restype = ctypes.c_int
            lib.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
            lib.mincore.restype = ctypes.c_int
            lib.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t,
                                    ctypes.POINTER(ctypes.c_ubyte)]
            cls._lib = lib
        return cls._lib


_MAP_FAILED = ctypes.c_void_p(-1).value
# mincore sets bit 0 of a page's byte when the page is resident; the other bits are reserved.
_RESIDENT_BIT = bytes(b & 1 for b in range(256))


def resident_bytes(path: Path) -> tuple[int, int]:
    """(size, bytes of it in the page cache) of one file."""
    libc = _Libc.get()
    page = mmap.PAGESIZE
    fd = os.open(path, os.O_RDONLY)
    try:
        size = os.fstat(fd).st_size
        resident_pages = 0
        offset = 0
        while offset < size:
            length = min(_MINCORE_WINDOW_BYTES, size - offset)
            # A shared read-only mapping touches nothing: mincore reports the page cache as is.
            addr = libc.mmap(None, length, mmap.PROT_READ, mmap.MAP_SHARED, fd, offset)
            if addr in (None, _MAP_FAILED):
                raise StorageError(f"mmap of {path}: {os.strerror(ctypes.get_errno())}")
            try:
                pages = (length + page - 1) // page
                vector = (ctypes.c_ubyte * pages)()
                if libc.mincore(addr, length, vector) != 0:
                    raise StorageError(f"mincore of {path}: {os.strerror(ctypes.get_errno())}")
                resident_pages += bytes(vector).translate(_RESIDENT_BIT).count(1)
            finally:
                libc.munmap(addr, length)
            offset += length
        return size, min(size, resident_pages * page)
    finally:
        os.close(fd)


@dataclass(frozen=True)
class Residency:
    total_bytes: int
    resident_bytes: int
    files: int

    @property
    def fraction(self) -> float:
        return self.resident_bytes / self.total_bytes if self.total_bytes else 1.0

    def describe(self) -> dict:
        return {"weight_bytes": self.total_bytes, "resident_bytes": self.resident_bytes,
                "resident_fraction": round(self.fraction, 4), "files": self.files}


def residency(paths: Iterable[Path]) -> Residency:
    total = resident = count = 0
    for path in paths:
        size, in_ram = resident_bytes(path)
        total += size
        resident += in_ram
        count += 1
    return Residency(total, resident, count)


@dataclass(frozen=True)
class PrimeReport:
    read_bytes: int
    seconds: float
    files_read: int
    files_skipped: int  # already resident
    budget_bytes: int
    before: Residency
    after: Residency

    @property
    def gb_per_second(self) -> float:
        return self.read_bytes / GB / self.seconds if self.seconds > 0 else 0.0

    def describe(self) -> dict:
        return {
            "read_bytes": self.read_bytes, "seconds": round(self.seconds, 3),
            "gb_per_second": round(self.gb_per_second, 3), "files_read": self.files_read,
            "files_skipped": self.files_skipped, "budget_bytes": self.budget_bytes,
            "before": self.before.describe(), "after": self.after.describe(),
        }


def _read_into_cache(path: Path, length: int, buffer: bytearray) -> int:
    view = memoryview(buffer)
    done = 0
    fd = os.open(path, os.O_RDONLY)
    try:
        if hasattr(os, "posix_fadvise"):
            # Ask for the whole range at once (the kernel reads ahead asynchronously), and
            # mark the access sequential so readahead windows grow large.
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_SEQUENTIAL)
            os.posix_fadvise(fd, 0, length, os.POSIX_FADV_WILLNEED)
        while done < length:
            got = os.readv(fd, [view[: min(len(buffer), length - done)]])
            if got == 0:
                break
            done += got
    finally:
        os.close(fd)
    return done


def prime(paths: Sequence[Path], budget_bytes: int,
          block_bytes: int = PRIME_BLOCK_BYTES) -> PrimeReport:
    """Read `paths` into the page cache in order, at most `budget_bytes` of not-yet-resident data.

    A file already (nearly) resident is skipped; when the budget runs out mid-file, only the
    file's beginning is read, and the files after it are left alone.
    """
    started = time.monotonic()
    per_file = [(path, *resident_bytes(path)) for path in paths]
    before = Residency(sum(s for _, s, _ in per_file), sum(r for _, _, r in per_file),
                       len(per_file))
    left = budget_bytes
    read = files_read = skipped = 0
    buffer = bytearray(block_bytes)
    for path, size, in_ram in per_file:
        if size == 0 or in_ram >= size * RESIDENT_ENOUGH:
            skipped += 1
            continue
        if left <= 0:
            break
        missing = size - in_ram
        length = size if missing <= left else min(size, left + in_ram)
        read += _read_into_cache(path, length, buffer)
        left -= min(missing, length)
        files_read += 1
    seconds = time.monotonic() - started
    after = residency(path for path, _, _ in per_file)
    report = PrimeReport(read, seconds, files_read, skipped, budget_bytes, before, after)
    log.debug("primed %d file(s): read %.2f GB in %.2f s (%.2f GB/s); resident %.0f%% -> %.0f%%",
             files_read, read / GB, seconds, report.gb_per_second, before.fraction * 100,
             after.fraction * 100)
    return report


def evict(paths: Iterable[Path]) -> None:
    """Drop files from the page cache (flushed first: only clean pages can be dropped)."""
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def default_prime_budget() -> int:
    """Half of the machine's RAM: the rest stays for the engines' own CPU memory and the OS."""
    try:
        return os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE") // 2
    except (OSError, ValueError):
        return 8 * GB
