"""The model card (README.md) of a federation's global adapter: strategy, round history, how to load."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig


def render_model_card(config: "FederatedLoraConfig", history: list[dict[str, Any]], repo_id: str = "<repo>") -> str:
    """Markdown for the global adapter, from every round's federation metadata (oldest first)."""
    from peft_federated.strategies import STRATEGIES

    strategy = STRATEGIES[config.strategy]
    latest = history[-1]["round"] if history else 0
    metric_names = sorted({k for h in history for k in h.get("metrics", {})})
    lines = [
        "---",
        "library_name: peft",
        f"base_model: {config.base_model_name_or_path or 'unknown'}",
        "tags: [peft, lora, federated-learning, peft-federated, " + config.strategy + "]",
        "---",
        "",
        f"# Federated LoRA adapter ({config.strategy})",
        "",
        f"Trained by several parties with [peft-federated](https://pypi.org/project/peft-federated/) using "
        f"**{config.strategy}**: {strategy.paper}. Each round's global adapter is a plain PEFT adapter.",
        "",
        f"- LoRA rank {config.r}, alpha {config.lora_alpha}, target modules: {sorted(config.target_modules or [])}",
        f"- rounds planned: {config.num_rounds}; published so far: {latest}",
        "",
        "## Load any round with plain PEFT",
        "",
        "```python",
        "from peft import PeftModel",
        f'model = PeftModel.from_pretrained(base_model, "{repo_id}", revision="round-{latest:04d}")',
        "```",
        "",
        "## Rounds",
        "",
        "| round | contributions | samples | " + " | ".join(metric_names) + " |",
        "|---|---|---|" + "---|" * len(metric_names),
    ]
    for h in history:
        contributions = h.get("contributions", [])
        samples = sum(c.get("num_samples", 0) for c in contributions)
        metrics = [f"{h.get('metrics', {}).get(m, ''):.4g}" if isinstance(h.get("metrics", {}).get(m), (int, float)) else "" for m in metric_names]
        lines.append(f"| {h['round']} | {len(contributions)} | {samples} | " + " | ".join(metrics) + " |")
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, config: "FederatedLoraConfig", history: list[dict[str, Any]], repo_id: str = "<repo>") -> None:
    (Path(folder) / "README.md").write_text(render_model_card(config, history, repo_id))
