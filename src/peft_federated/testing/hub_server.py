"""A Hub-compatible HTTP server on loopback, for testing the real ``huggingface_hub`` client.

Standard library only. Start it in-process::

    with HubServer(tmp_path, tokens={"tok": "alice"}) as server:
        HfApi(endpoint=server.url, token="tok").create_repo("alice/demo")

or as a separate process (prints its URL on one line once it listens)::

    python -m peft_federated.testing.hub_server --root DIR --port 0 --token tok=alice \\
        --permission alice=org/* --lfs-mode lfs

(``python path/to/hub_server.py ...`` works too and skips importing the ``peft_federated`` package.)

``lfs_mode="regular"`` answers "regular" to every preupload query, so files travel base64 inside
the commit (works with xet on or off). ``lfs_mode="lfs"`` answers "lfs" for binary suffixes and
files of ``lfs_threshold`` bytes or more; the client must then run with xet disabled
(``HF_HUB_DISABLE_XET=1``) and uses git-LFS basic transfer with signed upload URLs.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fnmatch
import hashlib
import hmac
import json
import re
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

if __package__:
    from .hub_storage import (
        DEFAULT_BRANCH, REPO_TYPES, HubError, Repo, Storage, check_repo_path, git_blob_sha1, lfs_pointer,
        repo_not_found,
    )
else:  # run as a plain script (`python .../hub_server.py`): no package import, starts in a fraction of a second
    from hub_storage import (  # type: ignore[no-redef]
        DEFAULT_BRANCH, REPO_TYPES, HubError, Repo, Storage, check_repo_path, git_blob_sha1, lfs_pointer,
        repo_not_found,
    )

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".npy", ".npz", ".gz", ".zip", ".tar",
                ".parquet", ".arrow", ".h5", ".msgpack", ".onnx", ".pkl", ".png", ".jpg")
INVALID_CREDENTIALS = "Invalid credentials in Authorization header"
_PLURALS = {f"{t}s": t for t in REPO_TYPES}
_URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_CHUNK = 1 << 20


class HubServer:
    """Hub-compatible server over a :class:`Storage` root, served by a background thread.

    Args:
        root: directory holding all state; a new server on the same root sees the same repos.
        tokens: token -> user name.
        permissions: user -> repo ids (or globs such as ``"org/*"``) the user may write, besides
            the user's own namespace. Private repos are readable only by users who may write them.
        lfs_mode: ``"regular"`` or ``"lfs"`` (see the module docstring).
        lfs_threshold: in ``"lfs"`` mode, files of at least this many bytes are LFS files.
        page_size: page size of the commit and tree listings (``Link: rel="next"`` pagination).
    """

    def __init__(self, root: Path | str, tokens: dict[str, str], permissions: dict[str, list[str]] | None = None,
                 host: str = "127.0.0.1", port: int = 0, *, lfs_mode: str = "regular", lfs_threshold: int = 4096,
                 page_size: int = 50):
        if lfs_mode not in ("regular", "lfs"):
            raise ValueError(f"lfs_mode must be 'regular' or 'lfs', got {lfs_mode!r}")
        self.storage = Storage(root)
        self.tokens = dict(tokens)
        self.permissions = {u: list(p) for u, p in (permissions or {}).items()}
        self.lfs_mode = lfs_mode
        self.lfs_threshold = lfs_threshold
        self.page_size = page_size
        self.requests: list[tuple[str, str, int]] = []  # (method, path?query, status), for assertions in tests
        self._faults: list[tuple[int, int, str | None]] = []  # (remaining, status, path substring)
        self._lock = threading.Lock()
        self._conns: set[socket.socket] = set()  # open client connections, cut on stop()
        self._httpd = ThreadingHTTPServer((host, port), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self._thread: threading.Thread | None = None
        h, p = self._httpd.server_address[:2]
        self.url = f"http://{h}:{p}"

    # ---- lifecycle ---------------------------------------------------------------------------
    def start(self) -> HubServer:
        """Serve in a daemon thread; returns self."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                            name=f"HubServer {self.url}", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving, cut open keep-alive connections and close the listening socket."""
        if self._thread is not None:
            self._httpd.shutdown()
            self._thread.join()
            self._thread = None
        with self._lock:
            conns = list(self._conns)
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)
        self._httpd.server_close()

    def serve_forever(self) -> None:
        """Serve in the calling thread (used by the command line entry point)."""
        self._httpd.serve_forever(poll_interval=0.2)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ---- fault injection -----------------------------------------------------------------------
    def fail_next(self, n: int = 1, status: int = 503, path_contains: str | None = None) -> None:
        """Answer the next ``n`` requests (whose path contains ``path_contains``, if given) with ``status``."""
        with self._lock:
            self._faults.append((n, status, path_contains))

    def _take_fault(self, path: str) -> int | None:
        with self._lock:
            for i, (n, status, sub) in enumerate(self._faults):
                if sub is None or sub in path:
                    if n <= 1:
                        del self._faults[i]
                    else:
                        self._faults[i] = (n - 1, status, sub)
                    return status
        return None

    # ---- policy ------------------------------------------------------------------------------
    def may_write(self, user: str | None, repo_id: str) -> bool:
        if user is None:
            return False
        return repo_id.split("/")[0] == user or any(
            fnmatch.fnmatchcase(repo_id, pat) for pat in self.permissions.get(user, []))

    def upload_mode(self, path: str, size: int) -> str:
        if self.lfs_mode == "lfs" and (size >= self.lfs_threshold or path.lower().endswith(LFS_SUFFIXES)):
            return "lfs"
        return "regular"

    def sign(self, action: str, oid: str, size: int, expires: int) -> str:
        msg = f"{action}:{oid}:{size}:{expires}".encode()
        return hmac.new(self.storage.secret, msg, hashlib.sha256).hexdigest()


