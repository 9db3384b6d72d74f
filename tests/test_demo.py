"""The main job's command on a small setting: real MiniLM, real tweets, a real federation."""

from __future__ import annotations

import json

from peft import PeftModel

from peft_federated.cli import main
from peft_federated.demo import minilm_path


def test_demo_command_runs_a_federation_and_publishes_plain_peft_rounds(tmp_path, capsys):
    out = tmp_path / "run"
    argv = ["demo", "--output-dir", str(out), "--clients", "3", "--clients-per-round", "2", "--rounds", "2",
            "--local-steps", "2", "--train-examples", "240", "--eval-examples", "48", "--no-progress"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    summary = json.loads(printed[printed.rindex("\n{") + 1:])
    assert len(summary["accuracy_per_round"]) == 3 and all(0 <= a <= 1 for a in summary["accuracy_per_round"])
    assert "majority-class rate" in printed and "round 2/2" in printed
    assert (out / "metrics.png").stat().st_size > 0
    rounds = json.loads((out / "results.json").read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1, 2] and len(rounds[2]["contributions"]) == 2
    # the printed adapter folder is a plain PEFT adapter
    from transformers import AutoModelForSequenceClassification

    base = AutoModelForSequenceClassification.from_pretrained(minilm_path(), num_labels=3)
    loaded = PeftModel.from_pretrained(base, summary["adapter"])
    assert loaded.peft_config["default"].r == 8
