"""`peft-federated` command line."""

from __future__ import annotations

import argparse
import inspect
import json
import logging
import os
import sys
from typing import Optional

from peft_federated.demo import run_demo
from peft_federated.strategies import STRATEGIES


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="peft-federated", description="Federated LoRA fine-tuning.")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="Federated MiniLM on Twitter sentiment, simulated on this machine (the main job).",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    d = {name: p.default for name, p in inspect.signature(run_demo).parameters.items()}  # one set of defaults
    demo.add_argument("--output-dir", default=d["output_dir"], help="Where the store, results.json and metrics.png go.")
    demo.add_argument("--strategy", default=d["strategy"], choices=sorted(STRATEGIES), help="Aggregation strategy.")
    demo.add_argument("--clients", type=int, default=d["num_clients"], help="Number of clients.")
    demo.add_argument("--alpha", type=float, default=d["alpha"], help="Dirichlet label-skew concentration (smaller = more skewed).")
    demo.add_argument("--rounds", type=int, default=d["num_rounds"], help="Federated rounds.")
    demo.add_argument("--clients-per-round", type=int, default=d["clients_per_round"], help="Clients sampled each round.")
    demo.add_argument("--local-steps", type=int, default=d["local_steps"], help="Optimizer steps per client and round.")
    demo.add_argument("--rank", type=int, default=d["rank"], help="LoRA rank on query and value.")
    demo.add_argument("--lr", type=float, default=d["learning_rate"], help="Clients' AdamW learning rate, cosine over the federation.")
    demo.add_argument("--train-examples", type=int, default=d["train_examples"], help="Tweets to train on (spread over the clients).")
    demo.add_argument("--eval-examples", type=int, default=d["eval_examples"], help="Held-out tweets evaluated after every round.")
    demo.add_argument("--probe-examples", type=int, default=d["probe_examples"],
                      help="Labelled tweets kept at the aggregator to fit the head as a linear probe before round 0 (0: a fresh head).")
    demo.add_argument("--logit-adjustment", type=float, default=d["logit_adjustment"], metavar="TAU",
                      help="Clients train on logits + TAU * log(their own label frequencies) (label skew); 0 turns it off.")
    demo.add_argument("--eval-every", type=int, default=d["eval_every"], help="Evaluate the global model every this many rounds (and the last).")
    demo.add_argument("--train-head", action="store_true", help="Let the clients train the probe head too (default: frozen).")
    demo.add_argument("--seed", type=int, default=d["seed"], help="Seeds the data split, partition, client sampling and training.")
    demo.add_argument("--no-progress", action="store_true", help="No progress bar (round results still print).")
    _add_role_parsers(sub)
    args = parser.parse_args(argv)

    if args.command == "demo":
        summary = run_demo(
            output_dir=args.output_dir, strategy=args.strategy, num_clients=args.clients, alpha=args.alpha,
            num_rounds=args.rounds, clients_per_round=args.clients_per_round, local_steps=args.local_steps,
            rank=args.rank, learning_rate=args.lr, train_examples=args.train_examples,
            eval_examples=args.eval_examples, probe_examples=args.probe_examples, freeze_head=not args.train_head,
            logit_adjustment=args.logit_adjustment or None, eval_every=args.eval_every,
            seed=args.seed, progress=not args.no_progress,
        )
        print(json.dumps(summary, indent=2))
    elif args.command in ("aggregate", "client"):
        return _run_role(parser, args)
    return 0


