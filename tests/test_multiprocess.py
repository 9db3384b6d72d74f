"""Data-parallel local training under `accelerate launch` (2 CPU processes over gloo)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from peft_federated.hub_integration import LocalStore
from peft_federated.personal import client_folder, read_snapshot, snapshot_rounds


@pytest.mark.parametrize("strategy", ["rolora", "fedsa"])
def test_two_processes_hold_identical_adapters_after_each_round_and_the_final_global_one(tmp_path, strategy):
    out = tmp_path / "out"
    out.mkdir()
    launcher = Path(sys.executable).with_name("accelerate")
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    cmd = [str(launcher), "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
           "--dynamo_backend", "no", str(Path(__file__).with_name("mp_client.py")), str(tmp_path / "store"), str(out), strategy]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    for rank in (0, 1):
        assert '"world_size": 2' in (out / f"rank{rank}.json").read_text()
    store = LocalStore(tmp_path / "store")
    assert store.latest_round() == 2
    for round in (0, 1):
        a = load_file(str(out / f"rank0_round{round}.safetensors"))
        b = load_file(str(out / f"rank1_round{round}.safetensors"))
        assert a.keys() == b.keys()
        for key in a:
            assert torch.equal(a[key], b[key]), f"ranks differ on {key} after round {round}"
        # what the ranks hold is what the client submitted (RoLoRA: B in round 0, A in round 1; FedSA: A)
        update, _ = store.read_update(round, "mp-client")
        for key, value in update.items():
            assert torch.equal(value, a[key])
        if strategy == "fedsa":  # B never travels: rank 0 wrote it once, as the snapshot the next round starts from
            assert update and not any("lora_B" in k for k in update)
            personal, meta = read_snapshot(client_folder(out / "trainer" / "personal", "mp-client"), round + 1)
            assert meta["round"] == round + 1 and personal
            for key, value in personal.items():
                assert torch.equal(value, a[key]), f"the personal snapshot differs from the ranks' {key} after round {round}"
    if strategy == "fedsa":
        assert snapshot_rounds(client_folder(out / "trainer" / "personal", "mp-client")) == [1, 2]
    final, _ = store.read_round(2)
    for rank in (0, 1):
        held = load_file(str(out / f"rank{rank}_final.safetensors"))
        for key, value in final.tensors.items():
            assert torch.equal(held[key], value), f"rank {rank} does not hold the final global round's {key}"
