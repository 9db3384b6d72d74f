"""Forged rounds on the global repo and hostile identities, through the loopback Hub.

A collaborator with write access to the global repo ("rival") commits a federation.json claiming
another round, or tags a round that is not the federation's: the aggregator reports it, never tags
it, never skips a round because of it, and publishes the next round of its own chain. Client ids
and updates repos are checked when a store is built.
"""

from __future__ import annotations

import json
import logging

import pytest
from huggingface_hub import CommitOperationAdd, HfApi
from test_hostile_updates import CLIENTS, assert_published, honest
from test_hub_store import REPO, Federation, hf_env, make_server  # noqa: F401

from peft_federated.hub_integration import hub_store
from peft_federated.hub_integration.hub_store import HubStore
from peft_federated.hub_integration.store import check_client_id


@pytest.fixture
def hub(make_server, tmp_path, monkeypatch) -> Federation:
    monkeypatch.setattr(hub_store, "SETTLE_SECONDS", 0.05)
    return Federation("hub", tmp_path, make_server())


def forge(fed: Federation, files: dict[str, bytes], title: str = "Round 7") -> str:
    """The rival's commit on main, as any collaborator with write access could make."""
    return HfApi(endpoint=fed.server.url, token="tok-rival").create_commit(
        REPO, [CommitOperationAdd(name, data) for name, data in files.items()], commit_message=title).oid


def tags(fed: Federation) -> dict[str, str]:
    return {t.name: t.target_commit for t in HfApi(endpoint=fed.server.url).list_repo_refs(REPO).tags}


def forged_federation_json(fed: Federation, round: int) -> bytes:
    meta = json.loads((fed.store.round_folder(0) / "federation.json").read_text())
    return json.dumps({**meta, "round": round}).encode()


def test_a_forged_round_on_main_is_reported_never_tagged_and_the_next_round_is_published(hub, caplog):
    good = {"alice": honest(hub, "alice", 1), "bob": honest(hub, "bob", 2)}
    forged = forge(hub, {"federation.json": forged_federation_json(hub, 7), "evil.py": b"print('owned')"})
    assert hub.store.latest_round() == 0  # clients and aggregator still see round 0 as the latest
    with caplog.at_level(logging.WARNING):
        meta = assert_published(hub, good, {})
    assert f"holds commit {forged} that is not round 1 of this federation" in caplog.text
    assert meta["replaced_head"]["commit"] == forged and "differs from this round's" in meta["replaced_head"]["reason"]
    assert sorted(tags(hub)) == ["round-0000", "round-0001"] and forged not in tags(hub).values()
    api = HfApi(endpoint=hub.server.url)
    assert "evil.py" not in api.list_repo_files(REPO, revision="round-0001")  # the round holds only its own files
    assert api.repo_info(REPO).sha == tags(hub)["round-0001"]


def test_a_forged_round_one_on_the_latest_round_is_not_tagged_either(hub):
    good = {"alice": honest(hub, "alice", 1)}
    forged = forge(hub, {"federation.json": forged_federation_json(hub, 1)}, title="Round 1")  # right number, wrong content
    meta = assert_published(hub, good, {})
    assert meta["replaced_head"]["commit"] == forged and "differs from this round's" in meta["replaced_head"]["reason"]
    assert tags(hub)["round-0001"] != forged


def test_forged_tags_are_ignored_and_replaced_when_the_federation_reaches_them(hub):
    api = HfApi(endpoint=hub.server.url, token="tok-rival")
    round0 = tags(hub)["round-0000"]
    api.create_tag(REPO, tag="round-0007", revision=round0)  # says round 0, off the chain
    api.create_tag(REPO, tag="round-0001", revision=round0)  # the next round's name on round 0's commit
    assert hub.store.latest_round() == 0 and HubStore(REPO, endpoint=hub.server.url).latest_round() == 0
    good = {"alice": honest(hub, "alice", 1)}
    assert_published(hub, good, {})  # round 1 published: its tag now names the federation's commit
    assert tags(hub)["round-0001"] != round0 and hub.store.latest_round() == 1
    reader = HubStore(REPO, endpoint=hub.server.url, cache_dir=hub.tmp_path / "reader")
    assert reader.latest_round() == 1 and [h["round"] for h in reader.history()] == [0, 1]


def test_a_publisher_that_died_before_tagging_is_still_repaired_on_top_of_a_forged_tag(hub):
    """The crash repair (same round, on the latest round's commit) is kept while forged tags are about."""
    HfApi(endpoint=hub.server.url, token="tok-rival").create_tag(REPO, tag="round-0009", revision=tags(hub)["round-0000"])
    honest(hub, "alice", 1)
    from peft_federated.aggregator import aggregate_round

    assert aggregate_round(hub.store, hub.cfg, clients=CLIENTS) == 1
    commit = tags(hub)["round-0001"]
    HfApi(endpoint=hub.server.url, token="tok-aggregator").delete_tag(REPO, tag="round-0001")  # as if it died before
    restarted = HubStore(REPO, hub.store.clients, hub.store.client_repos, token="tok-aggregator", endpoint=hub.server.url,
                         cache_dir=hub.tmp_path / "restarted")
    assert restarted.latest_round() == 0
    assert aggregate_round(restarted, hub.cfg, clients=CLIENTS) == 1  # recomputes the same round: tags that commit
    assert tags(hub)["round-0001"] == commit and HfApi(endpoint=hub.server.url).repo_info(REPO).sha == commit


# ---- identities ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", ["alice\n", "alice\r\n", "a/b", "..", "-x", "", "x" * 97, "al ice"])
def test_a_client_id_is_matched_whole(bad):
    with pytest.raises(ValueError, match="Invalid client id"):
        check_client_id(bad)


@pytest.mark.parametrize("repos, words", [
    ({"alice": "not a repo"}, "client_repos['alice'] must be a Hub repo id 'namespace/name'"),
    ({"alice": "org/a/b"}, "must be a Hub repo id"),
    ({"alice": "org/x--y"}, "must be a Hub repo id"),
    ({"alice": 3}, "must be a Hub repo id"),
    ({"alice": REPO}, "is the global repo"),
    ({"alice": "org/shared", "bob": "org/shared"}, "'alice' and 'bob' would both write updates to 'org/shared'"),
    ({"alice": f"{REPO}-updates-bob"}, "'alice' and 'bob' would both write updates"),
])
def test_client_repos_are_checked_when_the_store_is_built(repos, words):
    with pytest.raises(ValueError, match=words.replace("[", r"\[").replace("]", r"\]")):
        HubStore(REPO, clients=["alice", "bob"], client_repos=repos, endpoint="http://127.0.0.1:9")


def test_the_global_repo_id_is_checked():
    for bad in ("org", "org/a/b", "org/bad name", "/x"):
        with pytest.raises(ValueError, match="repo_id must be a Hub repo id"):
            HubStore(bad, endpoint="http://127.0.0.1:9")


def test_serve_neither_stops_nor_skips_rounds_at_a_forged_round(hub):
    import dataclasses

    from peft_federated.aggregator import serve

    forge(hub, {"federation.json": forged_federation_json(hub, 7)})
    HfApi(endpoint=hub.server.url, token="tok-rival").create_tag(REPO, tag="round-0007", revision="main")
    cfg = dataclasses.replace(hub.cfg, num_rounds=1)
    honest(hub, "alice", 1)
    serve(hub.store, cfg, clients=["alice"], quorum=1, poll_interval=0.05)  # returns once round 1 is published
    assert hub.store.latest_round() == 1 and "round-0001" in tags(hub)
    assert [h["round"] for h in hub.store.history()] == [0, 1]
