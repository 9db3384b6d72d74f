"""Soak test: a federation of real processes through the loopback Hub, under seeded random faults.

    python scripts/soak.py [--rounds 20] [--clients 5] [--seed 0] [--workdir DIR]

Five honest clients, one aggregator and the Hub server run as processes (see
`peft_federated.testing.processes`). Each round, with a seeded random generator, the driver may:
SIGKILL a client (restarted a moment later), SIGKILL the aggregator (restarted at once), restart the
aggregator with a crash hook that kills it just before or just between its commit and its tag, kill
and restart the Hub server, corrupt an honest client's uploaded file, or upload a hostile update from
the registered client "mallory" (truncated or corrupt safetensors, unknown / missing tensors, wrong
shapes, a rank above the allowed one, wrong dtype, NaN/Inf, a norm outlier, an oversized file, a
copy of another client's update, a stale round, another client's name, a malformed update.json, and
hostile metadata: num_samples of 10**400 or 10**300, a metric of 10**400, NaN, a string or a markdown
name, metrics as a string, an update.json nested 200,000 deep or above its size limit). A collaborator
with write access to the global repo ("rival") may also commit a forged federation.json claiming
another round to main, or tag a later round on main's commit.

At the end every round is recomputed from what the Hub holds: the updates each round's
federation.json lists as contributions, found in the clients' updates repos by their sha256, are
aggregated again from the previous round and compared with the published round. It also checks that
each round is exactly one commit with its tag (besides the forged commits, none of them tagged) and
that mallory never contributed. The JSON report
(printed and written to <workdir>/soak-report.json) has rounds completed, faults injected by kind,
updates refused by reason, and mismatches (must be 0). Not run by CI: it takes a few minutes.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

# before huggingface_hub is imported: the loopback Hub speaks plain git-LFS; no progress bars in the report
os.environ.update(HF_HUB_DISABLE_XET="1", HF_HUB_DISABLE_PROGRESS_BARS="1", HF_DATASETS_DISABLE_PROGRESS_BARS="1")

import torch  # noqa: E402
from huggingface_hub import CommitOperationAdd, HfApi, hf_hub_download  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from safetensors.torch import save as save_bytes  # noqa: E402

from peft_federated import get_strategy  # noqa: E402
from peft_federated.roles import federation_config  # noqa: E402
from peft_federated.testing.processes import REPO, ProcessFederation, round_commits  # noqa: E402

HOSTILE = {  # kind -> (update bytes from honest-shaped tensors, changes to the update.json record)
    "truncated": (lambda t: save_bytes(t)[:-32], {}),
    "garbage": (lambda t: b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}" + bytes(64), {}),
    "unknown_tensor": (lambda t: save_bytes({**t, "base_model.model.evil": torch.zeros(3)}), {}),
    "missing_tensor": (lambda t: save_bytes(dict(list(t.items())[1:])), {}),
    "wrong_shape": (lambda t: save_bytes({k: v[..., :-1].contiguous() if "classifier" in k else v for k, v in t.items()}), {}),
    "rank_above": (lambda t: save_bytes({k: torch.cat([v, v[:1]]) if "lora_A" in k else torch.cat([v, v[:, :1]], 1)
                                         if "lora_B" in k else v for k, v in t.items()}), {}),
    "wrong_dtype": (lambda t: save_bytes({k: v.double() for k, v in t.items()}), {}),
    "nan": (lambda t: save_bytes({k: v.clone().fill_(float("nan")) for k, v in t.items()}), {}),
    "inf": (lambda t: save_bytes({k: v.clone().fill_(float("inf")) for k, v in t.items()}), {}),
    "norm_outlier": (lambda t: save_bytes({k: v + torch.randn_like(v) for k, v in t.items()}), {}),
    "oversized": (lambda t: save_bytes({**t, "padding": torch.zeros(40_000)}), {}),
    "stale_round": (save_bytes, {"base_round": -1}),
    "another_clients_name": (save_bytes, {"client_id": "c1"}),
    "bad_num_samples": (save_bytes, {"num_samples": -5}),
    "malformed_update_json": (save_bytes, None),
    # hostile metadata: update.json changes, or a function of the honest record giving its raw bytes
    "num_samples_10e400": (save_bytes, {"num_samples": 10**400}),
    "num_samples_10e300": (save_bytes, {"num_samples": 10**300}),
    "metric_10e400": (save_bytes, {"metrics": {"train_loss": 10**400}}),
    "metric_nan": (save_bytes, lambda r: json.dumps({**r, "metrics": {"train_loss": float("nan")}}).encode()),
    "metric_string": (save_bytes, {"metrics": {"train_loss": "low"}}),
    "metrics_string": (save_bytes, {"metrics": "train_loss=0.1"}),
    "metric_markdown_name": (save_bytes, {"metrics": {"x |\n# Owned [link](http://evil)": 1.0}}),
    "nested_update_json": (save_bytes, lambda r: b"[" * 200_000 + b"]" * 200_000),
    "oversized_update_json": (save_bytes, lambda r: json.dumps({**r, "pad": "x" * 100_000}).encode()),
}
MAX_UPDATE_BYTES = 65536
FORGED = "soak: forged round"


class Soak:
    def __init__(self, workdir: Path, rounds: int, num_clients: int, seed: int) -> None:
        self.rng = random.Random(seed)
        torch.manual_seed(seed)
        self.honest = [f"c{i}" for i in range(1, num_clients + 1)]
        self.fed = ProcessFederation(workdir, [*self.honest, "mallory"], rounds, [
            "--quorum", str(num_clients), "--deadline", "10", "--min-clients", "1", "--norm-outlier-factor", "10",
            "--max-update-norm", "2", "--max-update-bytes", str(MAX_UPDATE_BYTES)])
        self.rounds, self.faults, self.events = rounds, Counter(), Counter()
        self.restart_at: dict[str, float] = {}

    def api(self, name: str) -> HfApi:
        return HfApi(endpoint=self.fed.url, token=f"tok-{name}")

    def upload(self, client: str, round: int, weights: bytes, meta: bytes) -> None:
        repo, folder = f"{REPO}-updates-{client}", f"round-{round:04d}"
        api = self.api(client)
        api.create_repo(repo, exist_ok=True)
        api.create_commit(repo, [CommitOperationAdd(f"{folder}/update.safetensors", weights),
                                 CommitOperationAdd(f"{folder}/update.json", meta)], commit_message=f"soak: {client}")

    def hostile(self, round: int) -> None:
        """mallory uploads a hostile update for `round` (a copy of an honest one when there is one to copy)."""
        reader = self.fed.store("driver")
        state, _ = reader.read_round(round)
        start = get_strategy(self.config).client_start(state, "mallory", self.config.r)
        submitted = [c for c in reader.list_updates(round) if c != "mallory"]
        kind = self.rng.choice(sorted(HOSTILE) + (["duplicate"] if submitted else []))
        if kind == "duplicate":
            path = Path(hf_hub_download(f"{REPO}-updates-{submitted[0]}", f"round-{round:04d}/update.safetensors",
                                        endpoint=self.fed.url, cache_dir=self.fed.root / "cache-driver"))
            weights, changes = path.read_bytes(), {}
        else:
            make, changes = HOSTILE[kind]
            weights = make(start)
        record = {"round": round, "client_id": "mallory", "base_round": round, "base_commit": reader._commit(round),
                  "num_samples": 10, "sha256": hashlib.sha256(weights).hexdigest()}
        meta = b"{not json" if changes is None else changes(record) if callable(changes) else json.dumps({**record, **changes}).encode()
        self.upload("mallory", round, weights, meta)
        self.faults[f"hostile_{kind}"] += 1

    def forge(self, round: int) -> None:
        """The rival (write access to the global repo) commits a forged round to main, or tags a later round."""
        api, reader = self.api("rival"), self.fed.store("driver")
        if self.rng.random() < 0.5 or round + 2 > self.rounds:
            meta = json.loads((reader.round_folder(round) / "federation.json").read_text())
            api.create_commit(REPO, [CommitOperationAdd("federation.json", json.dumps({**meta, "round": 7}).encode()),
                                     CommitOperationAdd("evil.py", b"print('owned')")], commit_message=FORGED)
            self.faults["forged_round_on_main"] += 1
        else:
            api.create_tag(REPO, tag=f"round-{round + 2:04d}", revision=api.repo_info(REPO).sha)
            self.faults["forged_tag"] += 1

    def corrupt(self, round: int) -> None:
        """Overwrite an honest client's uploaded update.safetensors, keeping its update.json (and sha256)."""
        reader = self.fed.store("driver")
        submitted = [c for c in reader.list_updates(round) if c != "mallory"]
        if not submitted:
            return
        client = self.rng.choice(submitted)
        path = f"round-{round:04d}/update.safetensors"
        data = Path(hf_hub_download(f"{REPO}-updates-{client}", path, endpoint=self.fed.url,
                                    cache_dir=self.fed.root / "cache-driver")).read_bytes()
        self.api(client).create_commit(f"{REPO}-updates-{client}", [CommitOperationAdd(path, data[:-16] + bytes(16))],
                                       commit_message="soak: corrupted upload")
        self.faults["corrupt_upload"] += 1

    def inject(self, round: int) -> None:
        """Seeded faults while `round`'s updates come in."""
        rng, fed = self.rng, self.fed
        if rng.random() < 0.7:
            self.hostile(round)
        if rng.random() < 0.3:
            self.forge(round)
        time.sleep(rng.uniform(0.2, 1.5))  # honest updates arrive meanwhile
        if rng.random() < 0.3:
            self.corrupt(round)
        if rng.random() < 0.3:
            client = rng.choice([c for c in self.honest if fed.alive(c)] or self.honest)
            fed.kill(client)
            self.restart_at[client] = time.monotonic() + rng.uniform(0, 4)
            self.faults["kill_client"] += 1
        if rng.random() < 0.2:
            fed.kill_server()
            time.sleep(rng.uniform(0.5, 3))
            fed.start_server()
            self.faults["hub_restart"] += 1
        if rng.random() < 0.2:
            fed.kill("aggregator")
            crash = rng.choice([None, "before-commit", "after-commit"])
            fed.start_aggregator(crash_at=f"{crash}:{round + 1}" if crash else None)
            self.faults[f"kill_aggregator{'_then_crash_' + crash if crash else ''}"] += 1

    def run(self) -> dict:
        fed = self.fed
        started = time.monotonic()
        fed.start_server()
        try:
            fed.start_aggregator()
            for client in self.honest:
                fed.start_client(client)
            reader = fed.store("driver-poll", retry_timeout=120)
            self.config = federation_config(reader, timeout=300, poll_interval=0.5)
            seen = -1
            while (latest := reader.latest_round() or 0) < self.rounds:
                if time.monotonic() - started > 1800:
                    raise TimeoutError(f"The soak reached only round {latest} in 30 minutes.")
                self.revive()
                if latest > seen:
                    seen = latest
                    self.inject(latest)
                time.sleep(0.3)
            for name in fed.procs:
                if fed.alive(name):
                    fed.wait(name, 120)
            return self.verify(time.monotonic() - started)
        finally:
            fed.close()

    def revive(self) -> None:
        """Restart killed clients when their time comes, and an aggregator that died (crash hook)."""
        for client, when in list(self.restart_at.items()):
            if time.monotonic() >= when:
                self.fed.start_client(client)
                del self.restart_at[client]
        if not self.fed.alive("aggregator"):
            self.fed.start_aggregator()
            self.events["aggregator_died_at_its_crash_hook"] += 1

    def verify(self, seconds: float) -> dict:
        """Recompute every round from the updates its federation.json names, found on the Hub by sha256."""
        fed, strategy = self.fed, get_strategy(self.config)
        reader = fed.store("verify")
        tags, titles, main = round_commits(fed.url)
        problems = []
        if sorted(tags) != [f"round-{r:04d}" for r in range(self.rounds + 1)] or main != tags[f"round-{self.rounds:04d}"]:
            problems.append(f"round tags {sorted(tags)} / main {main}")
        forged = [t for t in titles if t == FORGED]
        if [t for t in titles if t != FORGED] != [f"Round {r}" for r in range(self.rounds, -1, -1)] + ["initial commit"]:
            problems.append(f"commits of the global repo: {titles}")
        files = self.updates_by_sha()
        refused, mismatches = Counter(), []
        previous, _ = reader.read_round(0)
        for r in range(1, self.rounds + 1):
            published, meta = reader.read_round(r)
            refused.update(_reason_kind(x["reason"]) for x in meta.get("refused", []))
            contributions = meta["contributions"]
            if any(c["client_id"] == "mallory" for c in contributions):
                mismatches.append(f"round {r}: mallory's hostile update was accepted")
            try:
                updates = [(c["client_id"], load_file(files[(c["client_id"], r - 1, c["sha256"])]),
                            c.get("weight_samples", c["num_samples"]))
                           for c in contributions]
                expected = strategy.aggregate(previous, updates)
                for key, value in expected.tensors.items():
                    torch.testing.assert_close(published.tensors[key], value, rtol=0, atol=0)
                assert expected.strategy_state == published.strategy_state
            except (KeyError, AssertionError) as err:
                mismatches.append(f"round {r}: {type(err).__name__}: {str(err)[:200]}")
            previous = published
        return {"rounds_completed": (reader.latest_round() or 0), "rounds_planned": self.rounds, "seconds": round(seconds, 1),
                "faults_injected": dict(sorted(self.faults.items())), "faults_total": sum(self.faults.values()),
                "events": dict(self.events), "forged_commits_on_main": len(forged),
                "updates_refused": dict(sorted(refused.items())), "updates_refused_total": sum(refused.values()),
                "updates_accepted_total": sum(len(h["contributions"]) for h in reader.history()[1:]),
                "mismatches": len(mismatches) + len(problems), "mismatch_details": mismatches + problems}

    def updates_by_sha(self) -> dict[tuple[str, int, str], str]:
        """(client, round, sha256) -> a local copy of every update file version in the clients' repos' histories."""
        api, out, seen = HfApi(endpoint=self.fed.url), {}, set()
        for client in self.fed.clients:
            repo = f"{REPO}-updates-{client}"
            for commit in api.list_repo_commits(repo):
                for f in api.list_repo_tree(repo, revision=commit.commit_id, recursive=True):
                    if f.path.endswith("/update.safetensors") and (repo, f.path, f.blob_id) not in seen:
                        seen.add((repo, f.path, f.blob_id))
                        path = hf_hub_download(repo, f.path, revision=commit.commit_id, endpoint=self.fed.url,
                                               cache_dir=self.fed.root / "cache-verify")
                        sha = hashlib.sha256(Path(path).read_bytes()).hexdigest()
                        out[(client, int(f.path[6:10]), sha)] = path
        return out


