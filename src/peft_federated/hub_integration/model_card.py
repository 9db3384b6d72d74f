"""The model card (README.md) of a federation's global adapter: strategy, round history, how to load.

Clients' metadata reaches the card only as checked numbers and metric names of a safe charset
(letters, digits, '_', '.', '/', '-'); anything else a client could have written is dropped, so no
client text becomes markdown (headings, links, table cells).
"""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig

_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_./-]{0,95}")


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _samples(contributions: Any) -> int:
    """The round's total sample count, from integer counts only."""
    if not isinstance(contributions, list):
        return 0
    counts = (c.get("num_samples") for c in contributions if isinstance(c, dict))
    return sum(n for n in counts if isinstance(n, int) and not isinstance(n, bool) and 0 < n < 10**18)


def _privacy_line(dp: Any) -> list[str]:
    """The card's line on differential privacy, from the latest round's `dp` entry (`privacy.PrivacyPlan.record`)."""
    keys = ("delta", "rounds_accounted", "noise_multiplier", "clip_norm", "sampling_rate")
    if not isinstance(dp, dict) or not all(_number(dp.get(k)) for k in keys) or not (_number(dp.get("epsilon")) or dp.get("epsilon") is None):
        return []
    mode = "client-side" if dp.get("mode") == "client" else "central"
    spent = "infinite (no noise)" if dp["epsilon"] is None else f"{dp['epsilon']:.4g}"
    return [f"- differential privacy: client-level DP-FedAvg ({mode} noise), **epsilon {spent} at delta "
            f"{dp['delta']:.3g}** after {int(dp['rounds_accounted'])} rounds; noise multiplier {dp['noise_multiplier']:.4g}, "
            f"clip norm {dp['clip_norm']:.4g}, Poisson sampling rate {dp['sampling_rate']:.4g}, dp-accounting "
            f"{'PLD' if 'pld' in str(dp.get('accountant')) else 'RDP'} accountant"]


def _personal_line(strategy: Any) -> list[str]:
    """For a personalized strategy: what the rounds hold and what stays with each client."""
    kept = [*strategy.personal_factors, *(["the modules_to_save (e.g. the head)"] if strategy.personal_extras else [])]
    if not kept:
        return []
    return [f"- personalized: each client keeps its own {' and '.join(kept)}, never uploaded; a round holds the shared "
            "part, with those tensors at their round-0 values. Load a client's model with `peft_federated.load_personal` "
            "over the round"]


def render_model_card(config: "FederatedLoraConfig", history: list[dict[str, Any]], repo_id: str = "<repo>") -> str:
    """Markdown for the global adapter, from every round's federation metadata (oldest first)."""
    from peft_federated.strategies import STRATEGIES

    strategy = STRATEGIES[config.strategy]
    latest = history[-1]["round"] if history else 0
    metrics_of = [h.get("metrics") if isinstance(h.get("metrics"), dict) else {} for h in history]
    metric_names = sorted({k for m in metrics_of for k in m if isinstance(k, str) and _SAFE_NAME.fullmatch(k)})
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
        *_privacy_line(history[-1].get("dp") if history else None),
        *_personal_line(strategy),
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
    for h, metrics in zip(history, metrics_of):
        contributions = h.get("contributions", [])
        count = len(contributions) if isinstance(contributions, list) else 0
        cells = [f"{metrics[m]:.4g}" if _number(metrics.get(m)) else "" for m in metric_names]
        lines.append(f"| {int(h['round'])} | {count} | {_samples(contributions)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def write_model_card(folder: str | Path, config: "FederatedLoraConfig", history: list[dict[str, Any]], repo_id: str = "<repo>") -> None:
    (Path(folder) / "README.md").write_text(render_model_card(config, history, repo_id))
