"""Why federation loses ground in the comparison's headline setting: FedIT under variants of its protocol.

The headline setting of `comparison.py` (alpha 0.1, rank 8, 20 clients, logit adjustment on, FedIT at its
tuned rate 3e-3) ends below its start on some seeds. Each variant changes one thing, on the same data
splits and seeds, and reports the test accuracy per round:
- `grid`: the comparison's protocol, 15 rounds of 5 clients x 5 local steps (375 client steps); its runs
  are taken from results/comparison.json where that has them;
- `two_a_round`: the same steps as 40 rounds of 2 clients (more rounds, each round's mean from fewer clients);
- `sgd`: plain SGD (lr 2; 0.1 and 0.5 barely move the model, 8 collapses it) instead of AdamW, whose first steps
  after each round's fresh start move every coordinate by about the learning rate, however small its gradient;
- `head_trained`: the linear-probe head trained (and averaged) with the LoRA factors instead of frozen;
- `uniform`: every sampled client weighs the same in its round's mean, instead of by its sample count;
- `ten_a_round`: 19 rounds of 10 clients x 2 steps (380 client steps; each round's mean from more clients);
- `uniform_ten_a_round`: both of the two above;
- `long`: 60 rounds of 5 clients (1,500 client steps), the same schedule stretched;
- `centralized_long`: a plain Trainer on the pooled client data for the same 1,500 steps.

    .venv/bin/python benchmarks/headline_drift.py          # about 70 min on the 2-core CPU; resumable
    .venv/bin/python benchmarks/headline_drift.py --plot-only
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, run_sentiment_pool, save_figure, write_json  # noqa: E402

BASE = dict(rounds=15, clients_per_round=5, local_steps=5, train_examples=8000, eval_examples=400, probe_examples=600,
            val_examples=300, client_test_max=30, logit_adjustment=1.0)
VARIANTS = {
    "grid": dict(),
    "two_a_round": dict(rounds=40, clients_per_round=2),
    "sgd": dict(lr=2.0, training_args={"optim": "sgd"}),
    "head_trained": dict(freeze_head=False),
    "uniform": dict(federation={"weighting": "uniform"}),
    "ten_a_round": dict(rounds=19, clients_per_round=10, local_steps=2),
    "uniform_ten_a_round": dict(rounds=19, clients_per_round=10, local_steps=2, federation={"weighting": "uniform"}),
    "long": dict(rounds=60, seeds=[0, 1]),
    "centralized_long": dict(rounds=60, method="centralized", seeds=[0]),
}
LR, SEEDS = 3e-3, [0, 1, 2]


def runs() -> list[dict]:
    return [dict(variant=name, seed=seed) for name, v in VARIANTS.items() for seed in v.get("seeds", SEEDS)]


def key(run: dict) -> str:
    return f"{run['variant']}/seed={run['seed']}"


def run_variant(run: dict, args, data) -> dict:
    """`comparison.run_one` for FedIT in the headline setting, with the variant's changes."""
    from comparison import run_one

    v = VARIANTS[run["variant"]]
    conf = argparse.Namespace(**{**BASE, **{k: x for k, x in v.items() if k in BASE or k in ("training_args", "freeze_head", "federation")}})
    result = run_one(dict(setting="headline", method=v.get("method", "fedit"), lr=v.get("lr", LR), seed=run["seed"]), conf, data)
    return {**result, **run, "protocol": {k: x for k, x in vars(conf).items() if k not in ("train_examples", "eval_examples")}}


def round_mixes(args) -> dict[str, dict]:
    """Per seed and weighting: each round's label shares of the round's mean (its clients' label counts,
    each client weighed as the aggregator weighs it), under the grid protocol's client sampling."""
    from collections import Counter

    from comparison import SETTINGS, split_data

    from peft_federated.demo import sentiment_data
    from peft_federated.trainer.simulation import sample_clients

    train, _, _ = sentiment_data(BASE["train_examples"], BASE["eval_examples"])
    conf = argparse.Namespace(**BASE)
    out = {}
    for seed in SEEDS:
        _, _, _, clients = split_data(train, conf, seed, SETTINGS["headline"])
        counts = {c: Counter(tr["label"]) for c, (tr, _) in clients.items()}
        mixes = {"samples": [], "uniform": []}
        for rnd in range(BASE["rounds"]):
            picked = sample_clients(sorted(clients), BASE["clients_per_round"], seed, rnd)
            for weighting, mix in mixes.items():
                shares = [sum(counts[c][k] / (sum(counts[c].values()) if weighting == "uniform" else 1) for c in picked)
                          for k in range(3)]
                mix.append([x / sum(shares) for x in shares])
        out[str(seed)] = mixes
    return out