def _reason_kind(reason: str) -> str:
    """A short name for a refusal reason, for the report."""
    for words, kind in [("max_update_json_bytes", "oversized_update_json"), ("nested too deeply", "nested_update_json"),
                        ("max_num_samples", "num_samples_above_max"), ("metric", "bad_metrics"),
                        ("not a readable safetensors", "unreadable_safetensors"), ("unexpected tensors", "unknown_tensors"),
                        ("missing tensors", "missing_tensors"), ("rank must be", "rank"), ("dtype", "dtype"),
                        ("NaN or Inf", "non_finite"), ("norm_outlier_factor", "norm_outlier"),
                        ("max_update_norm", "norm_bound"), ("max_update_bytes", "oversized"), ("sha256", "sha256_mismatch"),
                        ("byte for byte", "duplicate"), ("update.json is for client", "wrong_client_or_round"),
                        ("trained from", "stale_round_or_commit"), ("num_samples", "num_samples"), ("JSON", "malformed_json"),
                        ("has shape", "shape"), ("not a registered", "unregistered")]:
        if words in reason:
            return kind
    return "other"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=20)
    ap.add_argument("--clients", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", type=Path, default=None, help="Where the Hub, logs and report go (default: a new temp dir).")
    args = ap.parse_args(argv)
    workdir = args.workdir or Path(tempfile.mkdtemp(prefix="peft-federated-soak-"))
    workdir.mkdir(parents=True, exist_ok=True)
    report = {"seed": args.seed, "workdir": str(workdir), **Soak(workdir, args.rounds, args.clients, args.seed).run()}
    (workdir / "soak-report.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    print(f"report: {workdir / 'soak-report.json'}")
    return 0 if report["mismatches"] == 0 and report["rounds_completed"] == args.rounds else 1


if __name__ == "__main__":
    sys.exit(main())
