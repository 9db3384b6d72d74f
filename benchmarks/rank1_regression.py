"""Federated rank-1 linear regression: why RoLoRA trains both factors (the RoLoRA paper's linear analysis).

Client i's data is x ~ N(0, I_d) with targets y = b_i* (a*^T x) + noise: one shared down-projection
a* (d) and a heterogeneous head b_i* = mu + h xi_i (m outputs). The model is a rank-1 LoRA
y = b (a^T x): a is PEFT's lora_A (1 x d), b its lora_B (m x 1). Every round each client starts from
the global (a, b), takes `local_steps` gradient steps of rate `lr` on its squared error, and the
server averages what was trained (uniform weights):

- RoLoRA: even rounds train b with a frozen, odd rounds train a with b frozen (the library's phases);
- FFA-LoRA: a frozen at its random start, b trained every round;
- FedIT: a and b both trained, averaged separately.

Two settings: the population loss (the expectation over x, 1/2 ||a b^T - a* b_i*^T||_F^2, as in the
analysis) and `--samples` fixed samples per client. With finite samples the minimiser of the
federated loss is itself off a* (heterogeneous heads meet sample covariances that are not I), so
every method's angle stops at that statistical floor.

Curves: sin(angle(a, a*)), the relative error ||a b^T - a* mean(b_i*)^T||_F / ||a* mean(b_i*)^T||_F of
the global model and the federated loss (mean of the clients' losses) per round, median over seeds. Expected: RoLoRA's angle falls exponentially; FFA's
stays at its initial value (about 1 for a random start in high dimension), a floor on the error.

    .venv/bin/python benchmarks/rank1_regression.py [--rounds 150] [--seeds 5]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import pyplot, save_figure, write_json  # noqa: E402

METHODS = ("rolora", "ffa", "fedit")


def make_clients(d: int, m: int, clients: int, n: int, heterogeneity: float, noise: float, gen: torch.Generator):
    """Per client (X_i, Y_i, b_i*) (X_i = Y_i = None for the population loss), and the shared a* (unit norm)."""
    a_star = torch.randn(d, generator=gen, dtype=torch.float64)
    a_star /= a_star.norm()
    mu = torch.randn(m, generator=gen, dtype=torch.float64)
    mu /= mu.norm()
    heads = mu + heterogeneity * torch.randn(clients, m, generator=gen, dtype=torch.float64) / m**0.5
    data = []
    for b_i in heads:
        X = Y = None
        if n:
            X = torch.randn(n, d, generator=gen, dtype=torch.float64)
            Y = torch.outer(X @ a_star, b_i) + noise * torch.randn(n, m, generator=gen, dtype=torch.float64)
        data.append((X, Y, b_i))
    return data, a_star, heads


def gradients(client, a_star, a, b):
    """Gradients in a and b of client i's loss: 1/(2n) ||Y - (X a) b^T||_F^2, or its expectation over x."""
    X, Y, b_i = client
    if X is None:
        R = torch.outer(a, b) - torch.outer(a_star, b_i)  # E[x x^T] = I
        return R @ b, R.T @ a
    z = X @ a
    residual = torch.outer(z, b) - Y
    return X.T @ (residual @ b) / X.shape[0], residual.T @ z / X.shape[0]


def client_loss(client, a_star, a, b) -> float:
    X, Y, b_i = client
    if X is None:
        return float(torch.linalg.norm(torch.outer(a, b) - torch.outer(a_star, b_i)) ** 2 / 2)
    return float(torch.linalg.norm(torch.outer(X @ a, b) - Y) ** 2 / (2 * X.shape[0]))


def local_round(client, a_star, a, b, train_a: bool, train_b: bool, steps: int, lr: float):
    """`steps` gradient steps on the client's loss from the global (a, b)."""
    a, b = a.clone(), b.clone()
    for _ in range(steps):
        grad_a, grad_b = gradients(client, a_star, a, b)
        if train_a:
            a -= lr * grad_a
        if train_b:
            b -= lr * grad_b
    return a, b


