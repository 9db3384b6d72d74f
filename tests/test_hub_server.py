"""The test Hub server against the REAL huggingface_hub client (HfApi, hf_hub_download, snapshot_download).

About ``HF_HUB_DISABLE_XET``: huggingface_hub reads the variable once, at import, into
``constants.HF_HUB_DISABLE_XET``; but ``is_xet_available()`` consults that constant at call time. So
a test switches xet off by patching the constant (and sets the variable too, for subprocesses).
"""

from __future__ import annotations

import base64
import hashlib
import json
import subprocess
import sys
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from helpers import isolate_hub_client
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    constants,
    get_hf_file_metadata,
    hf_hub_download,
    hf_hub_url,
    snapshot_download,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from safetensors.torch import save as save_safetensors

from peft_federated.testing import HubServer
from peft_federated.testing import hub_server as hub_server_module

TOKENS = {"tok-alice": "alice", "tok-bob": "bob", "tok-carol": "carol"}
PERMISSIONS = {"carol": ["team/*"], "bob": ["alice/shared"]}


@pytest.fixture(autouse=True)
def hf_env(monkeypatch, tmp_path):
    isolate_hub_client(monkeypatch, tmp_path)


def disable_xet(monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def make_server(tmp_path):
    servers: list[HubServer] = []

    def make(root: Path | None = None, **kwargs) -> HubServer:
        server = HubServer(root or tmp_path / "hub", TOKENS, PERMISSIONS, **{"page_size": 2, **kwargs}).start()
        servers.append(server)
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
def server(make_server) -> HubServer:
    return make_server()


def api_for(server: HubServer, token: str | bool = "tok-alice") -> HfApi:
    return HfApi(endpoint=server.url, token=token)


def download(server: HubServer, tmp_path: Path, repo_id: str, filename: str, token: str | bool = "tok-alice",
             **kwargs) -> bytes:
    path = hf_hub_download(repo_id, filename, endpoint=server.url, token=token, cache_dir=tmp_path / "cache",
                           **kwargs)
    return Path(path).read_bytes()


def raw(url: str, method: str = "GET", body: bytes | None = None, headers: dict | None = None):
    """(status, headers, body) of a plain urllib request."""
    req = urllib.request.Request(url, data=body, method=method, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.headers, resp.read()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read()


def random_bytes(gen: torch.Generator, n: int) -> bytes:
    return torch.randint(0, 256, (n,), generator=gen, dtype=torch.uint8).numpy().tobytes()


def sample_files(gen: torch.Generator) -> dict[str, bytes]:
    return {
        "config.json": json.dumps({"r": 8, "alpha": 16}).encode(),
        "adapter_model.safetensors": save_safetensors({"lora_A": torch.randn(8, 64, generator=gen),
                                                       "lora_B": torch.randn(64, 8, generator=gen)}),
        "nested/dir/notes.txt": b"some notes\n",
        "nested/blob.dat": random_bytes(gen, 6000),
        "empty.txt": b"",
    }


@pytest.mark.parametrize(("mode", "repo_type"), [("regular", "model"), ("lfs", "model"), ("lfs", "dataset")])
def test_upload_download_roundtrip(make_server, tmp_path, gen, monkeypatch, mode, repo_type):
    if mode == "lfs":
        disable_xet(monkeypatch)
    server = make_server(lfs_mode=mode)
    api = api_for(server)
    files = sample_files(gen)
    src = tmp_path / "src"
    for name, data in files.items():
        (src / name).parent.mkdir(parents=True, exist_ok=True)
        (src / name).write_bytes(data)

    url = api.create_repo("alice/adapter", repo_type=repo_type)
    assert url.repo_id == "alice/adapter" and url.repo_type == repo_type
    info = api.upload_folder(folder_path=src, repo_id="alice/adapter", repo_type=repo_type, commit_message="add")
    assert api.repo_info("alice/adapter", repo_type=repo_type).sha == info.oid

    tree = {f.path: f for f in api.list_repo_tree("alice/adapter", recursive=True, repo_type=repo_type)
            if isinstance(f, RepoFile)}
    assert set(tree) == set(files) | {".gitattributes"}
    lfs_files = {p for p, f in tree.items() if f.lfs is not None}
    batch_calls = [r for r in server.requests if r[1].endswith(".git/info/lfs/objects/batch")]
    if mode == "lfs":
        assert lfs_files == {"adapter_model.safetensors", "nested/blob.dat"}
        for p in lfs_files:
            assert tree[p].lfs.sha256 == hashlib.sha256(files[p]).hexdigest()
        prefix = "/datasets/" if repo_type == "dataset" else "/"
        assert batch_calls and batch_calls[0][1] == f"{prefix}alice/adapter.git/info/lfs/objects/batch"
    else:
        assert lfs_files == set() and batch_calls == []
    assert all(tree[p].size == len(d) for p, d in files.items())

    for name, data in files.items():
        assert download(server, tmp_path, "alice/adapter", name, repo_type=repo_type) == data
    meta = get_hf_file_metadata(hf_hub_url("alice/adapter", "adapter_model.safetensors", repo_type=repo_type,
                                           endpoint=server.url), token="tok-alice")
    assert meta.commit_hash == info.oid and meta.size == len(files["adapter_model.safetensors"])
    assert meta.xet_file_data is None
    snap = Path(snapshot_download("alice/adapter", repo_type=repo_type, endpoint=server.url, token="tok-alice",
                                  cache_dir=tmp_path / "snap"))
    assert {str(p.relative_to(snap)) for p in snap.rglob("*") if p.is_file()} == set(files) | {".gitattributes"}
    assert all((snap / name).read_bytes() == data for name, data in files.items())

    # Re-uploading identical files is a no-op on the client side (the preupload answer carries the oids).
    again = api.upload_folder(folder_path=src, repo_id="alice/adapter", repo_type=repo_type)
    assert again.oid == info.oid


def test_stale_parent_commit_gets_412(server):
    api = api_for(server)
    api.create_repo("alice/occ")
    base = api.repo_info("alice/occ").sha
    first = api.create_commit("alice/occ", [CommitOperationAdd("a.txt", b"1")], commit_message="a",
                              parent_commit=base)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit("alice/occ", [CommitOperationAdd("b.txt", b"2")], commit_message="b", parent_commit=base)
    assert exc.value.response.status_code == 412
    assert api.repo_info("alice/occ").sha == first.oid
    assert not api.file_exists("alice/occ", "b.txt")


def test_concurrent_writers(server):
    api = api_for(server)
    api.create_repo("alice/race")
    base = api.repo_info("alice/race").sha

    def commit(i: int, parent: str | None):
        try:
            return api.create_commit("alice/race", [CommitOperationAdd(f"f{i}.txt", str(i).encode())],
                                     commit_message=f"c{i}", parent_commit=parent).oid
        except HfHubHTTPError as e:
            return e.response.status_code

    with ThreadPoolExecutor(6) as pool:
        optimistic = list(pool.map(lambda i: commit(i, base), range(6)))
    assert optimistic.count(412) == 5 and sum(isinstance(c, str) for c in optimistic) == 1
    with ThreadPoolExecutor(6) as pool:
        blind = list(pool.map(lambda i: commit(10 + i, None), range(6)))
    assert all(isinstance(c, str) for c in blind)
    assert len(api.list_repo_commits("alice/race")) == 1 + 1 + 6
    assert {f"f{10 + i}.txt" for i in range(6)} <= set(api.list_repo_files("alice/race"))


def test_tags_branches_and_history(server, tmp_path):
    api = api_for(server)
    api.create_repo("alice/hist")
    c1 = api.upload_file(path_or_fileobj=b"v1", path_in_repo="w.txt", repo_id="alice/hist").oid
    api.create_tag("alice/hist", tag="v1", tag_message="first")
    c2 = api.upload_file(path_or_fileobj=b"v2", path_in_repo="w.txt", repo_id="alice/hist").oid
    api.create_branch("alice/hist", branch="exp/one", revision="v1")

    refs = api.list_repo_refs("alice/hist")
    assert {b.name: b.target_commit for b in refs.branches} == {"main": c2, "exp/one": c1}
    assert [(t.name, t.ref, t.target_commit) for t in refs.tags] == [("v1", "refs/tags/v1", c1)]
    commits = api.list_repo_commits("alice/hist")  # 3 commits over pages of 2: follows Link rel="next"
    assert [c.commit_id for c in commits[:2]] == [c2, c1] and commits[2].title == "initial commit"
    assert any("p=1" in r[1] for r in server.requests if "/commits/" in r[1])
    status, _, body = raw(f"{server.url}/api/models/alice/hist/commits/main",
                          headers={"Authorization": "Bearer tok-alice"})
    page = json.loads(body)
    assert status == 200 and page[0]["parents"] == [c1] and page[1]["parents"] == [commits[2].commit_id]

    for rev, want in [("v1", b"v1"), ("exp/one", b"v1"), (c1, b"v1"), ("main", b"v2"), (None, b"v2")]:
        assert download(server, tmp_path, "alice/hist", "w.txt", revision=rev) == want
    api.upload_file(path_or_fileobj=b"v3", path_in_repo="w.txt", repo_id="alice/hist", revision="exp/one")
    assert download(server, tmp_path, "alice/hist", "w.txt", revision="exp/one") == b"v3"
    assert download(server, tmp_path, "alice/hist", "w.txt") == b"v2"

    api.delete_tag("alice/hist", tag="v1")
    api.delete_branch("alice/hist", branch="exp/one")
    with pytest.raises(RevisionNotFoundError):
        download(server, tmp_path / "fresh", "alice/hist", "w.txt", revision="v1")
    assert not api.revision_exists("alice/hist", "exp/one")
    api.create_tag("alice/hist", tag="v2", revision=c2)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_tag("alice/hist", tag="v2")
    assert exc.value.response.status_code == 409


def test_auth_and_permissions(server, tmp_path):
    alice, bob, carol = api_for(server), api_for(server, "tok-bob"), api_for(server, "tok-carol")
    for bad in (api_for(server, "not-a-token"), api_for(server, False)):
        with pytest.raises(HfHubHTTPError, match="Invalid credentials in Authorization header") as exc:
            bad.create_repo("alice/x")
        assert exc.value.response.status_code == 401
    alice.create_repo("alice/pub")
    with pytest.raises(HfHubHTTPError, match="don't have the rights") as exc:
        bob.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id="alice/pub")
    assert exc.value.response.status_code == 403
    with pytest.raises(HfHubHTTPError) as exc:
        carol.create_repo("alice/mine")
    assert exc.value.response.status_code == 403

    alice.create_repo("alice/shared")
    bob.upload_file(path_or_fileobj=b"from bob", path_in_repo="bob.txt", repo_id="alice/shared")
    assert carol.create_repo("team/proj").repo_id == "team/proj"
    carol.upload_file(path_or_fileobj=b"t", path_in_repo="t.txt", repo_id="team/proj")
    assert [c.authors for c in carol.list_repo_commits("team/proj")][0] == ["carol"]
    assert download(server, tmp_path, "alice/shared", "bob.txt", token=False) == b"from bob"  # public read

    alice.create_repo("alice/secret", private=True)
    alice.upload_file(path_or_fileobj=b"s", path_in_repo="s.txt", repo_id="alice/secret")
    assert alice.repo_info("alice/secret").private is True
    with pytest.raises(RepositoryNotFoundError):
        bob.repo_info("alice/secret")
    with pytest.raises(RepositoryNotFoundError):
        download(server, tmp_path, "alice/secret", "s.txt", token=False)
    assert download(server, tmp_path, "alice/secret", "s.txt") == b"s"


def test_typed_errors_and_deletes(server, tmp_path):
    api = api_for(server)
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("alice/missing")
    with pytest.raises(RepositoryNotFoundError):
        download(server, tmp_path, "alice/missing", "x.txt")
    api.create_repo("alice/err")
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("alice/err")
    assert exc.value.response.status_code == 409
    api.create_repo("alice/err", exist_ok=True)
    api.upload_folder(folder_path=_tree(tmp_path / "t", {"d/a.txt": b"a", "d/e/b.txt": b"b", "c.txt": b"c"}),
                      repo_id="alice/err")
    with pytest.raises(RevisionNotFoundError):
        download(server, tmp_path, "alice/err", "c.txt", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info("alice/err", revision="nope")
    with pytest.raises(EntryNotFoundError):
        download(server, tmp_path, "alice/err", "missing.txt")
    assert api.file_exists("alice/err", "d/e/b.txt") and not api.file_exists("alice/err", "d/e")
    with pytest.raises(EntryNotFoundError):
        api.create_commit("alice/err", [CommitOperationDelete("nope.txt")], commit_message="del")

    assert sorted(f.path for f in api.list_repo_tree("alice/err", path_in_repo="d")) == ["d/a.txt", "d/e"]
    infos = api.get_paths_info("alice/err", ["d", "c.txt", "nope"])
    assert [(type(i).__name__, i.path) for i in infos] == [("RepoFolder", "d"), ("RepoFile", "c.txt")]
    api.create_commit("alice/err", [CommitOperationDelete("d/"), CommitOperationDelete("c.txt")],
                      commit_message="cleanup")
    assert api.list_repo_files("alice/err") == [".gitattributes"]
    api.delete_repo("alice/err")
    with pytest.raises(RepositoryNotFoundError):
        api.repo_info("alice/err")
    status, headers, body = raw(f"{server.url}/api/agent-harnesses")
    assert status == 404 and "error" in json.loads(body)


def _tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_restart_separate_process_then_in_process(make_server, tmp_path, gen, monkeypatch):
    disable_xet(monkeypatch)
    root = tmp_path / "persist"
    cmd = [sys.executable, hub_server_module.__file__, "--root", str(root), "--token", "tok-alice=alice",
           "--lfs-mode", "lfs"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    try:
        url = proc.stdout.readline().strip()
        assert url.startswith("http://127.0.0.1:")
        api = HfApi(endpoint=url, token="tok-alice")
        files = sample_files(gen)
        api.create_repo("alice/keep", repo_type="dataset")
        c1 = api.upload_folder(folder_path=_tree(tmp_path / "src", files), repo_id="alice/keep",
                               repo_type="dataset").oid
        api.create_tag("alice/keep", tag="r1", repo_type="dataset")
        c2 = api.upload_file(path_or_fileobj=b"later", path_in_repo="config.json", repo_id="alice/keep",
                             repo_type="dataset").oid
    finally:
        proc.terminate()
        assert proc.wait(10) == 0

    server = make_server(root)
    api = api_for(server)
    assert api.repo_info("alice/keep", repo_type="dataset").sha == c2
    refs = api.list_repo_refs("alice/keep", repo_type="dataset")
    assert [(t.name, t.target_commit) for t in refs.tags] == [("r1", c1)]
    assert [c.commit_id for c in api.list_repo_commits("alice/keep", repo_type="dataset")][:2] == [c2, c1]
    for name, data in files.items():
        assert download(server, tmp_path, "alice/keep", name, repo_type="dataset", revision="r1") == data
    assert download(server, tmp_path, "alice/keep", "config.json", repo_type="dataset") == b"later"


def test_lfs_transfer_is_signed_and_verified(make_server, tmp_path, monkeypatch):
    disable_xet(monkeypatch)
    server = make_server(lfs_mode="lfs")
    api_for(server).create_repo("alice/lfs")
    data = b"\x00weights" * 1000
    oid = hashlib.sha256(data).hexdigest()
    auth = {"Authorization": "Bearer tok-alice", "Content-Type": "application/vnd.git-lfs+json"}
    batch = json.dumps({"operation": "upload", "transfers": ["basic"], "objects": [{"oid": oid, "size": len(data)}]})
    status, _, body = raw(f"{server.url}/alice/lfs.git/info/lfs/objects/batch", "POST", batch.encode(), auth)
    assert status == 200
    href = json.loads(body)["objects"][0]["actions"]["upload"]["href"]
    assert raw(href.replace("sig=", "sig=0"), "PUT", data)[0] == 403
    assert raw(href, "PUT", data[:-1] + b"!")[0] == 400
    assert raw(href, "PUT", data)[0] == 200  # no Authorization header needed
    status, _, body = raw(f"{server.url}/alice/lfs.git/info/lfs/objects/batch", "POST", batch.encode(), auth)
    assert "actions" not in json.loads(body)["objects"][0]  # already stored

    missing = hashlib.sha256(b"never uploaded").hexdigest()
    lines = [{"key": "header", "value": {"summary": "s"}},
             {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid, "size": len(data)}},
             {"key": "lfsFile", "value": {"path": "x.bin", "algo": "sha256", "oid": missing, "size": 14}}]
    ndjson = "\n".join(map(json.dumps, lines)).encode()
    status, headers, _ = raw(f"{server.url}/api/models/alice/lfs/commit/main", "POST", ndjson,
                             {"Authorization": "Bearer tok-alice", "Content-Type": "application/x-ndjson"})
    assert status == 422 and missing in headers["X-Error-Message"]
    status, _, body = raw(f"{server.url}/api/models/alice/lfs/commit/main", "POST",
                          "\n".join(map(json.dumps, lines[:2])).encode(), {"Authorization": "Bearer tok-alice"})
    assert status == 200
    cid = json.loads(body)["commitOid"]

    status, headers, body = raw(f"{server.url}/alice/lfs/resolve/main/w.bin", "HEAD")
    assert status == 200 and headers["X-Repo-Commit"] == cid and headers["X-Linked-Etag"] == f'"{oid}"'
    assert headers["X-Linked-Size"] == str(len(data)) and "X-Xet-Hash" not in headers
    status, headers, body = raw(f"{server.url}/alice/lfs/resolve/{cid}/w.bin", headers={"Range": "bytes=2-9"})
    assert status == 206 and body == data[2:10] and headers["Content-Range"] == f"bytes 2-9/{len(data)}"


def test_fault_injection(server):
    api = api_for(server)
    api.create_repo("alice/flaky")
    server.fail_next(1, status=503)
    with pytest.raises(HfHubHTTPError) as exc:
        api.repo_info("alice/flaky")
    assert exc.value.response.status_code == 503
    assert api.repo_info("alice/flaky").sha
    server.fail_next(1, status=500, path_contains="/preupload/")  # the client retries preupload (http_backoff)
    api.upload_file(path_or_fileobj=b"ok", path_in_repo="ok.txt", repo_id="alice/flaky")
    assert [r[2] for r in server.requests if "/preupload/" in r[1]] == [500, 200]
    assert api.file_exists("alice/flaky", "ok.txt")


def test_regular_commit_payload_shape(server):
    """A hand-written NDJSON commit (as the client sends it) lands atomically, or not at all."""
    api_for(server).create_repo("alice/nd")
    auth = {"Authorization": "Bearer tok-alice"}
    good = {"key": "file", "value": {"path": "a.txt", "content": base64.b64encode(b"A").decode(), "encoding": "base64"}}
    bad = {"key": "deletedFile", "value": {"path": "missing.txt"}}
    body = "\n".join(json.dumps(x) for x in [{"key": "header", "value": {"summary": "s"}}, good, bad]).encode()
    status, headers, _ = raw(f"{server.url}/api/models/alice/nd/commit/main", "POST", body, auth)
    assert status == 404 and headers["X-Error-Code"] == "EntryNotFound"
    assert api_for(server).list_repo_files("alice/nd") == [".gitattributes"]  # nothing half-applied


def test_stop_cuts_keep_alive_connections(make_server):
    server = make_server()
    api = api_for(server)
    api.create_repo("alice/gone")
    api.repo_info("alice/gone")  # leaves a pooled keep-alive connection behind
    server.stop()
    with pytest.raises(Exception) as exc:
        api.repo_info("alice/gone")
    assert not isinstance(exc.value, HfHubHTTPError)  # a transport error, not an answer from a stopped server
