"""A round's files are the same bytes in every process: two aggregators recognise each other's rounds."""

from __future__ import annotations

import os
import subprocess
import sys

WRITE = """
import hashlib, sys, tempfile
from pathlib import Path
sys.path.insert(0, {tests!r})
from tiny import tiny_bert, tiny_config
from peft_federated.hub_integration.layout import read_metadata, write_round
from peft_federated.hub_integration.model_card import write_model_card
from peft_federated.strategies import get_strategy
cfg = tiny_config("fedit")
state = get_strategy(cfg).initial_state(tiny_bert(cfg))
with tempfile.TemporaryDirectory() as tmp:
    write_round(tmp, state, cfg, {{"contributions": []}})
    write_model_card(tmp, cfg, [read_metadata(tmp)], repo_id="org/fed")
    for p in sorted(Path(tmp).iterdir()):
        print(p.name, hashlib.sha256(p.read_bytes()).hexdigest())
"""


def test_round_files_do_not_depend_on_the_process_hash_seed():
    code = WRITE.format(tests=os.path.dirname(__file__))
    procs = [subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": str(seed)},
                              stdout=subprocess.PIPE, text=True) for seed in (1, 2, 3)]  # 3 module names: 6 orders
    outputs = {p.communicate(timeout=300)[0] for p in procs}
    assert all(p.returncode == 0 for p in procs)
    assert len(outputs) == 1, outputs
    written = outputs.pop()
    assert "adapter_config.json" in written and "README.md" in written