def _entry_json(path: str, e: dict[str, Any]) -> dict[str, Any]:
    if e["lfs"]:
        pointer = lfs_pointer(e["sha256"], e["size"])
        return {"type": "file", "path": path, "size": e["size"], "oid": e["oid"],
                "lfs": {"oid": e["sha256"], "size": e["size"], "pointerSize": len(pointer)}}
    return {"type": "file", "path": path, "size": e["size"], "oid": e["oid"]}


def _last_commit(history: list[dict[str, Any]], path: str) -> dict[str, Any]:
    """Of `history` (newest first), the oldest commit of the newest run holding `path` as it is now."""
    last = history[0]
    for commit in history[1:]:
        if commit["tree"].get(path) != history[0]["tree"][path]:
            break
        last = commit
    return {"id": last["id"], "title": last["title"], "date": last["date"]}


def _dir_json(path: str, tree: dict[str, dict[str, Any]]) -> dict[str, Any]:
    prefix = path + "/"
    digest = hashlib.sha1("".join(f"{p}\0{e['oid']}\n" for p, e in sorted(tree.items())
                                  if p.startswith(prefix)).encode()).hexdigest()
    return {"type": "directory", "path": path, "oid": digest, "size": 0}


def _dirs_of(tree: dict[str, Any]) -> set[str]:
    return {p.rsplit("/", i)[0] for p in tree for i in range(1, p.count("/") + 1)}


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "PeftFederatedTestHub/1.0"
    hub: HubServer

    # ---- plumbing ----------------------------------------------------------------------------
    def log_message(self, format: str, *args: Any) -> None:  # quiet
        pass

    def setup(self) -> None:
        super().setup()
        # Headers and body go out as two writes: without this, Nagle + delayed ACK stall each reply ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        with hub._lock:
            hub._conns.add(self.connection)

    def finish(self) -> None:
        hub: HubServer = self.server.hub  # type: ignore[attr-defined]
        with hub._lock:
            hub._conns.discard(self.connection)
        with contextlib.suppress(OSError):
            super().finish()

    def do_GET(self) -> None:
        self._handle()

    def do_HEAD(self) -> None:
        self._handle()

    def do_POST(self) -> None:
        self._handle()

    def do_PUT(self) -> None:
        self._handle()

    def do_DELETE(self) -> None:
        self._handle()

    def _handle(self) -> None:
        self.hub = self.server.hub  # type: ignore[attr-defined]
        self._chunked = "chunked" in self.headers.get("Transfer-Encoding", "").lower()
        self._body_state = "unread"  # -> "reading" -> "done"
        self._status = 0
        split = urlsplit(self.path)
        self.query = {k: v[-1] for k, v in parse_qs(split.query, keep_blank_values=True).items()}
        try:
            status = self.hub._take_fault(split.path)
            if status is not None:
                raise HubError(status, f"Injected failure (HTTP {status})")
            self._route(split.path)
        except (ConnectionError, TimeoutError):
            self.close_connection = True
            return
        except Exception as e:  # HubError, or a bug in the server: report it rather than hang the client
            if self._status:  # a response is already under way: all we can do is cut the connection
                self.close_connection = True
                return
            self._error(e if isinstance(e, HubError) else
                        HubError(500, f"Internal server error: {type(e).__name__}: {e}"))
        finally:
            if not self._status:  # no response at all (the connection broke): still on the record
                self.hub.requests.append((self.command, self.path, 0))
        try:
            self._drain()
        except (ConnectionError, TimeoutError, ValueError):
            self.close_connection = True

    def _iter_body(self) -> Iterator[bytes]:
        """Request body, chunk by chunk (Content-Length or chunked transfer encoding)."""
        if self._body_state != "unread":
            return
        self._body_state = "reading"
        if self._chunked:
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    break
                yield self.rfile.read(size)
                self.rfile.readline()
        else:
            left = int(self.headers.get("Content-Length") or 0)
            while left > 0:
                chunk = self.rfile.read(min(left, _CHUNK))
                if not chunk:
                    raise ConnectionError("client closed the connection mid-body")
                left -= len(chunk)
                yield chunk
        self._body_state = "done"

    def _body(self) -> bytes:
        return b"".join(self._iter_body())

    def _json_body(self) -> Any:
        raw = self._body()
        try:
            return json.loads(raw or b"{}")
        except ValueError:
            raise HubError(400, "Request body is not valid JSON") from None

    def _drain(self) -> None:
        """Consume an unread body so the connection can serve the next request (or close it)."""
        if self._body_state == "reading":  # abandoned mid-body: the stream position is unknown
            self.close_connection = True
        for _ in self._iter_body():
            pass

    def _start_response(self, status: int) -> None:
        """Log the request, then start its response: the log entry is there before the client can
        see the answer, so a test that asserts on `requests` right after a call never races it."""
        self._status = status
        self.hub.requests.append((self.command, self.path, status))
        self.send_response(status)

    def _send(self, status: int, body: bytes | Any = b"", headers: dict[str, str] | None = None,
              content_type: str = "application/json") -> None:
        if not isinstance(body, bytes):
            body = json.dumps(body).encode()
        self._start_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            self.send_header(k, v)
        self.end_headers()
        if self.command != "HEAD" and body:
            self.wfile.write(body)

    def _error(self, e: HubError) -> None:
        headers = {"X-Error-Message": re.sub(r"[\r\n]+", " ", e.message).encode("latin-1", "replace").decode(
            "latin-1"), **e.headers}
        if e.code:
            headers["X-Error-Code"] = e.code
        self._send(e.status, {"error": e.message, **e.body}, headers)

    # ---- auth --------------------------------------------------------------------------------
    def _user(self) -> str | None:
        """The caller's user name; None when anonymous; 401 for an unknown token."""
        auth = self.headers.get("Authorization")
        if not auth:
            return None
        scheme, _, token = auth.partition(" ")
        user = self.hub.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        return user

    def _require_writer(self, repo_id: str) -> str:
        user = self._user()
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        if not self.hub.may_write(user, repo_id):
            raise HubError(403, f"You don't have the rights to write to '{repo_id}': user '{user}' "
                                f"has no write permission on it")
        return user

    def _readable(self, rtype: str, repo_id: str) -> Repo:
        user = self._user()
        repo = self.hub.storage.find_repo(rtype, repo_id)
        if repo is None or (repo.private and not self.hub.may_write(user, repo_id)):
            raise repo_not_found(rtype, repo_id)
        return repo

    def _writable(self, rtype: str, repo_id: str) -> tuple[Repo, str]:
        user = self._require_writer(repo_id)
        return self.hub.storage.get_repo(rtype, repo_id), user

    # ---- routing -----------------------------------------------------------------------------
    def _route(self, raw_path: str) -> None:
        segs = [unquote(s) for s in raw_path.split("/")[1:]]
        m = self.command
        if segs and segs[0] == "api":
            api = segs[1:]
            if len(api) >= 3 and api[0] in _PLURALS:
                return self._repo_api(m, _PLURALS[api[0]], f"{api[1]}/{api[2]}", api[3:])
            if api == ["repos", "create"] and m == "POST":
                return self._create_repo()
            if api == ["repos", "delete"] and m == "DELETE":
                return self._delete_repo()
            if api == ["whoami-v2"] and m == "GET":
                return self._whoami()
            if api == ["validate-yaml"] and m == "POST":
                self._body()
                return self._send(200, {"errors": [], "warnings": []})
            raise HubError(404, f"Not found: {m} {raw_path}")
        if len(segs) == 3 and segs[0] == "_lfs" and m in ("PUT", "POST"):
            return self._lfs_transfer(segs[1], segs[2])
        rtype = "model"
        if segs and segs[0] in ("datasets", "spaces"):
            rtype, segs = _PLURALS[segs[0]], segs[1:]
        if len(segs) == 6 and segs[1].endswith(".git") and segs[2:] == ["info", "lfs", "objects", "batch"] \
                and m == "POST":
            return self._lfs_batch(rtype, f"{segs[0]}/{segs[1][:-4]}")
        if len(segs) >= 5 and segs[2] in ("resolve", "raw") and m in ("GET", "HEAD"):
            return self._resolve(rtype, f"{segs[0]}/{segs[1]}", segs[3], "/".join(segs[4:]))
        raise HubError(404, f"Not found: {m} {raw_path}")

    def _repo_api(self, m: str, rtype: str, repo_id: str, rest: list[str]) -> None:
        head = rest[0] if rest else ""
        table: dict[tuple[str, str], Callable[[], None]] = {
            ("GET", ""): lambda: self._info(rtype, repo_id, None),
            ("GET", "revision"): lambda: self._info(rtype, repo_id, "/".join(rest[1:])),
            ("GET", "refs"): lambda: self._refs(rtype, repo_id),
            ("GET", "commits"): lambda: self._commits(rtype, repo_id, "/".join(rest[1:]) or DEFAULT_BRANCH),
            ("GET", "tree"): lambda: self._tree(rtype, repo_id, rest[1] if len(rest) > 1 else DEFAULT_BRANCH,
                                                "/".join(rest[2:])),
            ("POST", "paths-info"): lambda: self._paths_info(rtype, repo_id, "/".join(rest[1:])),
            ("POST", "preupload"): lambda: self._preupload(rtype, repo_id, "/".join(rest[1:])),
            ("POST", "commit"): lambda: self._commit(rtype, repo_id, "/".join(rest[1:])),
            ("POST", "branch"): lambda: self._branch(rtype, repo_id, "/".join(rest[1:]), create=True),
            ("DELETE", "branch"): lambda: self._branch(rtype, repo_id, "/".join(rest[1:]), create=False),
            ("POST", "tag"): lambda: self._tag(rtype, repo_id, "/".join(rest[1:]), create=True),
            ("DELETE", "tag"): lambda: self._tag(rtype, repo_id, "/".join(rest[1:]), create=False),
            ("PUT", "settings"): lambda: self._settings(rtype, repo_id),
        }
        if head in ("xet-write-token", "xet-read-token"):
            raise HubError(501, "Xet storage is not supported by this test server: run the client with "
                                "HF_HUB_DISABLE_XET=1 (or use the server's lfs_mode='regular')")
        handler = table.get((m, head))
        if handler is None:
            raise HubError(404, f"Not found: {m} /api/{rtype}s/{repo_id}/{'/'.join(rest)}")
        handler()

    # ---- repos -------------------------------------------------------------------------------
    def _repo_url(self, rtype: str, repo_id: str) -> str:
        return f"{self.hub.url}/{_URL_PREFIX[rtype]}{repo_id}"

    def _repo_request(self) -> tuple[dict, str, str, str]:
        """(body, user, repo type, repo id) of a create/delete request, after the write check."""
        body = self._json_body()
        user = self._user()
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        rtype = body.get("type") or "model"
        repo_id = f"{body.get('organization') or user}/{body.get('name')}"
        self._require_writer(repo_id)
        return body, user, rtype, repo_id

    def _create_repo(self) -> None:
        body, user, rtype, repo_id = self._repo_request()
        private = body.get("visibility", "public") != "public" if "visibility" in body else bool(body.get("private"))
        try:
            self.hub.storage.create_repo(rtype, repo_id, private, user)
        except HubError as e:
            if e.status == 409:  # the client's exist_ok=True reads "url" from the 409 body
                e.body["url"] = self._repo_url(rtype, repo_id)
            raise
        self._send(200, {"url": self._repo_url(rtype, repo_id), "name": repo_id, "id": repo_id})

    def _delete_repo(self) -> None:
        _, _, rtype, repo_id = self._repo_request()
        self.hub.storage.delete_repo(rtype, repo_id)
        self._send(200, {})

    def _settings(self, rtype: str, repo_id: str) -> None:
        body = self._json_body()
        repo, _ = self._writable(rtype, repo_id)
        if "visibility" in body:
            self.hub.storage.set_private(repo, body["visibility"] != "public")
        elif "private" in body:
            self.hub.storage.set_private(repo, bool(body["private"]))
        self._send(200, {})

    def _whoami(self) -> None:
        user = self._user()
        if user is None:
            raise HubError(401, INVALID_CREDENTIALS)
        orgs = sorted({p.split("/")[0] for p in self.hub.permissions.get(user, [])})
        self._send(200, {"type": "user", "name": user, "fullname": user, "orgs": [{"name": o} for o in orgs],
                         "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}}})

    def _info(self, rtype: str, repo_id: str, rev: str | None) -> None:
        repo = self._readable(rtype, repo_id)
        storage = self.hub.storage
        cid = storage.resolve(repo, rev or DEFAULT_BRANCH)
        commit = storage.get_commit(repo, cid)
        blobs = self.query.get("blobs", "").lower() in ("1", "true")
        siblings = []
        for path, e in sorted(commit["tree"].items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=e["size"], blobId=e["oid"])
                if e["lfs"]:
                    sib["lfs"] = {"size": e["size"], "sha256": e["sha256"],
                                  "pointerSize": len(lfs_pointer(e["sha256"], e["size"]))}
            siblings.append(sib)
        info = {"_id": cid[:24], "id": repo_id, "author": repo_id.split("/")[0], "sha": cid,
                "lastModified": commit["date"], "createdAt": repo.created_at, "private": repo.private,
                "disabled": False, "gated": False, "downloads": 0, "likes": 0, "tags": [], "siblings": siblings}
        if rtype == "model":
            info["modelId"] = repo_id
        self._send(200, info)

    def _refs(self, rtype: str, repo_id: str) -> None:
        repo = self._readable(rtype, repo_id)
        with self.hub.storage.lock:
            branches = [{"name": n, "ref": f"refs/heads/{n}", "targetCommit": c}
                        for n, c in sorted(repo.branches.items())]
            tags = [{"name": n, "ref": f"refs/tags/{n}", "targetCommit": t["commit"]}
                    for n, t in sorted(repo.tags.items())]
        self._send(200, {"branches": branches, "tags": tags, "converts": [], "pullRequests": []})

    def _paged(self, items: list[Any]) -> None:
        """Send one page of ``items`` (``?p=N``), with a ``Link: <...>; rel="next"`` header if more remain."""
        try:
            page = max(int(self.query.get("p", "0")), 0)
        except ValueError:
            raise HubError(400, "Invalid page number") from None
        size = self.hub.page_size
        chunk = items[page * size:(page + 1) * size]
        headers = {}
        if (page + 1) * size < len(items):
            query = urlencode({**self.query, "p": str(page + 1)})
            headers["Link"] = f'<{self.hub.url}{urlsplit(self.path).path}?{query}>; rel="next"'
        self._send(200, chunk, headers)

    def _commits(self, rtype: str, repo_id: str, rev: str) -> None:
        repo = self._readable(rtype, repo_id)
        self._paged([{"id": c["id"], "title": c["title"], "message": c["message"], "date": c["date"],
                      "authors": [{"user": c["author"]}], "parents": c["parents"]}
                     for c in self.hub.storage.history(repo, rev)])

    def _tree(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._readable(rtype, repo_id)
        storage = self.hub.storage
        tree = storage.tree(repo, storage.resolve(repo, rev))
        path = path.strip("/")
        dirs = _dirs_of(tree)
        if path and path not in dirs:
            if path in tree:
                raise HubError(400, f"'{path}' is a file, not a folder")
            raise HubError(404, f"Folder not found: {path}", "EntryNotFound")
        prefix = path + "/" if path else ""
        recursive = self.query.get("recursive", "").lower() in ("1", "true")
        out = []
        for name in sorted(dirs | tree.keys()):
            if not name.startswith(prefix) or (not recursive and "/" in name[len(prefix):]):
                continue
            out.append(_dir_json(name, tree) if name in dirs else _entry_json(name, tree[name]))
        self._paged(out)

    def _paths_info(self, rtype: str, repo_id: str, rev: str) -> None:
        raw = self._body()
        repo = self._readable(rtype, repo_id)
        if "json" in self.headers.get("Content-Type", ""):
            body = json.loads(raw or b"{}")
            paths, expand = body.get("paths", []), str(body.get("expand", "")).lower() in ("1", "true")
        else:
            form = parse_qs(raw.decode())
            paths, expand = form.get("paths", []), form.get("expand", [""])[-1].lower() in ("1", "true")
        storage = self.hub.storage
        cid = storage.resolve(repo, rev or DEFAULT_BRANCH)
        tree = storage.tree(repo, cid)
        dirs = _dirs_of(tree)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append(_entry_json(p, tree[p]))
                if expand:  # the Hub's lastCommit: the newest commit that changed the file
                    out[-1]["lastCommit"] = _last_commit(storage.history(repo, cid), p)
            elif p in dirs:
                out.append(_dir_json(p, tree))
        self._send(200, out)

    # ---- refs --------------------------------------------------------------------------------
    def _branch(self, rtype: str, repo_id: str, name: str, create: bool) -> None:
        body = self._json_body() if create else {}
        repo, _ = self._writable(rtype, repo_id)
        if create:
            self.hub.storage.create_branch(repo, name, body.get("startingPoint"))
        else:
            self.hub.storage.delete_branch(repo, name)
        self._send(200, {})

    def _tag(self, rtype: str, repo_id: str, rev_or_tag: str, create: bool) -> None:
        body = self._json_body() if create else {}
        repo, _ = self._writable(rtype, repo_id)
        if create:
            if not isinstance(body.get("tag"), str):
                raise HubError(400, "Missing 'tag' in body")
            self.hub.storage.create_tag(repo, body["tag"], rev_or_tag, body.get("message") or "")
        else:
            self.hub.storage.delete_tag(repo, rev_or_tag)
        self._send(200, {})

    # ---- uploads -----------------------------------------------------------------------------
    def _preupload(self, rtype: str, repo_id: str, rev: str) -> None:
        body = self._json_body()
        repo, _ = self._writable(rtype, repo_id)
        storage = self.hub.storage
        try:
            head = storage.resolve(repo, rev)
            tree = storage.tree(repo, head)
        except HubError:
            head, tree = None, {}
        files = []
        for f in body.get("files", []):
            path, size = f.get("path"), f.get("size")
            if not isinstance(path, str) or not isinstance(size, int):
                raise HubError(400, "Each preupload file needs a 'path' and an integer 'size'")
            mode = self.hub.upload_mode(path, size)
            entry = tree.get(path)
            oid = None
            if entry is not None:  # lets the client skip unchanged files
                oid = entry["sha256"] if mode == "lfs" else (None if entry["lfs"] else entry["oid"])
            files.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        self._send(200, {"files": files, "commitOid": head})

    def _commit(self, rtype: str, repo_id: str, branch: str) -> None:
        raw = self._body()
        repo, user = self._writable(rtype, repo_id)
        if self.query.get("create_pr", "") in ("1", "true", "True"):
            raise HubError(400, "Pull requests (create_pr=True) are not supported by this test server")
        storage = self.hub.storage
        header: dict[str, Any] | None = None
        ops: list[tuple[str, str, dict[str, Any] | None]] = []
        for line in raw.splitlines():
            if not line.strip():
                continue
            try:
                item = json.loads(line)
                key, value = item["key"], item["value"]
            except (ValueError, KeyError, TypeError):
                raise HubError(400, "Malformed commit payload (expected NDJSON {key, value} lines)") from None
            if key == "header":
                header = value
            elif key == "file":
                path = check_repo_path(value.get("path", ""))
                if value.get("encoding", "base64") != "base64":
                    raise HubError(400, f"Unsupported encoding for {path}: {value.get('encoding')}")
                try:
                    data = base64.b64decode(value.get("content", ""), validate=True)
                except ValueError:
                    raise HubError(400, f"Invalid base64 content for {path}") from None
                sha = storage.put_bytes(data)
                ops.append(("add", path, {"sha256": sha, "size": len(data), "lfs": False, "oid": git_blob_sha1(data)}))
            elif key == "lfsFile":
                path = check_repo_path(value.get("path", ""))
                oid, size = str(value.get("oid", "")).lower(), value.get("size")
                if value.get("algo", "sha256") != "sha256" or not storage.has_blob(oid, size):
                    raise HubError(422, f"LFS object {oid} (size {size}) for {path} was not uploaded to this server")
                size = storage.blob_path(oid).stat().st_size
                ops.append(("add", path, {"sha256": oid, "size": size, "lfs": True,
                                          "oid": git_blob_sha1(lfs_pointer(oid, size))}))
            elif key in ("deletedFile", "deletedFolder"):
                path = str(value.get("path", "")).rstrip("/")
                if key == "deletedFile":
                    check_repo_path(path)
                ops.append(("delete_file" if key == "deletedFile" else "delete_folder", path, None))
            else:
                raise HubError(400, f"Unsupported commit operation: {key!r}")
        if header is None or not str(header.get("summary", "")).strip():
            raise HubError(400, "Commit payload needs a header with a non-empty summary")
        cid = storage.commit(repo, branch, parent=header.get("parentCommit"), ops=ops, author=user,
                             title=str(header["summary"]), message=str(header.get("description") or ""))
        self._send(200, {"success": True, "commitOid": cid, "pullRequestUrl": None,
                         "commitUrl": f"{self._repo_url(rtype, repo_id)}/commit/{cid}"})

    def _lfs_batch(self, rtype: str, repo_id: str) -> None:
        body = self._json_body()
        self._writable(rtype, repo_id)
        if body.get("operation") != "upload":
            raise HubError(422, "Only the 'upload' LFS operation is supported by this test server")
        expires = int(time.time()) + 3600
        objects = []
        for obj in body.get("objects", []):
            oid, size = str(obj.get("oid", "")).lower(), obj.get("size")
            if not re.fullmatch(r"[0-9a-f]{64}", oid) or not isinstance(size, int) or size < 0:
                objects.append({"oid": oid, "size": size if isinstance(size, int) else 0,
                                "error": {"code": 422, "message": "Invalid oid or size"}})
            elif self.hub.storage.has_blob(oid, size):
                objects.append({"oid": oid, "size": size})  # already stored: no actions
            else:
                def href(action: str, oid: str = oid, size: int = size) -> str:
                    q = urlencode({"size": size, "expires": expires, "sig": self.hub.sign(action, oid, size, expires)})
                    return f"{self.hub.url}/_lfs/{action}/{oid}?{q}"
                objects.append({"oid": oid, "size": size, "authenticated": True,
                                "actions": {"upload": {"href": href("upload"), "expires_in": 3600},
                                            "verify": {"href": href("verify"), "expires_in": 3600}}})
        self._send(200, {"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                   content_type="application/vnd.git-lfs+json")

    def _lfs_transfer(self, action: str, oid: str) -> None:
        """``PUT /_lfs/upload/{oid}`` (signed, no Authorization) and ``POST /_lfs/verify/{oid}``."""
        try:
            size, expires = int(self.query["size"]), int(self.query["expires"])
            sig = self.query["sig"]
        except (KeyError, ValueError):
            raise HubError(403, "Missing or malformed signature on LFS URL") from None
        if not hmac.compare_digest(sig, self.hub.sign(action, oid, size, expires)) or expires < time.time():
            raise HubError(403, "Invalid or expired signature on LFS URL")
        if action == "upload" and self.command == "PUT":
            if not self.hub.storage.has_blob(oid, size):
                self.hub.storage.put_stream(self._iter_body(), oid, size)
            return self._send(200, b"", content_type="text/plain")
        if action == "verify" and self.command == "POST":
            self._body()
            if not self.hub.storage.has_blob(oid, size):
                raise HubError(404, f"LFS object {oid} not found")
            return self._send(200, {"message": "ok"})
        raise HubError(404, f"Not found: {self.command} /_lfs/{action}")

    # ---- downloads ---------------------------------------------------------------------------
    def _resolve(self, rtype: str, repo_id: str, rev: str, path: str) -> None:
        repo = self._readable(rtype, repo_id)
        storage = self.hub.storage
        cid = storage.resolve(repo, rev)
        entry = storage.tree(repo, cid).get(path)
        if entry is None:
            raise HubError(404, f"Entry not found: {path} at {rev}", "EntryNotFound", {"X-Repo-Commit": cid})
        size = entry["size"]
        headers = {"X-Repo-Commit": cid, "Accept-Ranges": "bytes",
                   "Content-Disposition": f"inline; filename*=UTF-8''{quote(path.rsplit('/', 1)[-1])}"}
        if entry["lfs"]:
            headers.update({"ETag": f'"{entry["sha256"]}"', "X-Linked-Etag": f'"{entry["sha256"]}"',
                            "X-Linked-Size": str(size)})
        else:
            headers["ETag"] = f'"{entry["oid"]}"'
        start, end, status = 0, size - 1, 200
        rng = self.headers.get("Range")
        if rng and (m := re.fullmatch(r"\s*bytes=(\d*)-(\d*)\s*", rng)) and (m[1] or m[2]):
            if m[1]:
                start, end = int(m[1]), min(int(m[2]) if m[2] else size - 1, size - 1)
            else:
                start = max(size - int(m[2]), 0)
            if start >= size or start > end:
                return self._send(416, {"error": "Range not satisfiable"}, {"Content-Range": f"bytes */{size}",
                                                                            "X-Repo-Commit": cid})
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end}/{size}"
        length = max(end - start + 1, 0)
        self._start_response(status)
        self.send_header("Content-Type", "application/octet-stream")
        self.send_header("Content-Length", str(length))
        for k, v in headers.items():
            self.send_header(k, v)
        self.end_headers()
        if self.command == "HEAD":
            return
        with open(storage.blob_path(entry["sha256"]), "rb") as f:
            f.seek(start)
            while length > 0:
                chunk = f.read(min(length, _CHUNK))
                if not chunk:
                    break
                self.wfile.write(chunk)
                length -= len(chunk)


def main(argv: list[str] | None = None) -> None:
    """Command line entry point: serve until SIGTERM/SIGINT."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--root", required=True, type=Path)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--token", action="append", default=[], metavar="TOKEN=USER")
    ap.add_argument("--permission", action="append", default=[], metavar="USER=REPO_OR_GLOB")
    ap.add_argument("--lfs-mode", choices=["regular", "lfs"], default="regular")
    ap.add_argument("--lfs-threshold", type=int, default=4096)
    ap.add_argument("--page-size", type=int, default=50)
    args = ap.parse_args(argv)
    tokens = dict(t.split("=", 1) for t in args.token)
    permissions: dict[str, list[str]] = {}
    for p in args.permission:
        user, pattern = p.split("=", 1)
        permissions.setdefault(user, []).append(pattern)
    server = HubServer(args.root, tokens, permissions, args.host, args.port, lfs_mode=args.lfs_mode,
                       lfs_threshold=args.lfs_threshold, page_size=args.page_size)
    signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=server._httpd.shutdown).start())
    print(server.url, flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server._httpd.server_close()
    sys.exit(0)


if __name__ == "__main__":
    main()
