"""A loopback model hub for tests: serves local folders in the Hugging Face Hub and ModelScope URL layouts.

The real clients (``huggingface_hub`` 2.4, ``modelscope`` 1.40 / ``modelscope-hub`` 0.5) talk to it unmodified,
pointed at it through their endpoint override. Two listening sockets on 127.0.0.1, both on free ports:

* the *hub* (``server.url``): the API and the download entry points of both layouts;
* a *CDN* (another origin, like the real LFS/OSS storage hosts): large (LFS) files are answered on the hub with a
  ``302`` to a URL there, as huggingface.co does (with ``X-Linked-Etag``/``X-Linked-Size`` on the redirect) and as
  modelscope.cn does (redirect to OSS).

Hugging Face layout (what ``snapshot_download`` / ``hf_hub_download`` / ``HfApi`` call):

* ``GET  /api/models/{repo}[/revision/{rev}]``      model info (``sha``, ``siblings``)
* ``GET  /api/models/{repo}/tree/{rev}[/{dir}]``    file listing (``recursive``, cursor pagination via ``Link``)
* ``POST /api/models/{repo}/paths-info/{rev}``      listing of given paths
* ``HEAD|GET /{repo}/resolve/{rev}/{path}``         ``X-Repo-Commit``, ``ETag`` (git blob sha1) for plain files;
  ``302`` + ``X-Linked-Etag`` (sha256) + ``X-Linked-Size`` for LFS files
* errors carry ``X-Error-Code`` (``RepoNotFound``, ``RevisionNotFound``, ``EntryNotFound``) as the real Hub does.

ModelScope layout (``/api/v1``, what ``modelscope_hub``'s legacy client calls):

* ``GET /api/v1/models/{owner}/{name}``                                  repo info
* ``GET /api/v1/models/{owner}/{name}/repo/files?Revision=&Recursive=&Root=``  listing (``Path``, ``Size``,
  ``Sha256``, ``Type``, ``IsLFS``, ``Revision``) wrapped in ``{"Code": 200, "Data": {"Files": [...]}}``
* ``GET|HEAD /api/v1/models/{owner}/{name}/repo?Revision=&FilePath=``    the file (LFS files: ``302`` to the CDN)
* ``GET /api/v1/repos/internalAccelerationInfo``                         (region probe; answers "no acceleration")

All file bodies honour ``Range: bytes=a-[b]`` (``206`` + ``Content-Range``; ``416`` when unsatisfiable).

Fault injection (per repo file path, counted down; ``times=None`` means forever):

* ``cut(path, after, times=1)``      send the full ``Content-Length`` header, then ``after`` bytes, then drop the
  connection (a network cut mid-body);
* ``corrupt(path, times=None)``      serve the right number of bytes with some of them flipped;
* ``stall(path, after, times=1)``    send ``after`` bytes, then hang (until ``release()``, ``stop()`` or
  ``stall_timeout``) before dropping the connection: lets a test kill a client process mid-download;
* ``fail(path, status=500, times=1)`` answer the body request with an error status.

Every request is logged (``server.log``) with the repo file it concerns, its ``Range`` header, status and bytes
sent; ``gets(path)`` / ``count(path)`` summarise that for assertions.

Bounded: request sockets time out, stalls are capped, ``stop()`` (called by the fixture / context manager) ends
both servers and releases any stalled handler.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, quote, unquote, urlsplit

# Files stored in LFS on the real hubs: tracked by the default .gitattributes, or large.
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".onnx", ".msgpack", ".h5", ".npz")
LFS_MIN_SIZE = 10 * 1024 * 1024
CHUNK = 1 << 20


_DIGESTS: dict[tuple[str, int, int], tuple[str, str]] = {}
_DIGESTS_LOCK = threading.Lock()


def _digests(path: Path) -> tuple[str, str]:
    """(sha256, git blob sha1) of a file, cached by (path, size, mtime) so each test's server starts fast."""
    st = path.stat()
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns)
    with _DIGESTS_LOCK:
        if key in _DIGESTS:
            return _DIGESTS[key]
    sha256, sha1 = hashlib.sha256(), hashlib.sha1()
    sha1.update(b"blob %d\0" % st.st_size)
    with path.open("rb") as f:
        while block := f.read(CHUNK):
            sha256.update(block)
            sha1.update(block)
    out = (sha256.hexdigest(), sha1.hexdigest())
    with _DIGESTS_LOCK:
        _DIGESTS[key] = out
    return out