def summarize(results: dict[str, dict]) -> list[dict]:
    rows = []
    for name in VARIANTS:
        mine = sorted((r for r in results.values() if r["variant"] == name), key=lambda r: r["seed"])
        if not mine:
            continue
        final = [r["accuracy"][-1] for r in mine]
        rows.append({
            "variant": name, "seeds": [r["seed"] for r in mine], "lr": mine[0]["lr"],
            "start": statistics.fmean(r["accuracy"][0] for r in mine), "final": final,
            "final_mean": statistics.fmean(final), "final_std": statistics.stdev(final) if len(final) > 1 else None,
            "lowest_mean": statistics.fmean(min(r["accuracy"]) for r in mine),
            "macro_f1_mean": statistics.fmean(r["macro_f1"][-1] for r in mine),
        })
    return rows


def plot(results: dict[str, dict]) -> list[str]:
    plt = pyplot()
    fig, axes = plt.subplots(1, len(SEEDS), figsize=(4.6 * len(SEEDS), 3.8), sharey=True)
    for ax, seed in zip(axes, SEEDS):
        for name in VARIANTS:
            r = results.get(key(dict(variant=name, seed=seed)))
            if r is not None:  # x: the fraction of the run's schedule, so 15- and 60-round runs line up
                last = r["rounds"][-1]
                ax.plot([x / last for x in r["rounds"]], r["accuracy"], "--" if "centralized" in name else "-", marker=".",
                        label=f"{name} ({last} rounds)")
        ax.set_title(f"seed {seed}", fontsize=9)
        ax.set_xlabel("fraction of the run")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    axes[0].set_ylabel("test accuracy")
    path = save_figure(fig, "headline_drift")
    plt.close(fig)
    return [str(path)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--plot-only", action="store_true")
    args = parser.parse_args()
    args.train_examples, args.eval_examples = BASE["train_examples"], BASE["eval_examples"]
    path = RESULTS / "headline_drift.json"
    saved = json.loads(path.read_text()) if path.exists() else {}
    results, mixes = saved.get("runs", {}), saved.get("round_mix") or round_mixes(args)

    def save() -> None:
        write_json("headline_drift", {"base": BASE, "variants": VARIANTS, "lr": LR, "runs": results,
                                      "summary": summarize(results), "round_mix": mixes, "plots": plot(results)})

    if args.plot_only:
        return save()

    def done(r: dict) -> None:
        results[key(r)] = r
        print(f"[{len(results)}/{len(runs())}] {key(r)}: {r['accuracy'][0]:.3f} -> {r['accuracy'][-1]:.3f} "
              f"({r['seconds']:.0f} s)", flush=True)
        save()

    grid = RESULTS / "comparison.json"  # `grid` is the comparison's own FedIT runs at 3e-3, where it has them
    done_there = json.loads(grid.read_text()).get("runs", {}) if grid.exists() else {}
    for seed in SEEDS:
        if key(run := dict(variant="grid", seed=seed)) not in results and (r := done_there.get(f"headline/fedit/lr={LR:g}/seed={seed}")):
            results[key(run)] = {**r, **run, "from": "comparison.json", "protocol": BASE}
    todo = [r for r in runs() if key(r) not in results]
    todo.sort(key=lambda r: -VARIANTS[r["variant"]].get("rounds", BASE["rounds"]))  # the long runs first: the pool ends together
    run_sentiment_pool(lambda: [r for r in todo if key(r) not in results], key, args, run_variant, done)
    save()


if __name__ == "__main__":
    main()
