"""A small MLP pretrained on part of scikit-learn's digits, then LoRA fine-tuned federatedly.

The MLP (64 -> 96 -> 48 -> 10) is pretrained on the digits 0-4 only; the federation then fine-tunes
it with LoRA on fc1 and fc2 (the output layer (head) trained in full and averaged) to all ten digits, over
10 clients with Dirichlet label skew. Every method gets the same rounds, clients per round and local
steps; accuracy on the held-out digits per round, over several seeds.

    .venv/bin/python benchmarks/digits.py            # about 2 minutes on the 2-core CPU
    .venv/bin/python benchmarks/digits.py --quick    # a smoke run
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pyplot, save_figure, write_json  # noqa: E402

METHODS = ["fedit", "ffa", "rolora", "hetlora", "lora_fair", "flora", "fedex"]


class MLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(64, 96), nn.Linear(96, 48), nn.Linear(48, 10)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
        logits = self.head(torch.relu(self.fc2(torch.relu(self.fc1(x)))))
        loss = nn.functional.cross_entropy(logits, labels) if labels is not None else None
        return {"loss": loss, "logits": logits}


def digits(seed: int):
    """(train, test) `datasets.Dataset`s of 8x8 digits scaled to [0, 1], stratified and seeded."""
    from datasets import ClassLabel, Dataset
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x_tr, x_te, y_tr, y_te = train_test_split(data.data / 16.0, data.target, test_size=0.25, random_state=seed,
                                              stratify=data.target)

    def build(x, y):
        ds = Dataset.from_dict({"x": x.astype(np.float32).tolist(), "labels": y.tolist()})
        return ds.cast_column("labels", ClassLabel(num_classes=10))

    return build(x_tr, y_tr), build(x_te, y_te)


def pretrained_mlp(train, seed: int, steps: int = 400) -> MLP:
    """The MLP trained in full on the digits 0-4 of the training split."""
    torch.manual_seed(seed)
    model = MLP()
    part = train.filter(lambda row: row["labels"] < 5).with_format("torch")[:]
    x, y = part["x"], part["labels"]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(y), (64,), generator=g)
        opt.zero_grad()
        model(x[idx], y[idx])["loss"].backward()
        opt.step()
    return model


def accuracy(eval_pred) -> dict[str, float]:
    logits, labels = eval_pred
    return {"accuracy": float((np.argmax(logits, -1) == labels).mean())}


def run(method: str, seed: int, args, train, test, pretrained: dict) -> list[float]:
    from peft import get_peft_model
    from transformers import TrainingArguments

    from peft_federated import FederatedLoraConfig
    from peft_federated.data import dirichlet_partition
    from peft_federated.trainer import run_simulation

    parts = dirichlet_partition(train, args.clients, alpha=args.alpha, label_column="labels", seed=seed)
    clients = {f"client-{k:02d}": ds for k, ds in enumerate(parts)}
    ranks = {c: [1, 2, args.rank][i % 3] for i, c in enumerate(sorted(clients))} if method == "hetlora" else None
    config = FederatedLoraConfig(
        strategy=method, r=args.rank, lora_alpha=2 * args.rank, target_modules=["fc1", "fc2"], modules_to_save=["head"],
        num_rounds=args.rounds, clients_per_round=args.clients_per_round, local_steps=args.local_steps, client_ranks=ranks,
    )
    base = MLP()
    base.load_state_dict(pretrained)
    model = get_peft_model(base, config.to_lora_config())
    with tempfile.TemporaryDirectory() as tmp:
        targs = TrainingArguments(
            output_dir=tmp, per_device_train_batch_size=32, per_device_eval_batch_size=256, learning_rate=args.lr,
            lr_scheduler_type="cosine", report_to=[], save_strategy="no", logging_strategy="no", disable_tqdm=True,
            use_cpu=True, seed=seed,
        )
        result = run_simulation(model, config, clients, targs, Path(tmp) / "store", eval_dataset=test,
                                compute_metrics=accuracy, seed=seed, progress=False, output_dir=tmp)
    return [h["metrics"]["eval_accuracy"] for h in result.history]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=10)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--local-steps", type=int, default=10)
    parser.add_argument("--rank", type=int, default=4)
    parser.add_argument("--alpha", type=float, default=0.1)
    parser.add_argument("--lr", type=float, default=5e-3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.rounds, args.seeds = 3, 1

    curves: dict[str, list[list[float]]] = {m: [] for m in METHODS}
    pretrained_accuracy = []
    for seed in range(args.seeds):
        train, test = digits(seed)
        mlp = pretrained_mlp(train, seed)
        with torch.no_grad():
            t = test.with_format("torch")[:]
            pretrained_accuracy.append(float((mlp(t["x"])["logits"].argmax(-1) == t["labels"]).float().mean()))
        for method in METHODS:
            start = time.time()
            curves[method].append(run(method, seed, args, train, test, mlp.state_dict()))
            print(f"seed {seed} {method}: accuracy {curves[method][-1][-1]:.3f} ({time.time() - start:.0f} s)", flush=True)

    finals = {m: [c[-1] for c in cs] for m, cs in curves.items()}
    summary = [{"method": m, "seeds": len(v), "accuracy_mean": statistics.fmean(v),
                "accuracy_std": statistics.stdev(v) if len(v) > 1 else None} for m, v in finals.items()]
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for m, cs in curves.items():
        ax.plot(np.mean(cs, axis=0), marker=".", label=m)
    ax.set_xlabel("round")
    ax.set_ylabel(f"test accuracy (mean of {args.seeds} seeds)")
    ax.set_title(f"digits MLP, LoRA r={args.rank}, {args.clients} clients, Dirichlet alpha={args.alpha}", fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    plot = save_figure(fig, "digits")
    write_json("digits", {
        "settings": {k: v for k, v in vars(args).items()},
        "pretrained_on_0_4_accuracy_all_digits": pretrained_accuracy,
        "curves": curves, "summary": summary, "plots": [str(plot)],
    })


if __name__ == "__main__":
    main()
