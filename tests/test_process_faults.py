"""Crashes of real processes in a federation through the loopback Hub (slow: each process loads
torch and transformers). A client killed with SIGKILL is left out after the deadline and rejoins;
aggregators killed before or between their commit and tag, restarted, and racing a second
aggregator publish every round exactly once, never showing a half-written round.
"""

from __future__ import annotations

import time

import pytest

from peft_federated.testing.processes import ProcessFederation, round_commits

pytestmark = pytest.mark.slow


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def contributors(history: list[dict]) -> list[list[str]]:
    return [sorted(c["client_id"] for c in h["contributions"]) for h in history]


def test_a_killed_client_is_left_out_at_the_deadline_and_rejoins(tmp_path):
    rounds = 5
    with ProcessFederation(tmp_path, ["alice", "bob", "carol"], rounds, ["--deadline", "20"]) as fed:
        fed.start_aggregator()
        for client in fed.clients:
            fed.start_client(client)
        reader = fed.store()
        wait_for(lambda: (reader.latest_round() or 0) >= 1, 180, "round 1")
        fed.kill("carol")
        # the aggregator closes a round without her once the deadline passes
        wait_for(lambda: "carol" not in contributors(reader.history())[-1], 120, "a round without carol")
        fed.start_client("carol")
        assert fed.wait("aggregator", 240) == 0, fed.log("aggregator")[-3000:]
        for client in fed.clients:
            assert fed.wait(client, 60) == 0, fed.log(client)[-3000:]
        history = reader.history()
    assert [h["round"] for h in history] == list(range(rounds + 1))
    clients = contributors(history)
    assert clients[1] == ["alice", "bob", "carol"]
    assert ["alice", "bob"] in clients  # closed at the deadline without the dead client
    assert clients[-1] == ["alice", "bob", "carol"]  # she rejoined


def test_killed_restarted_and_racing_aggregators_publish_each_round_exactly_once(tmp_path):
    rounds = 5
    with ProcessFederation(tmp_path, ["alice", "bob"], rounds, ["--deadline", "120"]) as fed:
        for client in fed.clients:
            fed.start_client(client)
        fed.start_aggregator(crash_at="after-commit:2")
        assert fed.wait("aggregator", 240) == -9  # killed between round 2's commit and its tag
        reader = fed.store()
        tags, titles, main = round_commits(fed.url)
        assert sorted(tags) == ["round-0000", "round-0001"] and titles[0] == "Round 2" and main not in tags.values()
        assert reader.latest_round() == 1  # an untagged commit is not a published round: clients wait
        state, _ = reader.read_round(1)  # and every tagged round reads back whole

        fed.start_aggregator(crash_at="before-commit:3")  # restarted: repairs round 2's tag, may die before round 3
        fed.start_aggregator("rival")  # a second aggregator over the same repo, all along
        wait_for(lambda: (reader.latest_round() or 0) >= 3, 240, "round 3")
        fed.kill("rival")  # a real SIGKILL at whatever it was doing
        fed.start_aggregator("rival")
        assert fed.wait("rival", 240) == 0, fed.log("rival")[-3000:]
        assert fed.wait("aggregator", 60) in (0, -9)
        for client in fed.clients:
            assert fed.wait(client, 60) == 0, fed.log(client)[-3000:]
        tags, titles, main = round_commits(fed.url)
        history = reader.history()
    assert sorted(tags) == [f"round-{r:04d}" for r in range(rounds + 1)] and main == tags[f"round-{rounds:04d}"]
    assert titles == [f"Round {r}" for r in range(rounds, -1, -1)] + ["initial commit"]  # one commit per round
    assert contributors(history)[1:] == [["alice", "bob"]] * rounds
