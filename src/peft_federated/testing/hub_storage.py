"""On-disk state of the test Hub server: content-addressed blobs, immutable commits and refs.

Layout under ``root``::

    secret                          HMAC key for signed LFS upload URLs
    blobs/ab/cdef...                file contents, named by their sha256
    repos/{type}/{ns}/{name}/repo.json            refs (branches, tags) and settings
    repos/{type}/{ns}/{name}/commits/{sha1}.json  immutable commits (full tree snapshots)
    tmp/                            partial uploads (cleared on start)

Every file is written to a temporary file, fsynced, then renamed into place, so a crash never
leaves a half-written file. A commit writes its blobs first, then the commit object, and moves
the branch ref last, under the storage lock.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

REPO_TYPES = ("model", "dataset", "space")
DEFAULT_BRANCH = "main"
_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_REF_RE = re.compile(r"^[A-Za-z0-9._][A-Za-z0-9._/-]{0,199}$")
_SHA1_RE = re.compile(r"^[0-9a-f]{40}$")
_SHA256_RE = re.compile(r"^[0-9a-f]{64}$")
GITATTRIBUTES = b"""*.bin filter=lfs diff=lfs merge=lfs -text
*.ckpt filter=lfs diff=lfs merge=lfs -text
*.gz filter=lfs diff=lfs merge=lfs -text
*.npy filter=lfs diff=lfs merge=lfs -text
*.parquet filter=lfs diff=lfs merge=lfs -text
*.pt filter=lfs diff=lfs merge=lfs -text
*.pth filter=lfs diff=lfs merge=lfs -text
*.safetensors filter=lfs diff=lfs merge=lfs -text
*.zip filter=lfs diff=lfs merge=lfs -text
"""

Entry = dict[str, Any]  # {"sha256": str, "size": int, "lfs": bool, "oid": git blob id}


class HubError(Exception):
    """An error answered to the client: HTTP status, message and optional ``X-Error-Code``."""

    def __init__(self, status: int, message: str, code: str | None = None, headers: dict[str, str] | None = None,
                 body: dict[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.body = body or {}  # extra JSON fields of the error body


def repo_not_found(rtype: str, repo_id: str) -> HubError:
    return HubError(404, f"Repository not found: {rtype} '{repo_id}'", "RepoNotFound")


def revision_not_found(rev: str) -> HubError:
    return HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")


def now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id: sha1 of ``b"blob {size}\\0" + data``."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` through a fsynced temporary file and an atomic rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def check_repo_path(path: str) -> str:
    """Validate a file path inside a repo (400 when malformed)."""
    parts = path.split("/")
    if (not path or "\\" in path or "\0" in path or any(p in ("", ".", "..") for p in parts)
            or parts[0] == ".git"):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return path


@dataclass
class Repo:
    """Mutable refs and settings of one repo (commits live in their own immutable files)."""

    type: str
    id: str
    private: bool
    created_at: str
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, dict[str, str]] = field(default_factory=dict)  # name -> {"commit", "message"}

    def to_json(self) -> bytes:
        return json.dumps(self.__dict__, indent=1, sort_keys=True).encode()


class Storage:
    """Thread-safe store of repos, commits and blobs under ``root`` (persisted across restarts)."""

    def __init__(self, root: Path | str):
        self.root = Path(root)
        for sub in ("blobs", "repos", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        for stale in (self.root / "tmp").iterdir():
            with contextlib.suppress(OSError):
                stale.unlink() if stale.is_file() else shutil.rmtree(stale)
        secret_path = self.root / "secret"
        if not secret_path.exists():
            atomic_write(secret_path, secrets.token_hex(32).encode())
        self.secret = secret_path.read_bytes().strip()
        self.lock = threading.RLock()
        self._commits: dict[tuple[str, str, str], dict[str, Any]] = {}
        self._repos: dict[tuple[str, str], Repo] = {}
        for p in (self.root / "repos").glob("*/*/*/repo.json"):
            repo = Repo(**json.loads(p.read_text()))
            self._repos[(repo.type, repo.id)] = repo

    # ---- blobs ---------------------------------------------------------------------------
    def blob_path(self, sha256: str) -> Path:
        return self.root / "blobs" / sha256[:2] / sha256[2:]

    def has_blob(self, sha256: str, size: int | None = None) -> bool:
        if not _SHA256_RE.match(sha256):
            return False
        try:
            st = self.blob_path(sha256).stat()
        except FileNotFoundError:
            return False
        return size is None or st.st_size == size

    def put_bytes(self, data: bytes) -> str:
        """Store ``data``; returns its sha256."""
        sha = hashlib.sha256(data).hexdigest()
        if not self.has_blob(sha, len(data)):
            atomic_write(self.blob_path(sha), data)
        return sha

    def put_stream(self, chunks: Iterable[bytes], sha256: str, size: int) -> None:
        """Store a streamed upload after checking that it hashes to ``sha256`` with ``size`` bytes."""
        h = hashlib.sha256()
        n = 0
        fd, tmp = tempfile.mkstemp(dir=self.root / "tmp", suffix=".upload")
        try:
            with os.fdopen(fd, "wb") as f:
                for chunk in chunks:
                    h.update(chunk)
                    n += len(chunk)
                    f.write(chunk)
                f.flush()
                os.fsync(f.fileno())
            if n != size or h.hexdigest() != sha256:
                raise HubError(400, f"Uploaded content does not match oid {sha256} / size {size} "
                                    f"(got sha256 {h.hexdigest()}, {n} bytes)")
            dest = self.blob_path(sha256)
            dest.parent.mkdir(parents=True, exist_ok=True)
            os.replace(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def read_blob(self, sha256: str) -> bytes:
        return self.blob_path(sha256).read_bytes()

    # ---- repos -----------------------------------------------------------------------------
    def _repo_dir(self, rtype: str, repo_id: str) -> Path:
        ns, name = repo_id.split("/")
        return self.root / "repos" / rtype / ns / name

    def _save_repo(self, repo: Repo) -> None:
        atomic_write(self._repo_dir(repo.type, repo.id) / "repo.json", repo.to_json())

    def find_repo(self, rtype: str, repo_id: str) -> Repo | None:
        with self.lock:
            return self._repos.get((rtype, repo_id))

    def get_repo(self, rtype: str, repo_id: str) -> Repo:
        repo = self.find_repo(rtype, repo_id)
        if repo is None:
            raise repo_not_found(rtype, repo_id)
        return repo

    def list_repos(self) -> list[Repo]:
        with self.lock:
            return list(self._repos.values())

    def create_repo(self, rtype: str, repo_id: str, private: bool, author: str) -> Repo:
        """Create a repo with an initial commit holding ``.gitattributes`` (409 if it exists)."""
        if rtype not in REPO_TYPES:
            raise HubError(400, f"Invalid repo type: {rtype!r}")
        parts = repo_id.split("/")
        if len(parts) != 2 or not all(_NAME_RE.match(p) for p in parts) or parts[1].endswith(".git"):
            raise HubError(400, f"Invalid repo id: {repo_id!r}")
        with self.lock:
            if (rtype, repo_id) in self._repos:
                raise HubError(409, f"You already created this {rtype} repo: {repo_id}")
            repo = Repo(type=rtype, id=repo_id, private=private, created_at=now_iso())
            repo_dir = self._repo_dir(rtype, repo_id)
            if repo_dir.exists():  # leftover of an interrupted delete
                shutil.rmtree(repo_dir)
            sha = self.put_bytes(GITATTRIBUTES)
            entry = {"sha256": sha, "size": len(GITATTRIBUTES), "lfs": False, "oid": git_blob_sha1(GITATTRIBUTES)}
            cid = self._write_commit(repo, [], {".gitattributes": entry}, author, "initial commit", "")
            repo.branches[DEFAULT_BRANCH] = cid
            self._save_repo(repo)
            self._repos[(rtype, repo_id)] = repo
            return repo

    def delete_repo(self, rtype: str, repo_id: str) -> None:
        with self.lock:
            self.get_repo(rtype, repo_id)
            trash = self.root / "tmp" / f"deleted-{uuid.uuid4().hex}"
            os.replace(self._repo_dir(rtype, repo_id), trash)  # atomic: the repo is gone or intact
            del self._repos[(rtype, repo_id)]
            self._commits = {k: v for k, v in self._commits.items() if k[:2] != (rtype, repo_id)}
        shutil.rmtree(trash, ignore_errors=True)

    def set_private(self, repo: Repo, private: bool) -> None:
        with self.lock:
            repo.private = private
            self._save_repo(repo)

    # ---- commits & refs --------------------------------------------------------------------
    def get_commit(self, repo: Repo, cid: str) -> dict[str, Any]:
        key = (repo.type, repo.id, cid)
        commit = self._commits.get(key)
        if commit is None:
            path = self._repo_dir(repo.type, repo.id) / "commits" / f"{cid}.json"
            try:
                commit = json.loads(path.read_bytes())
            except (FileNotFoundError, NotADirectoryError):
                raise revision_not_found(cid) from None
            self._commits[key] = commit
        return commit

    def resolve(self, repo: Repo, rev: str) -> str:
        """Commit id of a branch, tag (also ``refs/heads/x``, ``refs/tags/x``) or full commit sha."""
        with self.lock:
            if rev.startswith("refs/heads/"):
                cid = repo.branches.get(rev[len("refs/heads/"):])
            elif rev.startswith("refs/tags/"):
                cid = repo.tags.get(rev[len("refs/tags/"):], {}).get("commit")
            else:
                cid = repo.branches.get(rev) or repo.tags.get(rev, {}).get("commit")
        if cid is not None:
            return cid
        if _SHA1_RE.match(rev):
            self.get_commit(repo, rev)  # raises RevisionNotFound if this repo has no such commit
            return rev
        raise revision_not_found(rev)

    def tree(self, repo: Repo, cid: str) -> dict[str, Entry]:
        return self.get_commit(repo, cid)["tree"]

    def _write_commit(self, repo: Repo, parents: list[str], tree: dict[str, Entry], author: str,
                      title: str, message: str) -> str:
        date = now_iso()
        body = {"parents": parents, "tree": tree, "author": author, "title": title, "message": message,
                "date": date, "repo": f"{repo.type}/{repo.id}", "t": time.time_ns()}
        cid = hashlib.sha1(json.dumps(body, sort_keys=True).encode()).hexdigest()
        commit = {"id": cid, **body}
        atomic_write(self._repo_dir(repo.type, repo.id) / "commits" / f"{cid}.json",
                     json.dumps(commit, sort_keys=True).encode())
        self._commits[(repo.type, repo.id, cid)] = commit
        return cid

    def commit(self, repo: Repo, branch: str, *, parent: str | None, ops: list[tuple[str, str, Entry | None]],
               author: str, title: str, message: str) -> str:
        """Apply ``ops`` (``("add", path, entry)``, ``("delete_file", path, None)``, ``("delete_folder", path,
        None)``) atomically on top of ``branch``; 412 when ``parent`` is not the branch head."""
        with self.lock:
            if self.find_repo(repo.type, repo.id) is not repo:
                raise repo_not_found(repo.type, repo.id)
            if branch not in repo.branches:
                raise HubError(404, f"Branch not found: {branch} (commits go to an existing branch)",
                               "RevisionNotFound")
            head = repo.branches[branch]
            if parent is not None and not (len(parent) >= 5 and head.startswith(parent.lower())):
                raise HubError(412, f"A commit has happened since. Please refresh and try again. "
                                    f"(parentCommit {parent} is not the head {head} of branch '{branch}')")
            tree = dict(self.tree(repo, head))
            for kind, path, entry in ops:
                if kind == "add":
                    tree[check_repo_path(path)] = entry  # type: ignore[assignment]
                elif kind == "delete_file":
                    if tree.pop(path, None) is None:
                        raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
                elif kind == "delete_folder":
                    prefix = path.strip("/") + "/"
                    doomed = [p for p in tree if p.startswith(prefix)] if prefix != "/" else list(tree)
                    if not doomed:
                        raise HubError(404, f"A folder with this name doesn't exist: {path}", "EntryNotFound")
                    for p in doomed:
                        del tree[p]
            dirs = {p.rsplit("/", i)[0] for p in tree for i in range(1, p.count("/") + 1)}
            if clash := sorted(dirs & tree.keys()):
                raise HubError(400, f"Path is both a file and a folder: {clash[0]}")
            cid = self._write_commit(repo, [head], tree, author, title, message)
            repo.branches[branch] = cid
            try:
                self._save_repo(repo)
            except BaseException:
                repo.branches[branch] = head
                raise
            return cid

    def _set_ref(self, repo: Repo, update: Any) -> None:
        with self.lock:
            backup = (dict(repo.branches), dict(repo.tags))
            update()
            try:
                self._save_repo(repo)
            except BaseException:
                repo.branches, repo.tags = backup
                raise

    @staticmethod
    def _check_ref_name(name: str) -> None:
        if not _REF_RE.match(name) or ".." in name or name.endswith((".lock", "/")) or "//" in name:
            raise HubError(400, f"Invalid reference name: {name!r}")

    def create_branch(self, repo: Repo, name: str, starting_point: str | None) -> None:
        self._check_ref_name(name)
        with self.lock:
            if name in repo.branches:
                raise HubError(409, f"Reference already exists: refs/heads/{name}")
            cid = self.resolve(repo, starting_point or DEFAULT_BRANCH)
            self._set_ref(repo, lambda: repo.branches.__setitem__(name, cid))

    def delete_branch(self, repo: Repo, name: str) -> None:
        with self.lock:
            if name not in repo.branches:
                raise revision_not_found(name)
            if name == DEFAULT_BRANCH:
                raise HubError(403, f"Cannot delete the default branch '{DEFAULT_BRANCH}'")
            self._set_ref(repo, lambda: repo.branches.pop(name))

    def create_tag(self, repo: Repo, tag: str, rev: str, message: str) -> None:
        self._check_ref_name(tag)
        with self.lock:
            if tag in repo.tags:
                raise HubError(409, f"Tag already exists: {tag}")
            cid = self.resolve(repo, rev)
            self._set_ref(repo, lambda: repo.tags.__setitem__(tag, {"commit": cid, "message": message}))

    def delete_tag(self, repo: Repo, tag: str) -> None:
        with self.lock:
            if tag not in repo.tags:
                raise revision_not_found(tag)
            self._set_ref(repo, lambda: repo.tags.pop(tag))

    def history(self, repo: Repo, rev: str) -> list[dict[str, Any]]:
        """Commits reachable from ``rev`` along first parents, newest first."""
        out = []
        cid: str | None = self.resolve(repo, rev)
        while cid is not None:
            commit = self.get_commit(repo, cid)
            out.append(commit)
            cid = commit["parents"][0] if commit["parents"] else None
        return out