@dataclass(frozen=True)
class HubFile:
    path: str  # repo-relative, '/'-separated
    source: Path
    size: int
    sha256: str
    git_oid: str  # git blob sha1 of the content (what a plain git file's ETag/oid is)
    lfs: bool

    @property
    def lfs_pointer(self) -> bytes:
        return (
            f"version https://git-lfs.github.com/spec/v1\noid sha256:{self.sha256}\nsize {self.size}\n"
        ).encode()

    @property
    def oid(self) -> str:
        """The git object id the hub reports: the blob of the file, or of its LFS pointer."""
        if not self.lfs:
            return self.git_oid
        data = self.lfs_pointer
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    repo_id: str
    files: dict[str, HubFile]
    commit: str
    revisions: set[str]  # branch / tag names that resolve to `commit`

    def resolve(self, revision: str) -> str | None:
        if revision == self.commit or revision in self.revisions:
            return self.commit
        return None

    def dirs(self) -> list[str]:
        out: set[str] = set()
        for p in self.files:
            parts = p.split("/")[:-1]
            for i in range(1, len(parts) + 1):
                out.add("/".join(parts[:i]))
        return sorted(out)


@dataclass
class Fault:
    kind: str  # cut | corrupt | stall | fail
    path: str
    times: int | None
    after: int = 0
    status: int = 500


@dataclass
class Request:
    server: str  # "hub" | "cdn"
    method: str
    path: str  # URL path
    query: str
    range: str | None
    file: str | None  # repo file path the request is about, if any
    status: int = 0
    sent: int = 0  # body bytes written
    fault: str | None = None


