"""In-process simulation: K clients, one base model in memory, adapters swapped between clients.

Each round samples clients (seeded by round, so a resumed run samples the same ones), trains each
through the real `FederatedTrainer` loop, aggregates as updates arrive, evaluates the global model
on a held-out set and publishes the round to the store. A run killed mid-round resumes from the
last published round and ends with the same result.

Clients share one model object, but never what is personal: each client's round starts from its own
personal tensors (FedSA-LoRA's lora_B and head), which the trainer keeps in a folder per client
(`peft_federated.personal`), or from the shared model when it has none. With each client's own test
split (`client_eval_datasets`), every round also scores each client's personalized model on it.
"""

from __future__ import annotations

import functools
import json
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

from tqdm.auto import tqdm
from transformers import PrinterCallback, TrainingArguments

from peft_federated import privacy
from peft_federated.config import FederatedLoraConfig
from peft_federated.hub_integration.store import LocalStore, RoundStore, update_sha256
from peft_federated.personal import clear_personal, client_folder
from peft_federated.state import GlobalState
from peft_federated.trainer.trainer import FederatedTrainer


def sample_clients(client_ids: list[str], count: int, seed: int, round: int) -> list[str]:
    """The clients of a round: a seeded sample that depends only on (seed, round)."""
    rng = random.Random(f"{seed}/{round}")
    return sorted(rng.sample(sorted(client_ids), count))


def round_clients(config: FederatedLoraConfig, client_ids: list[str], seed: int, round: int) -> list[str]:
    """The clients of a round: `config.num_sampled` of them (`sample_clients`), or under DP each with
    probability q, from fresh randomness (`privacy.poisson_sample`: what the accountant assumes)."""
    if config.dp:
        return privacy.poisson_sample(config, client_ids, round)
    return sample_clients(client_ids, config.num_sampled(len(client_ids)), seed, round)


@dataclass
class SimulationResult:
    history: list[dict[str, Any]]
    store: RoundStore
    results_json: Optional[Path] = None
    plot: Optional[Path] = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def final_metrics(self) -> dict[str, float]:
        return self.history[-1].get("metrics", {})

    @property
    def final_client_metrics(self) -> dict[str, dict[str, float]]:
        """Each client's personalized metrics after the last round (with `client_eval_datasets`)."""
        return self.history[-1].get("client_eval", {})


