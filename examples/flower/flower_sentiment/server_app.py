"""The ServerApp: a peft-federated strategy as Flower's Strategy, every round published to a local store
and scored on the held-out tweets (accuracy, macro-F1). The head starts as a linear probe fitted on a
labelled seed set the ServerApp holds (`probe-examples`, kept apart from the clients' tweets)."""

from __future__ import annotations

import json

from flwr.app import Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from flwr.supercore import log
from transformers import DataCollatorWithPadding, Trainer, TrainingArguments

from peft_federated.demo import accuracy_and_f1, sorted_by_length, warm_start
from peft_federated.flower import FederatedLoraStrategy
from peft_federated.trainer.simulation import plot_history, write_results

from flower_sentiment import task

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    rc = context.run_config
    config = task.federation_config(rc)
    folder = task.store_dir(rc, context.run_id)
    strategy = FederatedLoraStrategy(config, store=folder / "store", seed=int(rc["seed"]),
                                     min_available_nodes=int(rc["min-available-nodes"]))
    log(20, "peft-federated: %s rounds are published to %s", config.strategy, folder / "store")

    model = task.peft_model(config, rc)
    _, test, tokenizer = task.tweets(rc)
    collator = DataCollatorWithPadding(tokenizer)
    head = warm_start(model, task.seed_set(rc)[0], collator)  # the head as a linear probe, in round 0
    if head is not None:
        log(20, "peft-federated: head fitted as a linear probe on %d tweets (train accuracy %.3f), frozen",
            head["examples"], head["train_accuracy"])
    evaluator = Trainer(model=model, args=TrainingArguments(output_dir=str(folder / "eval"), per_device_eval_batch_size=64,
                                                            report_to=[], use_cpu=True, disable_tqdm=True),
                        eval_dataset=sorted_by_length(test), compute_metrics=accuracy_and_f1, data_collator=collator)
    history: dict[int, dict] = {}

    def evaluate(server_round: int, arrays) -> MetricRecord:
        strategy.load_global(model)
        metrics = {k: float(v) for k, v in evaluator.evaluate().items() if isinstance(v, (int, float))}
        history[strategy.state.round] = {"round": strategy.state.round, "metrics": metrics}
        return MetricRecord(metrics)

    strategy.start(grid, strategy.initial_arrays(model), evaluate_fn=evaluate)
    rounds = [history[r] for r in sorted(history)]
    write_results(folder, config, rounds)
    plot_history(folder / "metrics.png", rounds, title=f"{config.strategy} on Flower: global model per round")
    final = rounds[-1]["metrics"]
    log(20, "peft-federated: after %d rounds accuracy %.3f (macro-F1 %.3f); before %.3f. Adapter: %s; results: %s",
        strategy.state.round, final["eval_accuracy"], final["eval_macro_f1"], rounds[0]["metrics"]["eval_accuracy"],
        strategy.store.round_path(strategy.state.round), json.dumps(str(folder / "results.json")))
