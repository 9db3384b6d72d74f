"""Client-level differential privacy: DP-FedAvg (McMahan et al., ICLR 2018) around the plain-mean strategies.

Each round, with m the expected number of clients per round (the fixed denominator, not the count
that arrived) and d_k client k's change of the tensors it uploads, all of them together:

    global = start + (sum_k clip_C(d_k) + z) / m,    z ~ N(0, (sigma C)^2 I)

Noise enters only what clients upload (FFA-LoRA's B, RoLoRA's active factor, both factors for FedIT,
and trained extras such as a head); whatever a strategy computes from these means afterwards is
post-processing. The strategies whose result is not (`Strategy.dp_refusal`) are refused when the
config is built.

Who adds z (`dp_mode`):
- 'central': the aggregator clips every change to C (the aggregator's clipping, `max_update_norm = C`)
  and draws z. It sees clean updates: the aggregator and the store holding the updates are trusted,
  and the guarantee covers what is published (the rounds).
- 'client': each client clips and adds N(0, (sigma C)^2 / m) before it uploads (`privatize_update`),
  so an honest-but-curious aggregator sees only noised updates; the aggregator adds the noise of the
  clients that did not arrive, N(0, (sigma C)^2 (m - n) / m), so the published sum carries N(0, (sigma C)^2)
  as in central mode. Each single upload carries only sigma / sqrt(m) of noise multiplier: against the
  aggregator that is the guarantee of one client's upload, unless uploads are summed by secure aggregation.

Sampling and accounting: each client takes part in a round independently with probability q = m / N
(Poisson sampling, `poisson_sample`; N = `dp_num_clients`), and dp-accounting composes
`PoissonSampledDpEvent(q, GaussianDpEvent(sigma))` over the published rounds, for neighbouring
federations that differ by one client's whole data (add or remove one). Noise and sampling draw fresh
randomness from the OS every round (`dp_seed` only for tests). What a round publishes under DP
(`published_metadata`) holds no per-client numbers, and ids only where participation is public anyway.
"""

from __future__ import annotations

import logging
import math
import random
import secrets
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Optional

import torch
from torch import Tensor

from peft_federated.strategies.validation import change_norm, clip_change

if TYPE_CHECKING:
    from peft_federated.config import FederatedLoraConfig
    from peft_federated.strategies.base import Aggregator


class PrivacyBudgetSpentError(RuntimeError):
    """Publishing the next round would take epsilon above the federation's `dp_target_epsilon`."""


def _dp_accounting():
    try:
        import dp_accounting
    except ImportError as err:
        raise ImportError("Differential privacy needs dp-accounting: pip install 'peft-federated[dp]'.") from err
    return dp_accounting


def _event(q: float, sigma: float, rounds: int):
    dp = _dp_accounting()
    return dp.SelfComposedDpEvent(dp.PoissonSampledDpEvent(q, dp.GaussianDpEvent(sigma)), rounds)


def _accountant(kind: str):
    dp = _dp_accounting()
    return dp.rdp.RdpAccountant() if kind == "rdp" else dp.pld.PLDAccountant()