def run_simulation(
    model,
    config: FederatedLoraConfig,
    client_datasets: dict[str, Any],
    args: TrainingArguments,
    store: RoundStore | str,
    eval_dataset=None,
    compute_metrics: Optional[Callable] = None,
    data_collator=None,
    processing_class=None,
    trainer_cls: type = FederatedTrainer,
    seed: int = 0,
    progress: bool = True,
    output_dir: Optional[str | Path] = None,
    stop_after_clients: Optional[int] = None,
    evaluate_fn: Optional[Callable[[Any], dict[str, float]]] = None,
    client_eval_datasets: Optional[dict[str, Any]] = None,
    eval_every: int = 1,
) -> SimulationResult:
    """Run (or resume) a federation of `client_datasets` on `model` (a PeftModel built from `config`);
    when it returns, `model` holds the final global round.

    Writes `results.json` and `metrics.png` to `output_dir` (default: the store's folder).
    `stop_after_clients` stops abruptly after that many client trainings (to test resuming).
    `evaluate_fn(model)`, if given, scores each round's global model instead of `trainer.evaluate()`.
    Trainers that tokenize their datasets when built (TRL's, e.g. `FederatedSFTTrainer`) get every
    client's dataset prepared the same way, once.

    `client_eval_datasets` (client id -> its own test split): after every round, `trainer.evaluate()`
    scores each of these clients' personalized model (`FederatedTrainer.personalized`: the global
    round with its personal tensors; for a strategy without any, the model it starts a round from) on
    its split. Each round's entry carries them as `client_eval` (client -> metrics) and, in `metrics`,
    their unweighted mean over clients and the worst client: `eval_personal_mean_<name>` and
    `eval_personal_worst_<name>` (the lowest value; the highest of a loss). Under DP these describe
    each client's own data: they are not published with the rounds, only returned and written to
    results.json (for the rounds this call ran).

    `eval_every`: evaluate (the global model and the clients' splits) at round 0, every `eval_every`
    rounds and at the last round (`num_rounds`, or the last the DP budget allows); the rounds between
    publish no metrics.

    Personal tensors live under `args.output_dir/personal/<client id>`; a federation that starts here
    (its store holds no round) removes those its clients had from an earlier one.
    """
    store = LocalStore(store) if isinstance(store, (str, Path)) else store
    if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
        raise ValueError(f"eval_every must be a positive integer (rounds between evaluations), got {eval_every!r}.")
    ids = sorted(client_datasets)
    if config.dp and config.dp_num_clients != len(ids):
        raise ValueError(f"dp_num_clients={config.dp_num_clients} but {len(ids)} client datasets were given: the privacy "
                         "accounting needs the federation's true number of clients.")
    trainer = trainer_cls(
        model=model,
        args=args,
        train_dataset=client_datasets[ids[0]],
        eval_dataset=eval_dataset,
        compute_metrics=compute_metrics,
        data_collator=data_collator,
        processing_class=processing_class,
        federated_config=config,
        client_id=ids[0],
    )
    client_datasets = {cid: _prepared(trainer, ds, i) for i, (cid, ds) in enumerate(sorted(client_datasets.items()))}
    client_eval = {cid: _prepared(trainer, ds, 1, "eval") for cid, ds in sorted((client_eval_datasets or {}).items())}
    if unknown := sorted(set(client_eval) - set(ids)):
        raise ValueError(f"client_eval_datasets names clients without training data: {unknown[:5]}; its keys must be "
                         "client ids of client_datasets.")
    strategy = trainer.strategy
    trainer.remove_callback(PrinterCallback)  # the round/client progress bar reports instead

    plan = privacy.PrivacyPlan.of(config) if config.dp else None

    @functools.lru_cache(maxsize=None)  # asked by the loop and by each round's evaluation: account once per count
    def budget_spent(rounds: int) -> Optional[str]:
        """Why publishing `rounds` rounds would spend more than the DP budget; None if it would not."""
        if plan is not None:
            try:
                plan.check_budget(rounds)
            except privacy.PrivacyBudgetSpentError as err:
                return str(err)
        return None

    def evaluated(state: GlobalState) -> bool:
        """Round 0, every `eval_every`-th and the last: the configured one or the one the DP budget ends at."""
        last = state.round == config.num_rounds or budget_spent(state.round + 1) is not None
        return state.round % eval_every == 0 or last

    def evaluate(state: GlobalState) -> dict[str, float]:
        if (eval_dataset is None and evaluate_fn is None) or not evaluated(state):
            return {}
        strategy.prepare_client(model, state, "global").close()  # load the global model
        metrics = evaluate_fn(model) if evaluate_fn is not None else trainer.evaluate()
        return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}

    def evaluate_clients(state: GlobalState) -> dict[str, dict[str, float]]:
        """Each client's personalized model on its own test split."""
        out = {}
        for cid, dataset in client_eval.items():
            with trainer.personalized(state, cid):
                metrics = trainer.evaluate(eval_dataset=dataset)
            out[cid] = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}
        return out

    kept_local: dict[int, dict] = {}  # under DP: the per-client evaluations, kept out of the published rounds

    def publish(state: GlobalState, metadata: dict) -> dict[str, float]:
        """Publish the round, with the clients' personalized evaluations; the round's metrics."""
        metrics = metadata["metrics"]
        if client_eval and evaluated(state):
            per_client = evaluate_clients(state)
            metrics = {**metrics, **summarize_clients(per_client)}
            if config.dp:
                kept_local[state.round] = {"client_eval": per_client, "metrics": metrics}
            else:
                metadata = {**metadata, "client_eval": per_client, "metrics": metrics}
        store.publish_round(state, config, privacy.published_metadata(config, state.round, metadata, participation_public=False))
        return metrics

    if store.latest_round() is None:
        if strategy.personalized:  # a new federation: no client has personal tensors yet
            for cid in ids:
                clear_personal(client_folder(trainer.personal_dir, cid))
        state = strategy.initial_state(model)
        publish(state, {"metrics": evaluate(state), "contributions": []})
    state, _ = store.read_round()
    per_round = config.num_sampled(len(ids))
    todo = config.num_rounds - state.round
    bar = tqdm(total=todo * per_round, desc=f"{config.strategy} rounds", disable=not progress or todo <= 0)
    trained = 0
    for rnd in range(state.round, config.num_rounds):
        if (spent := budget_spent(rnd + 1)) is not None:
            bar.write(spent)
            break
        aggregator = strategy.aggregator(state)
        contributions = []
        for client_id in round_clients(config, ids, seed, rnd):
            if stop_after_clients is not None and trained >= stop_after_clients:
                bar.close()
                raise KeyboardInterrupt(f"stopped after {trained} client trainings (stop_after_clients)")
            trainer.client_id, trainer.train_dataset = client_id, client_datasets[client_id]
            payload, num_samples, metrics = trainer.train_round(state)
            aggregator.accept(payload, num_samples, client_id)
            contributions.append(
                {"client_id": client_id, "num_samples": num_samples, "sha256": update_sha256(payload), "metrics": metrics,
                 "norm": aggregator.clients[client_id]["norm"]}
            )
            trained += 1
            bar.update(1)
            bar.set_postfix(round=rnd, client=client_id, loss=f"{metrics.get('train_loss', float('nan')):.3f}")
        state = aggregator.result()
        metrics = publish(state, {"metrics": evaluate(state), "contributions": contributions})
        shown = {k: round(v, 4) for k, v in metrics.items() if k.startswith("eval_") and not _timing(k)}
        if shown or eval_every == 1:
            bar.write(f"round {state.round}/{config.num_rounds}: {shown}")
    bar.close()
    strategy.prepare_client(model, state, "global").close()  # the model given holds the final global round
    history = store.history()
    for h in history:  # under DP: this call's per-client evaluations, beside (not in) the published rounds
        if (local := kept_local.get(h.get("round"))) is not None:
            h["client_eval"], h["metrics"] = local["client_eval"], {**h.get("metrics", {}), **local["metrics"]}
    out = Path(output_dir) if output_dir is not None else getattr(store, "root", Path("."))
    result = SimulationResult(history=history, store=store)
    result.results_json = write_results(out, config, history)
    result.plot = plot_history(out / "metrics.png", history, title=f"{config.strategy}: global model per round")
    return result