def run(method: str, data, a_star, heads, rounds: int, steps: int, lr: float, gen: torch.Generator) -> dict[str, list[float]]:
    d, m = a_star.shape[0], heads.shape[1]
    a = torch.randn(d, generator=gen, dtype=torch.float64)
    a /= a.norm()  # the shared random lora_A; lora_B starts at 0, as in LoRA
    b = torch.zeros(m, dtype=torch.float64)
    target = torch.outer(a_star, heads.mean(0))
    sin, error, loss = [], [], []
    for rnd in range(rounds + 1):
        sin.append(float(torch.linalg.norm(a - (a @ a_star) * a_star) / torch.linalg.norm(a)))  # |a*| = 1
        error.append(float(torch.linalg.norm(torch.outer(a, b) - target) / torch.linalg.norm(target)))
        loss.append(sum(client_loss(client, a_star, a, b) for client in data) / len(data))
        if rnd == rounds:
            break
        train_a = {"rolora": rnd % 2 == 1, "ffa": False, "fedit": True}[method]
        train_b = {"rolora": rnd % 2 == 0, "ffa": True, "fedit": True}[method]
        updates = [local_round(client, a_star, a, b, train_a, train_b, steps, lr) for client in data]
        a = torch.stack([u[0] for u in updates]).mean(0)
        b = torch.stack([u[1] for u in updates]).mean(0)
    return {"sin_angle": sin, "relative_error": error, "federated_loss": loss}


def median(curves: list[list[float]]) -> list[float]:
    return torch.tensor(curves).median(0).values.tolist()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--d", type=int, default=100, help="input dimension")
    parser.add_argument("--m", type=int, default=20, help="output dimension")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--samples", type=int, default=200, help="samples per client in the finite-sample setting")
    parser.add_argument("--heterogeneity", type=float, default=1.0, help="h in b_i* = mu + h xi_i (|mu| = 1)")
    parser.add_argument("--noise", type=float, default=1e-3)
    parser.add_argument("--rounds", type=int, default=150)
    parser.add_argument("--local-steps", type=int, default=5)
    parser.add_argument("--lr", type=float, default=0.2)
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--name", default="rank1_regression")
    args = parser.parse_args()

    settings = {}
    for label, samples in (("population loss", 0), (f"{args.samples} samples per client", args.samples)):
        curves = {method: {"sin_angle": [], "relative_error": [], "federated_loss": []} for method in METHODS}
        for seed in range(args.seeds):
            gen = torch.Generator().manual_seed(seed)
            data, a_star, heads = make_clients(args.d, args.m, args.clients, samples, args.heterogeneity, args.noise, gen)
            init_state = gen.get_state()
            for method in METHODS:
                gen.set_state(init_state)  # the same random lora_A start for every method
                out = run(method, data, a_star, heads, args.rounds, args.local_steps, args.lr, gen)
                for key, values in out.items():
                    curves[method][key].append(values)
        results = {}
        for method, c in curves.items():
            sin, err, loss = median(c["sin_angle"]), median(c["relative_error"]), median(c["federated_loss"])
            results[method] = {
                "sin_angle_median": sin,
                "relative_error_median": err,
                "federated_loss_median": loss,
                "final_federated_loss": loss[-1],
                "final_sin_angle": sin[-1],
                "final_relative_error": err[-1],
                "first_round_sin_below_1e-3": next((r for r, v in enumerate(sin) if v < 1e-3), None),
            }
            print(f"{label:28s} {method:7s} sin(angle) {sin[0]:.3f} -> {sin[-1]:.2e}   relative error {err[0]:.3f} -> {err[-1]:.2e}")
        settings[label] = {"samples_per_client": samples or None, "methods": results}
    write_json(args.name, {
        "description": "Federated rank-1 linear regression y = b_i* (a*^T x) + noise with heterogeneous heads; "
                       "sin(angle(a, a*)) and relative error of the global model per round (median over seeds).",
        "setting": {k: v for k, v in vars(args).items() if k != "name"},
        "settings": settings,
    })
    plot(settings, args)


def plot(settings: dict, args) -> None:
    plt = pyplot()
    fig, axes = plt.subplots(len(settings), 2, figsize=(11, 4 * len(settings)), squeeze=False)
    for row, (label, setting) in zip(axes, settings.items()):
        for method, res in setting["methods"].items():
            row[0].semilogy(res["sin_angle_median"], label=method)
            row[1].semilogy(res["relative_error_median"], label=method)
        row[0].set_ylabel("sin(angle(a, a*))")
        row[1].set_ylabel("||a b^T - a* mean(b_i*)^T|| / ||a* mean(b_i*)^T||")
        for ax in row:
            ax.set_title(label)
            ax.set_xlabel("round")
            ax.grid(alpha=0.3, which="both")
            ax.legend()
    fig.suptitle(f"rank-1 federated regression: d={args.d}, m={args.m}, {args.clients} clients, h={args.heterogeneity}, "
                 f"{args.local_steps} local steps of rate {args.lr} (median of {args.seeds} seeds)")
    save_figure(fig, args.name)


if __name__ == "__main__":
    main()