def _add_role_parsers(sub) -> None:
    """`aggregate` and `client`: the two roles of a real federation, as separate processes (see roles.py)."""
    where = argparse.ArgumentParser(add_help=False)
    place = where.add_mutually_exclusive_group(required=True)
    place.add_argument("--repo", help="The federation's global Hub repo, e.g. my-org/my-federation.")
    place.add_argument("--local-dir", help="A local folder store instead of the Hub (all parties on one file system).")
    where.add_argument("--token", default=None, help="Hub token (default: HF_TOKEN or the saved `hf auth login`).")
    where.add_argument("--endpoint", default=None, help="Hub URL (default: HF_ENDPOINT or https://huggingface.co).")
    where.add_argument("--poll-interval", type=float, default=2.0, help="Seconds between looks at the store.")
    where.add_argument("--retry-timeout", type=float, default=120.0, help="Seconds to keep retrying transient Hub errors.")

    agg = sub.add_parser("aggregate", parents=[where], help="The aggregator: publish round 0 from the base model, then aggregate every round.",
                         description="Define the federation, publish round 0 and aggregate each round as the clients' updates arrive.")
    agg.add_argument("--clients", required=True, help="Comma-separated ids of the federation's clients, e.g. a,b,c.")
    agg.add_argument("--client-repo", action="append", default=[], metavar="ID=NAMESPACE/REPO",
                     help="A client's updates repo (repeatable; default: <repo>-updates-<client id>).")
    agg.add_argument("--model", required=True, help="Base model folder or Hub id: only its config.json is read (and a "
                     "modules_to_save head's tensors, if the checkpoint has them); no base weight is loaded.")
    agg.add_argument("--base-model-id", default=None, help="Name recorded as the base model (default: --model); clients load it unless given --model.")
    agg.add_argument("--num-labels", type=int, default=None, help="Classification head size (default: the model config's).")
    agg.add_argument("--task-type", default="SEQ_CLS", help="PEFT task type: SEQ_CLS, CAUSAL_LM, TOKEN_CLS, SEQ_2_SEQ_LM, ...")
    agg.add_argument("--strategy", default="rolora", choices=sorted(STRATEGIES))
    agg.add_argument("--rounds", type=int, default=10)
    agg.add_argument("--rank", type=int, default=8)
    agg.add_argument("--lora-alpha", type=float, default=None, help="Default: 2 * rank.")
    agg.add_argument("--lora-dropout", type=float, default=0.0)
    agg.add_argument("--target-modules", required=True, help="Comma-separated module names, e.g. query,value.")
    agg.add_argument("--local-steps", type=int, default=10, help="Optimizer steps each client takes per round.")
    agg.add_argument("--weighting", default="samples", choices=["samples", "uniform"])
    agg.add_argument("--logit-adjustment", type=float, default=None, metavar="TAU",
                     help="Classification under label skew: clients train on logits + TAU * log(their own label frequencies).")
    agg.add_argument("--init-seed", type=int, default=0)
    agg.add_argument("--client-rank", action="append", default=[], metavar="ID=RANK", help="hetlora/flora: a client's rank (repeatable).")
    agg.add_argument("--quorum", type=int, default=None, help="Updates that close a round (default: every client).")
    agg.add_argument("--deadline", type=float, default=600.0, help="Seconds after which a round closes with --min-clients updates.")
    agg.add_argument("--min-clients", type=int, default=1)
    agg.add_argument("--max-update-norm", type=float, default=None, help="Refuse (or with --clip-updates, clip) an update whose change has a larger L2 norm.")
    agg.add_argument("--clip-updates", action="store_true", help="Clip updates above --max-update-norm instead of refusing them.")
    agg.add_argument("--norm-outlier-factor", type=float, default=None, help="Refuse an update whose change-norm exceeds this many times the round's median (3+ updates).")
    agg.add_argument("--max-update-bytes", type=int, default=1 << 30, help="Largest update file read; larger ones are refused unread.")
    agg.add_argument("--max-update-json-bytes", type=int, default=64 * 1024, help="Largest update.json read; larger ones are refused unread.")
    agg.add_argument("--max-num-samples", type=int, default=10_000_000, help="Refuse an update claiming more training examples (its weight).")
    agg.add_argument("--max-client-share", type=float, default=None, help="Cap each client's share of a round's weight, in (0, 1] (samples weighting).")
    dp = agg.add_argument_group("differential privacy", "Client-level DP-FedAvg: every registered client in every round "
                                "(N = the number of --clients), --weighting uniform. See the README's Differential privacy.")
    dp.add_argument("--dp-noise-multiplier", type=float, default=None, help="sigma: noise std over the clip norm (default: chosen for --dp-target-epsilon).")
    dp.add_argument("--dp-clip-norm", type=float, default=None, help="C: the L2 norm each client's change is clipped to.")
    dp.add_argument("--dp-target-epsilon", type=float, default=None, help="The privacy budget; no round is published past it.")
    dp.add_argument("--dp-delta", type=float, default=1e-5)
    dp.add_argument("--dp-mode", default="central", choices=["central", "client"], help="Who adds the noise.")
    dp.add_argument("--dp-accountant", default="rdp", choices=["rdp", "pld"])

    client = sub.add_parser(
        "client", parents=[where], help="A client: train each round on local data and submit the update.",
        description="Take part in a federation: the federation's config comes from its round 0. DATA is a folder "
        "saved with datasets' save_to_disk (a DatasetDict: its 'train' split) or a .json/.jsonl/.csv file. "
        "Classification federations (SEQ_CLS, ...): tokenized columns (input_ids, attention_mask, label) used as "
        "they are, or a text column tokenized with the base model's tokenizer, plus a label column. Language-model "
        "federations (CAUSAL_LM) train with TRL's SFTTrainer on a 'text' column, 'prompt' and 'completion' columns "
        "(the loss on the completion only), a 'messages' column of chat turns (the tokenizer's chat template), or "
        "tokenized input_ids; the format is read off the columns, or named with the --*-column options.",
    )
    client.add_argument("--client-id", required=True)
    client.add_argument("--update-repo", default=None, help="Hub repo this client writes its updates to (default: <repo>-updates-<client id>).")
    client.add_argument("--data", required=True, help="Training data (see above).")
    client.add_argument("--model", default=None, help="Base model folder or Hub id (default: the one the federation names).")
    client.add_argument("--num-labels", type=int, default=None, help="Classification head size (default: the model config's).")
    client.add_argument("--text-column", default=None, help="Column of plain text (default: 'text').")
    client.add_argument("--label-column", default="label", help="Classification: the label column.")
    client.add_argument("--messages-column", default=None, help="CAUSAL_LM: column of chat turns (default: 'messages').")
    client.add_argument("--prompt-column", default=None, help="CAUSAL_LM: column of prompts (default: 'prompt').")
    client.add_argument("--completion-column", default=None, help="CAUSAL_LM: column of completions (default: 'completion').")
    client.add_argument("--chat-template", default=None, metavar="FILE", help="CAUSAL_LM: a Jinja chat template for messages data (default: the tokenizer's).")
    client.add_argument("--max-length", type=int, default=None,
                        help="Tokens per sequence; longer ones are truncated (default: 1024 for CAUSAL_LM, as TRL; 128 otherwise).")
    client.add_argument("--packing", action="store_true", help="CAUSAL_LM: pack sequences into rows of --max-length tokens (TRL's packing).")
    client.add_argument("--batch-size", type=int, default=8)
    client.add_argument("--gradient-accumulation-steps", type=int, default=1, help="Micro-batches per optimizer step.")
    client.add_argument("--gradient-checkpointing", action="store_true", help="Recompute activations in the backward pass (less memory).")
    precision = client.add_mutually_exclusive_group()
    precision.add_argument("--bf16", action="store_true", help="bfloat16 mixed precision (a GPU of compute capability 8.0+, or the CPU).")
    precision.add_argument("--fp16", action="store_true", help="float16 mixed precision (a CUDA GPU).")
    client.add_argument("--load-in-4bit", action="store_true", help="Quantize the frozen base to 4-bit (bitsandbytes; NF4 unless --bnb-4bit-quant-type).")
    client.add_argument("--load-in-8bit", action="store_true", help="Quantize the frozen base to 8-bit (bitsandbytes).")
    client.add_argument("--bnb-4bit-use-double-quant", action="store_true", help="4-bit: quantize the quantization constants too (~0.4 bit/parameter less).")
    client.add_argument("--bnb-4bit-compute-dtype", default=None, choices=["float32", "bfloat16", "float16"],
                        help="4-bit: dtype the layers compute in (default: bfloat16 on a GPU that has it, else float32).")
    client.add_argument("--bnb-4bit-quant-type", default="nf4", choices=["nf4", "fp4"], help="4-bit: the data type.")
    client.add_argument("--lr", type=float, default=5e-4)
    client.add_argument("--seed", type=int, default=0)
    client.add_argument("--output-dir", default=None, help="Trainer output folder (default: ./peft-federated-<client id>).")
    client.add_argument("--personal-dir", default=None, help="fedsa: where this client keeps its personal tensors (lora_B, "
                        "the head), never uploaded and read back on restart (default: <output dir>/personal).")
    client.add_argument("--round-timeout", type=float, default=3600.0, help="Seconds to wait for each global round.")


