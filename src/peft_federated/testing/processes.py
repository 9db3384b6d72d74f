"""A whole federation as real processes on one machine, for fault tests and soak runs.

`ProcessFederation` starts the loopback Hub server (`hub_server.py`, LFS uploads), the aggregator
(`peft-federated aggregate`) and clients (`peft-federated client`), each its own process with its own
token, HF_HOME and log file, so that they can be killed (SIGKILL) and restarted at any moment. The
base model is a tiny random BERT classifier and each client's data a tokenized synthetic set: a
round takes well under a second of training.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Optional

REPO = "org/federation"
VOCAB, SEQ, LABELS = 40, 8, 3


def save_tiny_model(folder: Path) -> Path:
    """A tiny random BERT sequence classifier (no tokenizer: clients get tokenized data)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    BertForSequenceClassification(BertConfig(
        vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=24,
        num_labels=LABELS, max_position_embeddings=SEQ + 2)).save_pretrained(folder)
    return folder


def save_client_data(folder: Path, n: int, seed: int) -> Path:
    """`n` token sequences whose label is the third of the vocabulary their first token falls in."""
    import numpy as np
    from datasets import Dataset

    rng = np.random.default_rng(seed)
    ids = rng.integers(1, VOCAB, size=(n, SEQ))
    labels = np.minimum((ids[:, 0] - 1) // ((VOCAB - 1) // 3 + 1), LABELS - 1)
    Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": np.ones_like(ids).tolist(),
                       "label": labels.tolist()}).save_to_disk(str(folder))
    return folder


class ProcessFederation:
    """The Hub server, aggregators and clients of one federation under `root`, as processes.

    Tokens: "tok-<name>" for the aggregator(s) in `aggregators` (who may write org/*) and for each
    client (who may write its "<repo>-updates-<client>" only). `aggregate_args`: extra
    `peft-federated aggregate` options (e.g. ["--deadline", "5"]).
    """

    def __init__(self, root: Path, clients: list[str], rounds: int, aggregate_args: Optional[list[str]] = None,
                 aggregators: tuple[str, ...] = ("aggregator", "rival")) -> None:
        self.root, self.clients, self.rounds = Path(root), list(clients), rounds
        self.aggregators, self.aggregate_args = aggregators, list(aggregate_args or [])
        self.model_dir = save_tiny_model(self.root / "base-model")
        self.data = {c: save_client_data(self.root / f"data-{c}", 24 + 8 * k, seed=k) for k, c in enumerate(self.clients)}
        self.procs: dict[str, subprocess.Popen] = {}
        self.starts: dict[str, int] = {}
        self.server: Optional[subprocess.Popen] = None
        self.url: Optional[str] = None

    # ---- the Hub server --------------------------------------------------------------------------
    def start_server(self) -> str:
        """Start (or restart, on the same port) the Hub server over the same storage; returns its URL."""
        from peft_federated.testing import hub_server

        names = [*self.aggregators, *self.clients]
        cmd = [sys.executable, hub_server.__file__, "--root", str(self.root / "hub"), "--lfs-mode", "lfs",
               "--port", self.url.rsplit(":", 1)[1] if self.url else "0", *[f"--token=tok-{n}={n}" for n in names],
               *[f"--permission={a}=org/*" for a in self.aggregators],
               *[f"--permission={c}={REPO}-updates-{c}" for c in self.clients]]
        for _ in range(50):  # a just-killed server's port may take a moment to free
            self.server = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
            url = self.server.stdout.readline().strip()
            if url.startswith("http://"):
                self.url = url
                return url
            self.server.wait()
            time.sleep(0.2)
        raise RuntimeError(f"The Hub server did not start: {cmd}")

    def kill_server(self) -> None:
        self.server.kill()
        self.server.wait()

    # ---- aggregators and clients -----------------------------------------------------------------
    def _env(self, name: str, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "PEFT_FEDERATED_"))}
        return {**env, "HF_ENDPOINT": self.url, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(self.root / f"hf-{name}"),
                "HF_TOKEN": f"tok-{name}", "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false",
                "PYTHONWARNINGS": "ignore", **extra}

    def _start(self, name: str, args: list[str], env: dict[str, str]) -> subprocess.Popen:
        self.starts[name] = self.starts.get(name, 0) + 1
        log = (self.root / "logs" / f"{name}-{self.starts[name]}.log")
        log.parent.mkdir(exist_ok=True)
        cmd = [sys.executable, "-m", "peft_federated.cli", *args, "--repo", REPO, "--poll-interval", "0.2"]
        self.procs[name] = subprocess.Popen(cmd, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        return self.procs[name]

    def start_aggregator(self, name: str = "aggregator", crash_at: Optional[str] = None) -> subprocess.Popen:
        """An aggregator process; `crash_at` ("after-commit:2", ...) sets the PEFT_FEDERATED_CRASH_AT test hook."""
        args = ["aggregate", "--clients", ",".join(self.clients), "--model", str(self.model_dir), "--strategy", "fedit",
                "--rounds", str(self.rounds), "--rank", "4", "--target-modules", "query,value", "--local-steps", "2",
                "--retry-timeout", "60", *self.aggregate_args]
        return self._start(name, args, self._env(name, **({"PEFT_FEDERATED_CRASH_AT": crash_at} if crash_at else {})))

    def start_client(self, client: str) -> subprocess.Popen:
        args = ["client", "--client-id", client, "--data", str(self.data[client]), "--model", str(self.model_dir),
                "--batch-size", "8", "--lr", "5e-3", "--round-timeout", "600", "--retry-timeout", "60",
                "--output-dir", str(self.root / f"out-{client}")]
        return self._start(client, args, self._env(client))

    def kill(self, name: str) -> None:
        """SIGKILL a process: no cleanup, no goodbye."""
        proc = self.procs[name]
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()

    def alive(self, name: str) -> bool:
        return name in self.procs and self.procs[name].poll() is None

    def log(self, name: str) -> str:
        return (self.root / "logs" / f"{name}-{self.starts[name]}.log").read_text()

    def wait(self, name: str, timeout: float) -> int:
        try:
            return self.procs[name].wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{name} did not finish within {timeout:.0f}s:\n{self.log(name)[-3000:]}") from None

    def close(self) -> None:
        for name in list(self.procs):
            self.kill(name)
        if self.server is not None and self.server.poll() is None:
            self.server.terminate()
            self.server.wait(10)

    def store(self, name: str = "reader", **kwargs: Any):
        """A `HubStore` on the federation (anonymous reader by default)."""
        from peft_federated.hub_integration.hub_store import HubStore

        token = f"tok-{name}" if name in self.aggregators else None
        return HubStore(REPO, self.clients, token=token, endpoint=self.url, cache_dir=self.root / f"cache-{name}", **kwargs)

    def __enter__(self) -> "ProcessFederation":
        self.start_server()
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def round_commits(url: str) -> tuple[dict[str, str], list[str], str]:
    """The global repo's round tags (name -> commit), its commit titles (newest first) and main's commit."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=url)
    refs = api.list_repo_refs(REPO)
    return ({t.name: t.target_commit for t in refs.tags}, [c.title for c in api.list_repo_commits(REPO)],
            next(b.target_commit for b in refs.branches if b.name == "main"))
