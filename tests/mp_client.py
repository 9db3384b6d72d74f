"""One federated client trained data-parallel by 2 processes (run by test_multiprocess.py with
`accelerate launch --multi_gpu --num_processes 2`); rank 0 also runs the aggregator on the store."""

import json
import sys
import threading
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from safetensors.torch import save_file  # noqa: E402
from tiny import tiny_args, tiny_bert, tiny_config, token_dataset  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

from peft_federated.adapter import read_tensors  # noqa: E402
from peft_federated.aggregator import initialize, serve  # noqa: E402
from peft_federated.hub_integration import LocalStore  # noqa: E402
from peft_federated.trainer import FederatedTrainer  # noqa: E402

store_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
cfg = tiny_config(sys.argv[3] if len(sys.argv) > 3 else "rolora", num_rounds=2, local_steps=3)
model = tiny_bert(cfg)
store = LocalStore(store_dir)


def dump(args, name):
    tensors = {k: v.contiguous() for k, v in read_tensors(model).items()}
    save_file(tensors, str(out / f"rank{args.process_index}_{name}.safetensors"))
    (out / f"rank{args.process_index}.json").write_text(json.dumps({"world_size": args.world_size}))


class DumpAdapter(TrainerCallback):
    """After each round's last local step, every rank writes the adapter it holds."""

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == state.max_steps:
            dump(args, f"round{trainer._fed_round}")


trainer = FederatedTrainer(model=model, args=tiny_args(out), train_dataset=token_dataset(64, 0), federated_config=cfg,
                           client_id="mp-client", store=store, callbacks=[DumpAdapter()], poll_interval=0.1, round_timeout=120)
if trainer.is_world_process_zero():
    initialize(store, cfg, model)
    threading.Thread(target=serve, args=(store, cfg, ["mp-client"]), kwargs={"poll_interval": 0.1}, daemon=True).start()
trainer.train()
dump(trainer.args, "final")  # every rank holds the federation's final round
if trainer.is_world_process_zero():
    import time

    deadline = time.time() + 60
    while store.latest_round() < cfg.num_rounds and time.time() < deadline:
        time.sleep(0.1)