def _prepared(trainer, dataset, index: int, split: str = "train"):
    """`dataset` as the trainer would have prepared it at construction (the first training set already is)."""
    prepare = getattr(trainer, "_prepare_dataset", None)  # TRL's SFTTrainer: chat template, tokenize, labels
    if index == 0 or prepare is None or getattr(trainer, "_skip_prepare_dataset", False):
        return trainer.train_dataset if index == 0 else dataset
    packing = trainer.args.packing
    if split == "eval" and getattr(trainer.args, "eval_packing", None) is not None:
        packing = trainer.args.eval_packing
    return prepare(dataset, trainer.processing_class, trainer.args, packing, getattr(trainer, "_formatting_func", None), split)


def _timing(name: str) -> bool:
    """Whether a metric measures time or speed, not quality."""
    return any(s in name for s in ("runtime", "per_second", "_time"))


def summarize_clients(per_client: dict[str, dict[str, float]], prefix: str = "eval_") -> dict[str, float]:
    """`eval_personal_mean_<name>`: the unweighted mean over clients of each `eval_<name>` metric (as the
    FedSA-LoRA paper reports), and `eval_personal_worst_<name>`: the worst client's (the lowest value,
    the highest of a loss)."""
    names = sorted({k for m in per_client.values() for k in m if k.startswith(prefix) and not _timing(k)})
    out = {}
    for name in names:
        values = [m[name] for m in per_client.values() if name in m]
        base = name.removeprefix(prefix)
        out[f"{prefix}personal_mean_{base}"] = math.fsum(values) / len(values)
        out[f"{prefix}personal_worst_{base}"] = max(values) if "loss" in base else min(values)
    return out


def write_results(folder: Path, config: FederatedLoraConfig, history: list[dict[str, Any]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "results.json"
    path.write_text(json.dumps({"config": config.federation_dict(), "rounds": history}, indent=2, default=str))
    return path


def plot_history(path: Path, history: list[dict[str, Any]], title: str, metric_prefix: str = "eval_") -> Optional[Path]:
    """A PNG of each evaluation metric per round (accuracy-like metrics; loss on its own axis)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    names = sorted({k for h in history for k in h.get("metrics", {}) if k.startswith(metric_prefix)
                    and not any(s in k for s in ("runtime", "per_second", "_time", "loss"))})
    if not names:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    for name in names:
        points = [(h["round"], h["metrics"][name]) for h in history if name in h.get("metrics", {})]
        ax.plot(*zip(*points), marker="o", label=name.removeprefix(metric_prefix))
    ax.set_xlabel("round")
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
