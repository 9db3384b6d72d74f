"""`peft-federated` command line."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Optional

from peft_federated.strategies import STRATEGIES


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-federated", description="Federated LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Federated MiniLM on Twitter sentiment, simulated on this machine (the main job).")
    demo.add_argument("--output-dir", default="runs/sentiment", help="Where the store, results.json and metrics.png go.")
    demo.add_argument("--strategy", default="rolora", choices=sorted(STRATEGIES))
    demo.add_argument("--clients", type=int, default=10, help="Number of clients.")
    demo.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label-skew concentration (smaller = more skewed).")
    demo.add_argument("--rounds", type=int, default=8)
    demo.add_argument("--clients-per-round", type=int, default=5)
    demo.add_argument("--local-steps", type=int, default=12)
    demo.add_argument("--rank", type=int, default=8)
    demo.add_argument("--lr", type=float, default=2e-3)
    demo.add_argument("--train-examples", type=int, default=8000)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)

    if args.command == "demo":
        from peft_federated.demo import run_demo

        summary = run_demo(
            output_dir=args.output_dir, strategy=args.strategy, num_clients=args.clients, alpha=args.alpha,
            num_rounds=args.rounds, clients_per_round=args.clients_per_round, local_steps=args.local_steps,
            rank=args.rank, learning_rate=args.lr, train_examples=args.train_examples, seed=args.seed,
            progress=not args.no_progress,
        )
        print(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
