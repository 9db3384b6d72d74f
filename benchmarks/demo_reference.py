"""The demo's centralized reference, and the demo itself: what `peft-federated demo` is compared with.

Centralized LoRA (a plain `Trainer`) on exactly the demo's data (the tweets its clients hold, pooled),
with the same head warm start (the linear probe on the aggregator's seed set, frozen), LoRA, batch,
learning rate and schedule, for as many optimizer steps as all the federation's clients take
together; evaluated on the demo's held-out tweets. The demo reads the result from
results/demo_reference.json and prints it beside its own. Then the demo runs with its defaults, and
its figures and wall time are saved beside the reference (`--no-demo` skips it).

    .venv/bin/python benchmarks/demo_reference.py              # about 2 + 5 minutes alone on the 2-core CPU
    .venv/bin/python benchmarks/demo_reference.py --no-demo    # the reference only
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import RESULTS, pyplot, save_figure, write_json  # noqa: E402


def demo_defaults() -> dict:
    from peft_federated.demo import run_demo

    return {name: p.default for name, p in inspect.signature(run_demo).parameters.items()}


def reference(d: dict, seed: int, eval_every: int) -> dict:
    from peft_federated.demo import run_centralized, sentiment_config

    config = sentiment_config(d["strategy"], d["rank"], num_rounds=d["num_rounds"],
                              clients_per_round=d["clients_per_round"], local_steps=d["local_steps"])
    per_round = config.num_sampled(d["num_clients"]) * d["local_steps"]  # optimizer steps of one round, all clients
    return run_centralized(d["num_rounds"] * per_round, d["train_examples"], d["eval_examples"], d["max_length"],
                           d["probe_examples"], d["freeze_head"], d["rank"], d["batch_size"], d["learning_rate"], seed,
                           eval_steps=eval_every * per_round)


def demo(d: dict) -> dict:
    from peft_federated.demo import run_demo

    with tempfile.TemporaryDirectory() as tmp:
        start = time.time()
        summary = run_demo(**{**d, "output_dir": Path(tmp) / "run", "progress": False})
        seconds = time.time() - start
    return {**{k: v for k, v in summary.items() if k not in ("adapter", "plot", "results")}, "seconds": seconds,
            "load_average_1min_after": round(os.getloadavg()[0], 2)}


def plot(runs: list[dict], federated: dict | None, d: dict) -> str:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4))
    for r in runs:
        ax.plot(r["steps_evaluated"], r["accuracy"], "--", marker=".", label=f"centralized LoRA (seed {r['settings']['seed']})")
    if federated is not None:
        per_round = federated["optimizer_steps"] / d["num_rounds"]
        acc = federated["accuracy_per_round"]
        ax.plot([per_round * i for i in federated["rounds_evaluated"]], acc, "-", marker="o", label=f"federated ({federated['strategy']}, the demo)")
        ax.axhline(federated["majority_class_rate"], color="grey", lw=0.8, ls=":", label="majority class")
    ax.set(xlabel="optimizer steps (all clients together)", ylabel="held-out accuracy",
           title="The demo against centralized LoRA on the same data and steps")
    ax.title.set_fontsize(9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    path = save_figure(fig, "demo_reference")
    plt.close(fig)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=1, help="Centralized runs with seeds 0 .. seeds-1 (the demo uses seed 0).")
    parser.add_argument("--eval-every", type=int, default=10, help="Evaluate the centralized run every this many rounds' worth of steps.")
    parser.add_argument("--no-demo", action="store_true", help="Only the centralized reference.")
    args = parser.parse_args()
    d = demo_defaults()
    runs = []
    for seed in range(args.seeds):
        runs.append(reference(d, seed, args.eval_every))
        r = runs[-1]
        print(f"centralized, seed {seed}: accuracy {r['final_accuracy']:.3f} macro-F1 {r['final_macro_f1']:.3f} "
              f"({r['seconds']:.0f} s)", flush=True)
    previous = json.loads((RESULTS / "demo_reference.json").read_text()) if (RESULTS / "demo_reference.json").exists() else {}
    federated = None if args.no_demo else demo(d)
    if federated is None and previous.get("demo_settings") == _settings(d):
        federated = previous.get("demo")
    write_json("demo_reference", {"demo_settings": _settings(d), "runs": runs, "demo": federated,
                                  "plots": [plot(runs, federated, d)]})


def _settings(d: dict) -> dict:
    return {k: v for k, v in d.items() if k not in ("output_dir", "progress")}


if __name__ == "__main__":
    main()
