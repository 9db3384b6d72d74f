"""`FederatedLoraConfig`: a peft `LoraConfig` plus the federation's settings.

The federation fields live beside the ordinary LoRA fields so one object describes a whole run, but
what gets published with each round is `to_lora_config()`: a plain `LoraConfig` that PEFT loads with
no unknown keys.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional, Union

from peft import LoraConfig

WEIGHTINGS = ("samples", "uniform")
DP_MODES = ("central", "client")
DP_ACCOUNTANTS = ("rdp", "pld")


@dataclass
class FederatedLoraConfig(LoraConfig):
    """LoRA settings plus how the federation runs: strategy, rounds, sampling and each method's knobs."""

    strategy: str = field(
        default="rolora",
        metadata={"help": "Aggregation strategy by name: fedit, ffa, rolora, hetlora, lora_fair, flora, fedex, flexlora, fedsvd or fedsa."},
    )
    num_rounds: int = field(default=10, metadata={"help": "Number of federated rounds."})
    clients_per_round: Union[int, float] = field(
        default=1.0,
        metadata={
            "help": "Clients sampled each round: an int >= 1 is a count, a float in (0, 1] a fraction of all "
            "clients (1.0 = every client)."
        },
    )
    local_steps: Optional[int] = field(
        default=10,
        metadata={"help": "Optimizer steps each client takes per round (set to None to use local_epochs)."},
    )
    local_epochs: Optional[float] = field(
        default=None, metadata={"help": "Passes over its data each client makes per round (instead of local_steps)."}
    )
    schedule_across_rounds: bool = field(
        default=True,
        metadata={
            "help": "The learning-rate schedule spans all rounds (warmup once, decay to the last round); False "
            "restarts it every round."
        },
    )
    weighting: str = field(
        default="samples",
        metadata={"help": "Aggregation weight of a client: 'samples' (its number of training examples) or 'uniform'."},
    )
    logit_adjustment: Optional[float] = field(
        default=None,
        metadata={
            "help": "Classification under label skew: each client trains on logits + tau * log(its own label "
            "frequencies, add-one smoothed) instead of the logits (logit adjustment, as in FedLC), so a client "
            "with few classes does not learn its label prior into the shared adapter. tau > 0 (1.0 is the "
            "usual value); None: off. Evaluation, the uploads and the published model are unchanged; the "
            "frequencies never leave the client."
        },
    )
    init_seed: int = field(
        default=0,
        metadata={
            "help": "Seed every party derives the initial lora_A from (FFA-LoRA's shared frozen A), and FLoRA's "
            "fresh per-round A."
        },
    )
    client_ranks: Optional[dict[str, int]] = field(
        default=None,
        metadata={
            "help": "HetLoRA, FLoRA and FlexLoRA: LoRA rank of each client id, each <= r (clients not listed train at rank r)."
        },
    )
    hetlora_gamma: float = field(
        default=0.99,
        metadata={"help": "HetLoRA rank self-pruning factor: a client may drop to floor(gamma * rank) each round."},
    )
    hetlora_min_rank: int = field(default=1, metadata={"help": "HetLoRA: a client's rank never drops below this."})
    hetlora_reg: float = field(
        default=0.01,
        metadata={"help": "HetLoRA: weight of the regulariser ||A_tail|| * ||B_tail|| on the ranks self-pruning may drop."},
    )
    lora_fair_lambda: float = field(
        default=0.01, metadata={"help": "LoRA-FAIR: weight of ||dB|| in the server-side correction objective."}
    )
    lora_fair_steps: int = field(
        default=200, metadata={"help": "LoRA-FAIR: optimizer steps of the server-side correction (from dB = 0)."}
    )
    lora_fair_lr: float = field(default=1e-3, metadata={"help": "LoRA-FAIR: learning rate of the server's Adam solver."})
    fedsvd_period: int = field(
        default=1, metadata={"help": "FedSVD: the server re-factors B A by SVD every this many rounds."}
    )
    max_update_norm: Optional[float] = field(
        default=None,
        metadata={
            "help": "Bound on the L2 norm of a client's change to the global tensors it uploads (all tensors "
            "together). An update above it is refused, or scaled down to it with clip_updates=True. None: no bound."
        },
    )
    clip_updates: bool = field(
        default=False,
        metadata={"help": "Clip an update whose norm exceeds max_update_norm to that norm instead of refusing it."},
    )
    norm_outlier_factor: Optional[float] = field(
        default=None,
        metadata={
            "help": "Refuse an update whose change-norm exceeds this many times the median of the round's updates "
            "(applied when at least 3 updates arrive). None: off."
        },
    )
    max_update_bytes: int = field(
        default=1 << 30,
        metadata={"help": "Largest update file the aggregator reads, in bytes; larger files are refused unread."},
    )
    max_update_json_bytes: int = field(
        default=64 * 1024,
        metadata={"help": "Largest update.json the aggregator reads, in bytes (checked before download or read); "
                  "an honest one is well under 4 KiB."},
    )
    max_num_samples: int = field(
        default=10_000_000,
        metadata={
            "help": "Largest num_samples a client may claim; an update claiming more is refused. The count is the "
            "client's own claim and sets its weight under weighting='samples': the default (10 million examples, "
            "more than the largest fine-tuning sets) keeps weights exact floats and bounds a lying client. "
            "Raise it for parties with more data."
        },
    )
    max_client_share: Optional[float] = field(
        default=None,
        metadata={
            "help": "Largest share of a round's weight one client may get under weighting='samples', in (0, 1]: larger "
            "sample counts are capped to it (recorded as weight_samples in federation.json). None: off (a party with "
            "most of the data then dominates, as FedAvg intends); set it (e.g. 0.5) when clients are not trusted."
        },
    )
    dp_noise_multiplier: Optional[float] = field(
        default=None,
        metadata={
            "help": "Client-level DP (DP-FedAvg): sigma, the std of the Gaussian noise on the sum of a round's clipped "
            "changes over dp_clip_norm. None: no DP unless dp_target_epsilon is set (then sigma is chosen for it)."
        },
    )
    dp_clip_norm: Optional[float] = field(
        default=None,
        metadata={"help": "DP: C, the L2 norm each client's change (all its uploaded tensors together) is clipped to."},
    )
    dp_delta: float = field(default=1e-5, metadata={"help": "DP: the delta epsilon is reported at, in (0, 1); below 1 / dp_num_clients."})
    dp_target_epsilon: Optional[float] = field(
        default=None,
        metadata={
            "help": "DP: the privacy budget. Without dp_noise_multiplier, sigma is chosen so that num_rounds rounds spend at "
            "most this epsilon; either way no round is published that would take epsilon above it."
        },
    )
    dp_num_clients: Optional[int] = field(
        default=None,
        metadata={"help": "DP: N, the federation's number of clients; the sampling rate is clients_per_round / N."},
    )
    dp_mode: str = field(
        default="central",
        metadata={
            "help": "DP: 'central' (the aggregator clips and adds the noise; it sees clean updates) or 'client' (each "
            "client clips and adds its share sigma C / sqrt(m) before upload; the aggregator tops up the noise when fewer "
            "than m clients arrive)."
        },
    )
    dp_accountant: str = field(
        default="rdp", metadata={"help": "DP: dp-accounting's 'rdp' (Renyi DP) or 'pld' (privacy loss distributions) accountant."}
    )
    dp_seed: Optional[int] = field(
        default=None,
        metadata={
            "help": "DP, tests only: seed of the noise and of the DP client sampling. None (always in a real federation): "
            "fresh randomness from the OS each round, which no one can reproduce from the published rounds."
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        from peft_federated.strategies import STRATEGIES  # late: strategies import this module

        if self.strategy not in STRATEGIES:
            raise ValueError(f"Unknown strategy {self.strategy!r}; choose one of: {', '.join(sorted(STRATEGIES))}.")
        if not isinstance(self.r, int) or self.r < 1:
            raise ValueError(f"r (the LoRA rank) must be a positive integer, got {self.r!r}.")
        if self.rank_pattern or self.alpha_pattern:
            raise ValueError(
                "rank_pattern/alpha_pattern are not supported: federated strategies need one rank and scale for "
                "every module. Use client_ranks for per-client ranks (hetlora, flora)."
            )
        if self.use_dora:
            raise ValueError("use_dora is not supported by the federated strategies; set use_dora=False.")
        _positive_int("num_rounds", self.num_rounds)
        if isinstance(self.clients_per_round, bool) or not isinstance(self.clients_per_round, (int, float)):
            raise ValueError(f"clients_per_round must be an int count or a float fraction, got {self.clients_per_round!r}.")
        if isinstance(self.clients_per_round, int):
            _positive_int("clients_per_round", self.clients_per_round)
        elif not 0.0 < self.clients_per_round <= 1.0:
            raise ValueError(
                f"clients_per_round={self.clients_per_round} as a float is a fraction and must be in (0, 1]; "
                "pass an int for a count of clients."
            )
        if (self.local_steps is None) == (self.local_epochs is None):
            raise ValueError("Set exactly one of local_steps and local_epochs (the other to None).")
        if self.local_steps is not None:
            _positive_int("local_steps", self.local_steps)
        if self.local_epochs is not None and not self.local_epochs > 0:
            raise ValueError(f"local_epochs must be > 0, got {self.local_epochs}.")
        if self.weighting not in WEIGHTINGS:
            raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {self.weighting!r}.")
        for client, rank in (self.client_ranks or {}).items():
            if not isinstance(rank, int) or not 1 <= rank <= self.r:
                raise ValueError(
                    f"client_ranks[{client!r}] = {rank!r} must be an integer in [1, r={self.r}]: the global adapter "
                    "has rank r and each client trains a truncation of it. Raise r or lower the client's rank."
                )
        tau = self.logit_adjustment
        if tau is not None and (isinstance(tau, bool) or not isinstance(tau, (int, float)) or not 0 < tau < float("inf")):
            raise ValueError(f"logit_adjustment (tau) must be a positive finite number or None (off), got {tau!r}.")
        if not 0.0 < self.hetlora_gamma <= 1.0:
            raise ValueError(f"hetlora_gamma must be in (0, 1], got {self.hetlora_gamma}.")
        if not 1 <= self.hetlora_min_rank <= self.r:
            raise ValueError(f"hetlora_min_rank must be in [1, r={self.r}], got {self.hetlora_min_rank}.")
        for name in ("hetlora_reg", "lora_fair_lambda"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}.")
        _positive_int("lora_fair_steps", self.lora_fair_steps)
        _positive_int("fedsvd_period", self.fedsvd_period)
        if not self.lora_fair_lr > 0:
            raise ValueError(f"lora_fair_lr must be > 0, got {self.lora_fair_lr}.")
        for name in ("max_update_norm", "norm_outlier_factor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0):
                raise ValueError(f"{name} must be a positive number or None, got {value!r}.")
        if self.norm_outlier_factor is not None and self.norm_outlier_factor <= 1:
            raise ValueError(f"norm_outlier_factor must be > 1 (a multiple of the median norm), got {self.norm_outlier_factor}.")
        if self.clip_updates and self.max_update_norm is None:
            raise ValueError("clip_updates=True needs max_update_norm: the norm to clip updates to.")
        _positive_int("max_update_bytes", self.max_update_bytes)
        _positive_int("max_update_json_bytes", self.max_update_json_bytes)
        _positive_int("max_num_samples", self.max_num_samples)
        share = self.max_client_share
        if share is not None and (isinstance(share, bool) or not isinstance(share, (int, float)) or not 0 < share <= 1):
            raise ValueError(f"max_client_share must be a number in (0, 1] or None, got {share!r}.")
        if self.dp:
            self._check_dp(STRATEGIES[self.strategy])

    @property
    def dp(self) -> bool:
        """Whether the federation is differentially private (client-level DP-FedAvg)."""
        return self.dp_noise_multiplier is not None or self.dp_target_epsilon is not None

    def _check_dp(self, strategy) -> None:
        def number(name: str, ok, what: str) -> None:
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or not ok(value):
                raise ValueError(f"{name} must be {what}, got {value!r}.")

        if strategy.dp_refusal:
            from peft_federated.strategies import STRATEGIES

            able = ", ".join(sorted(n for n, s in STRATEGIES.items() if s.dp_refusal is None))
            raise ValueError(f"strategy={self.strategy!r} cannot run under client-level DP: {strategy.dp_refusal} "
                             f"Strategies that can: {able}.")
        if self.dp_clip_norm is None:
            raise ValueError("DP without clipping has no sensitivity to calibrate the noise to: set dp_clip_norm (C), "
                             "the L2 norm each client's change is clipped to.")
        number("dp_clip_norm", lambda v: v > 0, "a positive number")
        if self.dp_noise_multiplier is not None:
            number("dp_noise_multiplier", lambda v: v >= 0, "a number >= 0")
        if self.dp_target_epsilon is not None:
            number("dp_target_epsilon", lambda v: v > 0, "a positive number")
        number("dp_delta", lambda v: 0 < v < 1, "in (0, 1)")
        if self.dp_mode not in DP_MODES:
            raise ValueError(f"dp_mode must be one of {DP_MODES}, got {self.dp_mode!r}.")
        if self.dp_accountant not in DP_ACCOUNTANTS:
            raise ValueError(f"dp_accountant must be one of {DP_ACCOUNTANTS}, got {self.dp_accountant!r}.")
        if self.dp_num_clients is None:
            raise ValueError("DP needs dp_num_clients (N, the federation's number of clients): the sampling rate "
                             "clients_per_round / N enters the privacy accounting.")
        _positive_int("dp_num_clients", self.dp_num_clients)
        if isinstance(self.clients_per_round, int) and self.clients_per_round > self.dp_num_clients:
            raise ValueError(f"clients_per_round={self.clients_per_round} is above dp_num_clients={self.dp_num_clients}: "
                             "the sampling rate must be at most 1.")
        if self.dp_delta >= 1 / self.dp_num_clients:
            raise ValueError(f"dp_delta={self.dp_delta:g} is not below 1 / dp_num_clients = {1 / self.dp_num_clients:g}: "
                             "such a delta allows releasing one client's update outright. Lower it.")
        if self.weighting != "uniform":
            raise ValueError("DP-FedAvg calibrates the noise to clients that each weigh 1 / m; sample-count weights let one "
                             "client weigh more and be under-noised. Set weighting='uniform'.")
        if self.norm_outlier_factor is not None:
            raise ValueError("norm_outlier_factor refuses a client by the other clients' norms, which the DP analysis does "
                             "not cover; under DP leave it None (clipping to dp_clip_norm bounds every client).")
        if self.dp_mode == "central":
            if self.max_update_norm not in (None, self.dp_clip_norm) or (self.max_update_norm is not None and not self.clip_updates):
                raise ValueError(f"Under central DP the aggregator clips every change to dp_clip_norm={self.dp_clip_norm:g}; "
                                 "leave max_update_norm and clip_updates unset.")
            self.max_update_norm, self.clip_updates = self.dp_clip_norm, True
        elif self.clip_updates:
            raise ValueError("Under client-side DP each client clips before it adds its noise; the aggregator must not "
                             "clip the noised updates again: set clip_updates=False (max_update_norm may still refuse "
                             "updates far above any honest noised norm).")

    @property
    def scaling(self) -> float:
        """The LoRA scale s of every module: alpha / r, or alpha / sqrt(r) with rsLoRA."""
        return lora_scale(self.lora_alpha, self.r, self.use_rslora)

    def client_rank(self, client_id: str) -> int:
        """The rank a client starts the federation with."""
        return (self.client_ranks or {}).get(client_id, self.r)

    def num_sampled(self, num_clients: int) -> int:
        """How many of `num_clients` clients take part in a round."""
        if isinstance(self.clients_per_round, int):
            return min(self.clients_per_round, num_clients)
        return max(1, round(self.clients_per_round * num_clients))

    def to_lora_config(self, **overrides) -> LoraConfig:
        """The plain `LoraConfig` of this federation (what is published next to each round's adapter)."""
        names = {f.name for f in dataclasses.fields(LoraConfig) if f.init}
        kwargs = {n: getattr(self, n) for n in names}
        kwargs.update(overrides)
        return LoraConfig(**kwargs)

    def federation_dict(self) -> dict:
        """The federation-only fields, for the round metadata."""
        lora_names = {f.name for f in dataclasses.fields(LoraConfig)}
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in lora_names}


def lora_scale(alpha: float, rank: int, use_rslora: bool) -> float:
    """PEFT's scale for a LoRA module of this rank."""
    return alpha / math.sqrt(rank) if use_rslora else alpha / rank


def alpha_for_scale(scale: float, rank: int, use_rslora: bool) -> float:
    """The lora_alpha that gives `scale` at `rank` (inverse of `lora_scale`)."""
    return scale * math.sqrt(rank) if use_rslora else scale * rank


def _positive_int(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")