@lru_cache(maxsize=256)
def epsilon(q: float, sigma: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """Epsilon at `delta` after `rounds` Poisson-sampled Gaussian rounds (dp-accounting's own computation)."""
    if rounds == 0 or q == 0:
        return 0.0
    if sigma == 0:
        return math.inf
    with _quiet_absl():
        return float(_accountant(accountant).compose(_event(q, sigma, rounds)).get_epsilon(delta))


@lru_cache(maxsize=64)
def noise_for_target(q: float, target_epsilon: float, rounds: int, delta: float, accountant: str = "rdp") -> float:
    """The smallest sigma (within 1e-4, dp-accounting's calibration) whose `rounds` rounds spend at most
    `target_epsilon`. PLD's epsilon is below RDP's for the same sigma, so PLD searches below RDP's sigma."""
    dp = _dp_accounting()
    with _quiet_absl():
        bracket = dp.LowerEndpointAndGuess(1e-2, 1.0)
        if accountant == "pld":  # PLD of a tiny sigma needs a huge grid: search only below RDP's answer
            upper = noise_for_target(q, target_epsilon, rounds, delta, "rdp")
            lower = upper / 2
            while epsilon(q, lower, rounds, delta, "pld") <= target_epsilon:
                lower, upper = lower / 2, lower
            bracket = dp.ExplicitBracketInterval(lower, upper)
        sigma = dp.calibrate_dp_mechanism(lambda: _accountant(accountant), lambda s: _event(q, s, rounds), target_epsilon,
                                          delta, bracket, tol=1e-4)
    if epsilon(q, sigma, rounds, delta, accountant) > target_epsilon:  # calibration's guarantee, checked
        raise RuntimeError(f"dp-accounting's calibration gave sigma={sigma}, above the target epsilon.")
    return float(sigma)


@contextmanager
def _quiet_absl():
    """dp-accounting logs (through absl) every RDP order it drops while searching; those are not the user's concern."""
    logger = logging.getLogger("absl")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


@dataclass(frozen=True)
class PrivacyPlan:
    """A federation's DP-FedAvg settings, as every party derives them from its config (`of`)."""

    noise_multiplier: float  # sigma
    clip_norm: float  # C
    delta: float
    sampling_rate: float  # q = m / N
    expected_clients: int  # m, the denominator of every round's mean
    num_clients: int  # N
    mode: str
    accountant: str
    budget: Optional[float]

    @classmethod
    def of(cls, config: "FederatedLoraConfig") -> "PrivacyPlan":
        n = config.dp_num_clients
        m = config.num_sampled(n)
        q = m / n
        sigma = config.dp_noise_multiplier
        if sigma is None:
            sigma = noise_for_target(q, config.dp_target_epsilon, config.num_rounds, config.dp_delta, config.dp_accountant)
        return cls(float(sigma), float(config.dp_clip_norm), config.dp_delta, q, m, n, config.dp_mode,
                   config.dp_accountant, config.dp_target_epsilon)

    def epsilon(self, rounds: int) -> float:
        """Epsilon at `delta` once `rounds` rounds are published."""
        return epsilon(self.sampling_rate, self.noise_multiplier, rounds, self.delta, self.accountant)

    def check_budget(self, rounds: int) -> None:
        """Raise `PrivacyBudgetSpentError` if publishing `rounds` rounds would spend more than the budget."""
        if self.budget is not None and (spent := self.epsilon(rounds)) > self.budget:
            raise PrivacyBudgetSpentError(
                f"The privacy budget is spent: publishing round {rounds} would take epsilon to {spent:.4g}, above "
                f"dp_target_epsilon={self.budget:g} (delta {self.delta:g}); round {rounds - 1} is the federation's last. "
                "Train further only as a new federation with a new budget.")

    def record(self, rounds: int) -> dict[str, Any]:
        """The DP entry of a round's federation.json, after `rounds` published rounds."""
        spent = self.epsilon(rounds)
        # epsilon None: no guarantee (sigma 0); federation.json is strict JSON, without Infinity
        return {"epsilon": spent if math.isfinite(spent) else None, "delta": self.delta, "rounds_accounted": rounds,
                "noise_multiplier": self.noise_multiplier, "clip_norm": self.clip_norm, "sampling_rate": self.sampling_rate,
                "expected_clients": self.expected_clients, "num_clients": self.num_clients, "mode": self.mode,
                "sampling": "poisson", "neighbouring": "add or remove one client", "accountant": f"dp-accounting {self.accountant}",
                "target_epsilon": self.budget}


def generator(config: "FederatedLoraConfig", round: int, party: str, purpose: str = "noise") -> torch.Generator:
    """A fresh generator: from the OS, or (tests only) from `dp_seed`, the round and the party."""
    g = torch.Generator()
    if config.dp_seed is None:
        g.manual_seed(secrets.randbits(63))
    else:
        g.manual_seed(zlib.crc32(f"{config.dp_seed}/{purpose}/{round}/{party}".encode()))
    return g


def poisson_sample(config: "FederatedLoraConfig", client_ids: list[str], round: int) -> list[str]:
    """The clients of a DP round: each independently with probability q = m / N (what the accountant assumes)."""
    plan = PrivacyPlan.of(config)
    seed = secrets.randbits(64) if config.dp_seed is None else f"{config.dp_seed}/sample/{round}"
    rng = random.Random(seed)
    return [c for c in sorted(client_ids) if rng.random() < plan.sampling_rate]


def privatize_update(update: dict[str, Tensor], start: dict[str, Tensor], config: "FederatedLoraConfig", round: int,
                     client_id: str) -> dict[str, Tensor]:
    """Client-side mode: the update with its change clipped to C, plus this client's share of the noise,
    N(0, (sigma C)^2 / m) on every uploaded value."""
    plan = PrivacyPlan.of(config)
    norm = change_norm(update, start)
    if norm > plan.clip_norm:
        update = clip_change(update, start, norm, plan.clip_norm)
    g, std = generator(config, round, client_id), plan.noise_multiplier * plan.clip_norm / math.sqrt(plan.expected_clients)
    return {k: (v.double() + torch.randn(v.shape, generator=g, dtype=torch.float64) * std).to(v.dtype) for k, v in update.items()}


def noise_round(aggregator: "Aggregator") -> None:
    """Replace the round's running means of uploaded tensors by start + (sum of changes + z) / m.

    Central mode draws z ~ N(0, (sigma C)^2); client mode only the noise of the clients that did not
    arrive. Clients weigh 1 each (`weighting='uniform'`), so the sum is the mean times the count."""
    from peft_federated.state import lora_key

    strategy, state = aggregator.strategy, aggregator.state
    plan = PrivacyPlan.of(strategy.config)
    plan.check_budget(state.round + 1)
    arrived = len(aggregator.clients)
    share = 1.0 if plan.mode == "central" else max(0, plan.expected_clients - arrived) / plan.expected_clients
    std = plan.noise_multiplier * plan.clip_norm * math.sqrt(share)
    g = generator(strategy.config, state.round, "aggregator")
    trainable = strategy.shared_factors(state.round)  # what clients upload: never a personal factor
    means = [(key, mean) for key, mean in aggregator.extras.items()]
    for module, agg in aggregator.modules.items():
        means += [(lora_key(module, f), {"lora_A": agg.mean_A, "lora_B": agg.mean_B}[f]) for f in trainable]
    for key, mean in means:
        start = state.tensors[key].double()
        total = torch.zeros_like(start) if mean.mean is None else (mean.mean.double() - start) * mean.total
        noised = start + (total + torch.randn(start.shape, generator=g, dtype=torch.float64) * std) / plan.expected_clients
        mean.mean, mean.total, mean._given = noised.to(mean.accumulates_in(state.tensors[key].dtype)), 1.0, False


def published_metadata(config: "FederatedLoraConfig", round: int, metadata: dict[str, Any],
                       participation_public: bool) -> dict[str, Any]:
    """What a round's federation.json says: under DP, the epsilon spent so far (`dp`), no per-client
    number (sample counts, norms, metrics, hashes of clean updates) and no client's mean metrics;
    client ids (of contributions and refusals) only where participation is public anyway
    (`participation_public`: the Hub roles, where every registered client takes part each round),
    since in a sampled federation who took part is part of what sampling keeps secret; there the
    refusals are only counted (`refused_count`; their reasons are logged). Without DP, `metadata`
    unchanged."""
    if not config.dp:
        return metadata
    out = dict(metadata)
    contributions = metadata.get("contributions", [])
    out["contributions"] = [{"client_id": c["client_id"]} for c in contributions] if participation_public else []
    if not participation_public and "refused" in metadata:  # a refused client was sampled too: counted, not named
        out["refused"], out["refused_count"] = [], len(metadata["refused"])
    out["metrics"] = {k: v for k, v in metadata.get("metrics", {}).items() if not k.startswith("clients_mean_")}
    out["dp"] = PrivacyPlan.of(config).record(round)
    return out