class HubServer:
    """Serve ``{repo_id: folder}`` in both hub layouts on loopback. Use as a context manager or start()/stop()."""

    def __init__(
        self,
        repos: dict[str, Path] | None = None,
        *,
        revisions: tuple[str, ...] = ("main", "master"),
        tree_page_size: int = 1000,
        stall_timeout: float = 30.0,
        request_timeout: float = 30.0,
    ) -> None:
        self.repos: dict[str, Repo] = {}
        self.tree_page_size = tree_page_size
        self.stall_timeout = stall_timeout
        self.request_timeout = request_timeout
        self.log: list[Request] = []
        self._faults: list[Fault] = []
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._release = threading.Event()
        self._stalled = threading.Condition(self._lock)
        self._stalled_bytes: dict[str, int] = {}
        self._hub: ThreadingHTTPServer | None = None
        self._cdn: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []
        for repo_id, folder in (repos or {}).items():
            self.add_repo(repo_id, folder, revisions=revisions)

    # ------------------------------------------------------------------ repos
    def add_repo(self, repo_id: str, folder: Path, *, revisions: tuple[str, ...] = ("main", "master")) -> Repo:
        folder = Path(folder)
        files: dict[str, HubFile] = {}
        for p in sorted(folder.rglob("*")):
            if not p.is_file():
                continue
            rel = p.relative_to(folder).as_posix()
            if rel.startswith(".cache/") or rel.startswith(".git/"):
                continue
            size = p.stat().st_size
            sha256, git_oid = _digests(p)
            files[rel] = HubFile(
                path=rel,
                source=p,
                size=size,
                sha256=sha256,
                git_oid=git_oid,
                lfs=p.name.endswith(LFS_SUFFIXES) or size >= LFS_MIN_SIZE,
            )
        tree = "".join(f"{f.path}\0{f.oid}\n" for f in files.values())
        commit = hashlib.sha1(f"{repo_id}\n{tree}".encode()).hexdigest()
        repo = Repo(repo_id=repo_id, files=files, commit=commit, revisions=set(revisions))
        self.repos[repo_id] = repo
        return repo

    # ------------------------------------------------------------------ faults
    def cut(self, path: str, after: int, times: int | None = 1) -> None:
        self._add_fault(Fault("cut", path, times, after=after))

    def corrupt(self, path: str, times: int | None = None) -> None:
        self._add_fault(Fault("corrupt", path, times))

    def stall(self, path: str, after: int, times: int | None = 1) -> None:
        self._add_fault(Fault("stall", path, times, after=after))

    def fail(self, path: str, status: int = 500, times: int | None = 1) -> None:
        self._add_fault(Fault("fail", path, times, status=status))

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def release(self) -> None:
        """Let stalled downloads go on (they then drop the connection)."""
        self._release.set()

    def wait_stalled(self, path: str, timeout: float = 30.0) -> int:
        """Block until a stalled body of ``path`` has sent its bytes; returns how many."""
        deadline = time.monotonic() + timeout
        with self._stalled:
            while path not in self._stalled_bytes:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(f"no stalled download of {path} within {timeout}s")
                self._stalled.wait(left)
            return self._stalled_bytes[path]

    def _add_fault(self, fault: Fault) -> None:
        with self._lock:
            self._faults.append(fault)

    def _take_fault(self, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.path == path and (fault.times is None or fault.times > 0):
                    if fault.times is not None:
                        fault.times -= 1
                    return fault
        return None

    # ------------------------------------------------------------------ request log
    def requests_for(self, path: str, method: str | None = "GET", *, body_only: bool = True) -> list[Request]:
        """Logged requests about repo file ``path`` (by default: GETs that carry the file body)."""
        with self._lock:
            out = [r for r in self.log if r.file == path and (method is None or r.method == method)]
        if body_only:
            out = [r for r in out if r.status in (200, 206)]
        return out

    def gets(self, path: str) -> list[Request]:
        return self.requests_for(path, "GET")

    def count(self, path: str, method: str | None = "GET") -> int:
        return len(self.requests_for(path, method))

    def reset_log(self) -> None:
        with self._lock:
            self.log.clear()

    # ------------------------------------------------------------------ lifecycle
    @property
    def url(self) -> str:
        assert self._hub is not None, "server not started"
        return f"http://127.0.0.1:{self._hub.server_address[1]}"

    @property
    def cdn_url(self) -> str:
        assert self._cdn is not None, "server not started"
        return f"http://127.0.0.1:{self._cdn.server_address[1]}"

    def start(self) -> "HubServer":
        self._hub = _make_server(self, "hub")
        self._cdn = _make_server(self, "cdn")
        for srv in (self._hub, self._cdn):
            t = threading.Thread(target=srv.serve_forever, kwargs={"poll_interval": 0.1}, daemon=True)
            t.start()
            self._threads.append(t)
        return self

    def stop(self) -> None:
        self._stop.set()
        self._release.set()
        for srv in (self._hub, self._cdn):
            if srv is not None:
                srv.shutdown()
                srv.server_close()
        for t in self._threads:
            t.join(timeout=5)
        self._threads.clear()

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    hub: HubServer
    role: str


def _make_server(hub: HubServer, role: str) -> _Server:
    srv = _Server(("127.0.0.1", 0), _Handler)
    srv.hub = hub
    srv.role = role
    return srv


_RANGE_RE = re.compile(r"^bytes=(\d*)-(\d*)$")


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        self.connection.settimeout(self.server.hub.request_timeout)

    def log_message(self, format, *args) -> None:  # silence stderr
        pass

    # ------------------------------------------------------------------ dispatch
    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def _dispatch(self, method: str) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        self.rec = Request(
            server=self.server.role,
            method=method,
            path=unquote(split.path),
            query=split.query,
            range=self.headers.get("Range"),
            file=None,
        )
        with hub._lock:
            hub.log.append(self.rec)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        self.method = method
        try:
            if self.server.role == "cdn":
                self._cdn(split.path)
            elif split.path.startswith("/api/v1/"):
                self._modelscope(split.path[len("/api/v1/") :])
            elif split.path.startswith("/api/"):
                self._hf_api(split.path[len("/api/") :])
            elif "/resolve/" in split.path:
                self._hf_resolve(split.path)
            else:
                self._send_json(404, {"error": "Not Found"})
        except (BrokenPipeError, ConnectionResetError, socket.timeout):
            self.close_connection = True

    # ------------------------------------------------------------------ helpers
    def _read_body(self) -> bytes:
        n = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(n) if n else b""

    def _send_json(self, status: int, payload, headers: dict[str, str] | None = None) -> None:
        data = json.dumps(payload).encode()
        self.rec.status = status
        self.send_response(status)
        self.send_header("Content-Type", "application/json; charset=utf-8")
        self.send_header("Content-Length", str(len(data)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.method != "HEAD":
            self.wfile.write(data)

    def _send_empty(self, status: int, headers: dict[str, str]) -> None:
        self.rec.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        if "Content-Length" not in headers:
            self.send_header("Content-Length", "0")
        self.end_headers()

    def _repo(self, repo_id: str) -> Repo | None:
        return self.server.hub.repos.get(repo_id)

    # ------------------------------------------------------------------ file bodies (both layouts, hub or CDN)
    def _send_file(self, f: HubFile, extra: dict[str, str]) -> None:
        hub = self.server.hub
        self.rec.file = f.path
        start, end = 0, f.size - 1
        status = 200
        rng = self.headers.get("Range")
        if rng:
            m = _RANGE_RE.match(rng.strip())
            if m is None or (m.group(1) == "" and m.group(2) == ""):
                self._send_empty(416, {**extra, "Content-Range": f"bytes */{f.size}"})
                return
            if m.group(1) == "":  # suffix range: last N bytes
                start = max(f.size - int(m.group(2)), 0)
            else:
                start = int(m.group(1))
                if m.group(2):
                    end = min(int(m.group(2)), f.size - 1)
            if start >= f.size or start > end:
                self._send_empty(416, {**extra, "Content-Range": f"bytes */{f.size}"})
                return
            status = 206
        length = end - start + 1
        fault = hub._take_fault(f.path) if self.method == "GET" else None
        if fault is not None:
            self.rec.fault = fault.kind
        if fault is not None and fault.kind == "fail":
            self._send_json(fault.status, {"error": f"injected failure for {f.path}"}, extra)
            return
        headers = {
            **extra,
            "Content-Type": "application/octet-stream",
            "Content-Length": str(length),
            "Accept-Ranges": "bytes",
        }
        if status == 206:
            headers["Content-Range"] = f"bytes {start}-{end}/{f.size}"
        self.rec.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.method == "HEAD":
            return
        limit = length
        if fault is not None and fault.kind in ("cut", "stall"):
            limit = max(0, min(length, fault.after - start if fault.after > start else fault.after))
        flip_at = f.size // 2 if fault is not None and fault.kind == "corrupt" else -1
        with f.source.open("rb") as src:
            src.seek(start)
            pos, left = start, limit
            while left > 0:
                block = src.read(min(CHUNK, left))
                if not block:
                    break
                if pos <= flip_at < pos + len(block):
                    b = bytearray(block)
                    for i in range(flip_at - pos, min(flip_at - pos + 64, len(b))):
                        b[i] ^= 0xFF
                    block = bytes(b)
                self.wfile.write(block)
                self.rec.sent += len(block)
                pos += len(block)
                left -= len(block)
        if fault is not None and fault.kind in ("cut", "stall"):
            self.wfile.flush()
            if fault.kind == "stall":
                with hub._stalled:
                    hub._stalled_bytes[f.path] = self.rec.sent
                    hub._stalled.notify_all()
                hub._release.wait(hub.stall_timeout)
            # Drop the connection without finishing the announced body.
            self.close_connection = True
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    # ------------------------------------------------------------------ CDN
    def _cdn(self, path: str) -> None:
        # /{layout}/{owner}/{name}/{commit}/{file path...}
        parts = unquote(path).lstrip("/").split("/")
        if len(parts) < 5 or self.method not in ("GET", "HEAD"):
            self._send_empty(404, {})
            return
        repo = self._repo(f"{parts[1]}/{parts[2]}")
        commit, fpath = parts[3], "/".join(parts[4:])
        if repo is None or repo.commit != commit or fpath not in repo.files:
            self._send_empty(404, {})
            return
        f = repo.files[fpath]
        self._send_file(f, {"ETag": f'"{f.sha256}"'})

    def _cdn_location(self, layout: str, repo: Repo, f: HubFile) -> str:
        return f"{self.server.hub.cdn_url}/{layout}/{repo.repo_id}/{repo.commit}/{quote(f.path)}?sig=loopback"

    # ------------------------------------------------------------------ Hugging Face
    def _hf_error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
        headers = {"X-Error-Code": code, "X-Error-Message": message}
        if commit:
            headers["X-Repo-Commit"] = commit
        self._send_json(status, {"error": message}, headers)

    def _hf_repo_not_found(self) -> None:
        # The real Hub answers 401 for a repo that does not exist (or is private).
        self._hf_error(401, "RepoNotFound", "Repository not found")

    def _hf_tree_entry(self, f: HubFile) -> dict:
        entry = {"type": "file", "oid": f.oid, "size": f.size, "path": f.path}
        if f.lfs:
            entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(f.lfs_pointer)}
        return entry

    def _hf_api(self, rest: str) -> None:
        m = re.match(r"^models/(?P<repo>[^/]+/[^/]+)(?P<tail>/.*)?$", rest)
        if m is None:
            self._send_json(404, {"error": "Not Found"})
            return
        repo = self._repo(unquote(m.group("repo")))
        tail = m.group("tail") or ""
        if repo is None:
            self._hf_repo_not_found()
            return
        if tail == "" or tail.startswith("/revision/"):
            rev = unquote(tail[len("/revision/") :]) if tail else "main"
            commit = repo.resolve(rev)
            if commit is None:
                self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                return
            siblings = []
            for f in repo.files.values():
                s = {"rfilename": f.path, "size": f.size, "blobId": f.oid}
                if f.lfs:
                    s["lfs"] = {"sha256": f.sha256, "size": f.size, "pointerSize": len(f.lfs_pointer)}
                siblings.append(s)
            self._send_json(
                200,
                {
                    "_id": commit[:24],
                    "id": repo.repo_id,
                    "modelId": repo.repo_id,
                    "author": repo.repo_id.split("/")[0],
                    "sha": commit,
                    "lastModified": "2025-01-01T00:00:00.000Z",
                    "private": False,
                    "gated": False,
                    "disabled": False,
                    "tags": [],
                    "siblings": siblings,
                },
            )
            return
        m2 = re.match(r"^/(?P<kind>tree|paths-info)/(?P<rev>[^/]+)(?P<sub>/.*)?$", tail)
        if m2 is None:
            self._send_json(404, {"error": "Not Found"})
            return
        rev = unquote(m2.group("rev"))
        commit = repo.resolve(rev)
        if commit is None:
            self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        if m2.group("kind") == "paths-info":
            body = self._read_body().decode()
            ctype = self.headers.get("Content-Type", "")
            if "json" in ctype:
                paths = json.loads(body or "{}").get("paths", [])
            else:
                paths = parse_qs(body).get("paths", [])
            out = []
            for p in paths:
                p = p.strip("/")
                if p in repo.files:
                    out.append(self._hf_tree_entry(repo.files[p]))
                elif p in repo.dirs():
                    out.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": p})
            self._send_json(200, out)
            return
        sub = unquote(m2.group("sub") or "").strip("/")
        recursive = self.query.get("recursive", "false").lower() in ("1", "true")
        entries: list[dict] = []
        if sub and sub not in repo.dirs():
            self._hf_error(404, "EntryNotFound", f"{sub} does not exist on {rev}", commit)
            return
        prefix = f"{sub}/" if sub else ""
        for d in repo.dirs():
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                entries.append({"type": "directory", "oid": "0" * 40, "size": 0, "path": d})
        for f in repo.files.values():
            if f.path.startswith(prefix) and (recursive or "/" not in f.path[len(prefix) :]):
                entries.append(self._hf_tree_entry(f))
        entries.sort(key=lambda e: e["path"])
        cursor = int(self.query.get("cursor") or 0)
        size = self.server.hub.tree_page_size
        page = entries[cursor : cursor + size]
        headers = {}
        if cursor + size < len(entries):
            q = f"recursive={str(recursive).lower()}&expand={self.query.get('expand', 'false')}&cursor={cursor + size}"
            base = f"{self.server.hub.url}/api/models/{repo.repo_id}/tree/{quote(rev, safe='')}"
            if sub:
                base += "/" + quote(sub)
            headers["Link"] = f'<{base}?{q}>; rel="next"'
        self._send_json(200, page, headers)

    def _hf_resolve(self, path: str) -> None:
        m = re.match(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>.+)$", path)
        if m is None or self.method not in ("GET", "HEAD"):
            self._send_json(404, {"error": "Not Found"})
            return
        repo = self._repo(unquote(m.group("repo")))
        if repo is None:
            self._hf_repo_not_found()
            return
        rev = unquote(m.group("rev"))
        commit = repo.resolve(rev)
        if commit is None:
            self._hf_error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
            return
        fpath = unquote(m.group("file"))
        f = repo.files.get(fpath)
        if f is None:
            self._hf_error(404, "EntryNotFound", f"{fpath} does not exist on {rev}", commit)
            return
        self.rec.file = f.path
        if f.lfs:
            self._send_empty(
                302,
                {
                    "Location": self._cdn_location("hf-lfs", repo, f),
                    "X-Repo-Commit": commit,
                    "ETag": f'"{f.oid}"',
                    "X-Linked-Etag": f'"{f.sha256}"',
                    "X-Linked-Size": str(f.size),
                    "Content-Type": "text/plain; charset=utf-8",
                },
            )
            return
        self._send_file(f, {"X-Repo-Commit": commit, "ETag": f'"{f.git_oid}"'})

    # ------------------------------------------------------------------ ModelScope
    def _ms_error(self, status: int, message: str) -> None:
        self._send_json(status, {"Code": 10010205001, "Message": message, "RequestId": "loopback", "Success": False})

    def _ms_ok(self, data) -> None:
        self._send_json(200, {"Code": 200, "Data": data, "Message": "success", "RequestId": "loopback", "Success": True})

    def _modelscope(self, rest: str) -> None:
        if rest == "repos/internalAccelerationInfo":
            self._ms_ok({"InternalRegionQueryAddress": ""})
            return
        m = re.match(r"^models/(?P<repo>[^/]+/[^/]+)(?P<tail>/.*)?$", rest)
        if m is None:
            self._ms_error(404, "Not Found")
            return
        repo_id = unquote(m.group("repo"))
        repo = self._repo(repo_id)
        tail = m.group("tail") or ""
        if repo is None:
            self._ms_error(404, f"Model {repo_id} does not exist (模型不存在)")
            return
        if tail == "":
            owner, name = repo.repo_id.split("/", 1)
            self._ms_ok({"Id": 1, "Name": name, "Path": owner, "ChineseName": name, "Revision": "master"})
            return
        rev = self.query.get("Revision") or "master"
        commit = repo.resolve(rev)
        if tail == "/revisions":
            names = sorted(repo.revisions)
            self._ms_ok({"RevisionMap": {"Branches": [{"Revision": r} for r in names], "Tags": []}})
            return
        if commit is None:
            self._ms_error(404, f"Revision {rev} of {repo_id} does not exist")
            return
        if tail == "/repo/files":
            root = (self.query.get("Root") or "").strip("/")
            recursive = self.query.get("Recursive", "False").lower() in ("1", "true")
            prefix = f"{root}/" if root else ""
            if root and root not in repo.dirs():
                self._ms_error(404, f"Path {root} does not exist")
                return
            files = []
            for d in repo.dirs():
                if d.startswith(prefix) and (recursive or "/" not in d[len(prefix) :]):
                    files.append({"Name": d.rsplit("/", 1)[-1], "Path": d, "Type": "tree", "Size": 0, "Revision": commit})
            for f in repo.files.values():
                if f.path.startswith(prefix) and (recursive or "/" not in f.path[len(prefix) :]):
                    files.append(
                        {
                            "Name": f.path.rsplit("/", 1)[-1],
                            "Path": f.path,
                            "Type": "blob",
                            "Size": f.size,
                            "Sha256": f.sha256,
                            "IsLFS": f.lfs,
                            "Revision": commit,
                            "CommitMessage": "upload",
                            "CommittedDate": 1735689600,
                            "Mode": "100644",
                        }
                    )
            self._ms_ok({"Files": files, "LatestCommitter": {"Id": commit}})
            return
        if tail == "/repo":
            fpath = self.query.get("FilePath") or ""
            f = repo.files.get(fpath.lstrip("/"))
            if f is None:
                self._ms_error(404, f"File {fpath} does not exist")
                return
            self.rec.file = f.path
            if f.lfs:
                self._send_empty(302, {"Location": self._cdn_location("ms-oss", repo, f), "X-Linked-ETag": f.sha256})
                return
            self._send_file(f, {"ETag": f'"{f.git_oid}"'})
            return
        self._ms_error(404, "Not Found")


__all__ = ["HubServer", "HubFile", "Repo", "Request", "Fault"]