def _pairs(parser: argparse.ArgumentParser, items: list[str], what: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key or not value:
            parser.error(f"{what} must look like ID=VALUE, got {item!r}")
        out[key] = value
    return out


def _run_role(parser: argparse.ArgumentParser, args: argparse.Namespace) -> int:
    from peft_federated import roles
    from peft_federated.config import FederatedLoraConfig

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    logging.getLogger("peft_federated").setLevel(logging.INFO)
    token = args.token or os.environ.get("HF_TOKEN") or None
    if args.command == "aggregate":
        clients = [c.strip() for c in args.clients.split(",") if c.strip()]
        repos = _pairs(parser, args.client_repo, "--client-repo")
        store = roles.open_store(args.repo, args.local_dir, clients, repos, token, args.endpoint, args.retry_timeout)
        config = FederatedLoraConfig(
            strategy=args.strategy, num_rounds=args.rounds, r=args.rank, lora_alpha=2 * args.rank if args.lora_alpha is None else args.lora_alpha,
            lora_dropout=args.lora_dropout, target_modules=[m.strip() for m in args.target_modules.split(",")],
            task_type=args.task_type, local_steps=args.local_steps, weighting=args.weighting, init_seed=args.init_seed,
            logit_adjustment=args.logit_adjustment,
            client_ranks={k: int(v) for k, v in _pairs(parser, args.client_rank, "--client-rank").items()} or None,
            base_model_name_or_path=args.base_model_id or args.model, max_update_norm=args.max_update_norm,
            clip_updates=args.clip_updates, norm_outlier_factor=args.norm_outlier_factor, max_update_bytes=args.max_update_bytes,
            max_update_json_bytes=args.max_update_json_bytes, max_num_samples=args.max_num_samples,
            max_client_share=args.max_client_share, dp_noise_multiplier=args.dp_noise_multiplier, dp_clip_norm=args.dp_clip_norm,
            dp_target_epsilon=args.dp_target_epsilon, dp_delta=args.dp_delta, dp_mode=args.dp_mode,
            dp_accountant=args.dp_accountant,
            dp_num_clients=len(set(clients)) if args.dp_noise_multiplier is not None or args.dp_target_epsilon is not None else None,
        )
        from peft_federated.privacy import PrivacyBudgetSpentError

        try:
            history = roles.run_aggregator(
                store, config, args.model, clients, num_labels=args.num_labels, quorum=args.quorum, deadline=args.deadline,
                min_clients=args.min_clients, poll_interval=args.poll_interval,
            )
        except PrivacyBudgetSpentError as e:  # the federation ends here: every published round stays valid
            print(f"peft-federated aggregate: {e}", file=sys.stderr)
            history = store.history()
        summary = [{k: h.get(k) for k in ("round", "metrics")} | {"clients": [c["client_id"] for c in h.get("contributions", [])]}
                   for h in history]
        print(json.dumps({"store": repr(store), "rounds": summary}, indent=2))
    else:
        from peft_federated.quantization import QuantizationUnavailableError, quantization_config

        try:  # refused before anything is read or loaded
            quantization = quantization_config(args.load_in_4bit, args.load_in_8bit, args.bnb_4bit_quant_type,
                                               args.bnb_4bit_use_double_quant, args.bnb_4bit_compute_dtype)
        except (ValueError, QuantizationUnavailableError) as e:
            print(f"peft-federated client: error: {e}", file=sys.stderr)
            return 2
        repos = {args.client_id: args.update_repo} if args.update_repo else {}
        store = roles.open_store(args.repo, args.local_dir, [args.client_id], repos, token, args.endpoint, args.retry_timeout)
        from peft_federated.data.sft import SFTDataError

        try:
            metrics = roles.run_client(
                store, args.client_id, args.data, model_path=args.model, num_labels=args.num_labels, output_dir=args.output_dir,
                learning_rate=args.lr, batch_size=args.batch_size, max_length=args.max_length, seed=args.seed,
                text_column=args.text_column, label_column=args.label_column, poll_interval=args.poll_interval,
                round_timeout=args.round_timeout, messages_column=args.messages_column, prompt_column=args.prompt_column,
                completion_column=args.completion_column, chat_template=args.chat_template, packing=args.packing,
                gradient_accumulation_steps=args.gradient_accumulation_steps,
                gradient_checkpointing=args.gradient_checkpointing, bf16=args.bf16, fp16=args.fp16, quantization=quantization,
                personal_dir=args.personal_dir,
            )
        except (SFTDataError, roles.PrecisionError, FileNotFoundError) as e:  # refused before any round trains
            print(f"peft-federated client: error: {e}", file=sys.stderr)
            return 2
        print(json.dumps({"client_id": args.client_id, "metrics": metrics}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
