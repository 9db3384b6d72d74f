"""Flower as the engine against our in-process simulation: wall time per round and peak memory.

The same federation both ways, in the same run: all-MiniLM-L6-v2 with the demo's LoRA (rank 8 on
query/value, a 3-class head) on the tweets split over N clients (Dirichlet alpha 0.5), every client in
every round, a few local steps, no evaluation; each round published to a LocalStore.
- `ours`: `run_simulation`, one process, one model, clients in turn;
- `flower`: Flower's simulation engine (`flwr.simulation.run_simulation`, Ray backend) with N supernodes,
  `FederatedLoraStrategy` in the ServerApp and `client_app` (FederatedTrainer) in Ray actors: with 1
  actor the clients train in turn as in `ours` (the difference per round is Flower's overhead), with 2
  they train two at a time.
Every client trains with `--threads` torch threads (default 1) in both: Flower gives each actor that
many CPUs (so Ray sets its OMP_NUM_THREADS) and Ray as many CPUs as its actors need. One thread each
keeps a busy machine from stalling torch's intra-op threads, which would measure threading, not Flower.
Each run is a fresh process; its whole process tree (Ray's GCS, raylet and actors included) is sampled
every 0.2 s for the peak of the summed PSS (shared pages split among the processes that map them, so the
sum is the tree's real footprint) and of the summed RSS. A round's wall time is the time between two
publishes; the first round (Ray's actors start, the nodes are asked their client ids) is reported apart,
and so is the start (process start to round 0 published). Training speed on a shared machine swings
with the other jobs, so Flower's overhead is measured where training is not: a round's wall time minus
its clients' `Trainer.train()` times (their `train_runtime`, in the published contributions), with the
clients in turn (ours and 1 actor); Flower's overhead per round is that time's excess over ours.

    .venv/bin/python benchmarks/flower.py [--clients 4 16] [--rounds 4] [--local-steps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pyplot, save_figure, write_json  # noqa: E402

SETTINGS_ENV = "PEFT_FEDERATED_FLOWER_BENCH"  # the run's settings, read by the Ray actors too
ENGINES = (("ours", 0), ("flower", 1), ("flower", 2))  # (engine, Ray actors)


# ---- the federation, the same in every process ---------------------------------------------------------
def settings() -> dict:
    return json.loads(os.environ[SETTINGS_ENV])


def federation_config():
    from peft_federated.demo import sentiment_config

    s = settings()
    return sentiment_config("rolora", 8, num_rounds=s["rounds"], clients_per_round=1.0, local_steps=s["local_steps"])


@lru_cache(maxsize=1)
def client_data(num_clients: int, examples_per_client: int, max_length: int):
    from peft_federated.data import dirichlet_partition
    from peft_federated.demo import sentiment_data

    train, _, tokenizer = sentiment_data(num_clients * examples_per_client, 0, max_length, seed=0)
    parts = dirichlet_partition(train, num_clients, alpha=0.5, label_column="label", seed=0)
    return tokenizer, {f"client-{k}": part for k, part in enumerate(parts)}


def trainer(model, config, client_id: str, output_dir: Path):
    from transformers import DataCollatorWithPadding

    from peft_federated.demo import sentiment_args
    from peft_federated.trainer import FederatedTrainer

    s = settings()
    tokenizer, data = client_data(s["clients"], s["examples_per_client"], s["max_length"])
    return FederatedTrainer(model=model, args=sentiment_args(output_dir / client_id, s["batch_size"]), train_dataset=data[client_id],
                            data_collator=DataCollatorWithPadding(tokenizer), federated_config=config, client_id=client_id)


def model_fn(config, context=None):
    import torch

    from peft_federated.demo import sentiment_model

    torch.set_num_threads(settings()["threads"])  # in Ray's actors as in ours

    return sentiment_model(config, seed=0)


def trainer_fn(model, config, context):
    from peft_federated.flower import node_client_id

    return trainer(model, config, node_client_id(context), Path(tempfile.gettempdir()) / "peft-federated-bench-flower")


def timed_store(root: Path):
    """A LocalStore that records when each round is published."""
    from peft_federated.hub_integration import LocalStore

    class TimedStore(LocalStore):
        published: list[float] = []

        def publish_round(self, state, config, metadata):
            where = super().publish_round(state, config, metadata)
            self.published.append(time.time())
            return where

    return TimedStore(root)


# ---- one run, in its own process -----------------------------------------------------------------------
def worker(engine: str, actors: int, out: Path) -> dict:
    start, s = time.time(), settings()
    config = federation_config()
    store = timed_store(out / "store")
    if engine == "ours":
        from peft_federated.trainer import run_simulation

        tokenizer, data = client_data(s["clients"], s["examples_per_client"], s["max_length"])
        model = model_fn(config)
        probe = trainer(model, config, "client-0", out)
        run_simulation(model, config, data, probe.args, store, data_collator=probe.data_collator, progress=False)
    else:
        from flwr.serverapp import ServerApp
        from flwr.simulation import run_simulation as flower_simulation

        from peft_federated.flower import FederatedLoraStrategy, client_app

        import flower as bench  # this file by its module name: the Ray actors import the ClientApp's functions by it
        server = ServerApp()

        @server.main()
        def main(grid, context):
            strategy = FederatedLoraStrategy(config, store=store, min_available_nodes=s["clients"])
            strategy.start(grid, strategy.initial_arrays(model_fn(config)))

        flower_simulation(server, client_app(bench.model_fn, bench.trainer_fn), num_supernodes=s["clients"], backend_config={
            "client_resources": {"num_cpus": s["threads"], "num_gpus": 0.0},
            "init_args": {"num_cpus": s["threads"] * actors, "num_gpus": 0}})
    return {"start": start, "published": store.published, "end": time.time()}


def measure(engine: str, actors: int, run_settings: dict) -> dict:
    """Run one configuration in a fresh process, sampling its process tree's memory."""
    import psutil

    out = Path(tempfile.mkdtemp(prefix="peft-federated-bench-flower-"))
    env = {**os.environ, SETTINGS_ENV: json.dumps(run_settings), "FLWR_TELEMETRY_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen([sys.executable, __file__, "--worker", engine, str(actors), str(out)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    peak_pss = peak_rss = 0
    root = psutil.Process(proc.pid)
    while proc.poll() is None:
        pss = rss = 0
        try:
            tree = [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            break
        for p in tree:
            try:
                info = p.memory_full_info()
                pss, rss = pss + info.pss, rss + info.rss
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        peak_pss, peak_rss = max(peak_pss, pss), max(peak_rss, rss)
        time.sleep(0.2)
    stdout, stderr = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} ({actors} actors) failed (exit {proc.returncode}):\n{stderr[-4000:]}")
    times = json.loads(stdout.strip().splitlines()[-1])
    from peft_federated.hub_integration import LocalStore

    history = LocalStore(out / "store").history()
    shutil.rmtree(out, ignore_errors=True)
    published = times["published"]
    wall = [b - a for a, b in zip(published, published[1:])]
    train = [sum(c["metrics"]["train_runtime"] for c in h["contributions"]) for h in history[1:]]
    assert len(wall) == len(train) == run_settings["rounds"], (len(wall), len(train))
    outside = [w - t for w, t in zip(wall, train)]  # clients in turn: the round's time outside Trainer.train()
    return {"engine": engine, "actors": actors, "clients": run_settings["clients"], "startup_s": published[0] - times["start"],
            "first_round_s": wall[0], "round_s": wall[1:], "per_round_s": statistics.median(wall[1:]),
            "train_s": train[1:], "outside_train_s": statistics.median(outside[1:]) if actors < 2 else None,
            "total_s": times["end"] - times["start"], "peak_pss_bytes": peak_pss, "peak_rss_bytes": peak_rss}


def plot(runs: list[dict]) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    clients = sorted({r["clients"] for r in runs})
    labels = [("ours", 0, "ours (in-process)"), ("flower", 1, "Flower, 1 actor"), ("flower", 2, "Flower, 2 actors")]
    panels = [("per_round_s", 1, "wall time per round (s)"), ("outside_train_s", 1, "per round outside the clients' train() (s)"),
              ("peak_pss_bytes", 2**30, "peak memory, all processes (PSS, GiB)")]
    width = 0.8 / len(labels)
    for i, (engine, actors, label) in enumerate(labels):
        rows = [next(r for r in runs if r["clients"] == n and r["engine"] == engine and r["actors"] == actors) for n in clients]
        for ax, (key, unit, _) in zip(axes, panels):
            points = [(k + (i - 1) * width, r[key] / unit) for k, r in enumerate(rows) if r[key] is not None]
            if points:
                ax.bar(*zip(*points), width, label=label)
    for ax, (_, _, title) in zip(axes, panels):
        ax.set_xticks(range(len(clients)), [f"{n} clients" for n in clients])
        ax.set_title(title, fontsize=10)
        ax.grid(axis="y", alpha=0.3)
    axes[0].legend()
    save_figure(fig, "flower")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 16])
    parser.add_argument("--rounds", type=int, default=4, help="Rounds per run (the first is reported apart).")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--examples-per-client", type=int, default=64)
    parser.add_argument("--max-length", type=int, default=48)
    parser.add_argument("--threads", type=int, default=1, help="Torch threads per client (ours), CPUs per Ray actor (Flower).")
    parser.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        print(json.dumps(worker(args.worker[0], int(args.worker[1]), Path(args.worker[2]))), flush=True)
        return
    if args.rounds < 3:
        parser.error("--rounds must be at least 3: the first round is reported apart, and the rest give the median")
    base = {"rounds": args.rounds, "local_steps": args.local_steps, "batch_size": args.batch_size,
            "examples_per_client": args.examples_per_client, "max_length": args.max_length, "threads": args.threads}
    runs = []
    for clients in args.clients:
        for engine, actors in ENGINES:
            run = measure(engine, actors, {**base, "clients": clients})
            print(f"{clients:3d} clients, {engine:6s} ({actors} actors): {run['per_round_s']:.2f} s/round, first round "
                  f"{run['first_round_s']:.1f} s, start {run['startup_s']:.1f} s, peak PSS {run['peak_pss_bytes'] / 2**30:.2f} GiB",
                  flush=True)
            runs.append(run)
    for run in runs:
        ours = next(r for r in runs if r["clients"] == run["clients"] and r["engine"] == "ours")
        run["per_round_vs_ours"] = run["per_round_s"] / ours["per_round_s"]
        run["peak_pss_vs_ours"] = run["peak_pss_bytes"] / ours["peak_pss_bytes"]
        if run["outside_train_s"] is not None:  # Flower's own cost per round, by the time outside the clients' training
            run["overhead_s_per_round"] = run["outside_train_s"] - ours["outside_train_s"]
    import flwr

    write_json("flower", {"settings": base, "flwr_version": flwr.__version__, "strategy": "rolora", "runs": runs})
    plot(runs)


if __name__ == "__main__":
    main()
