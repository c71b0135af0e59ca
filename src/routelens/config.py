"""The settings of each analysis, as typed dataclasses that validate themselves.

A bad value raises `RouteLensError` on construction, with the one-line message the
command line prints (it builds these same objects). This module imports nothing heavy,
so the command line reads its defaults from here without loading torch.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

from routelens.errors import RouteLensError

ENGINE_NAMES = ("fast", "cache", "reference")
BINS = ("Confident", "Ambiguous", "Fragile")
ALL_TOKENS = "All"                                            # the summary's row over every bin
SCORES = {"mean": "mean_logprob", "first": "first_logprob"}   # isolation cell statistic -> column
CHECKERS = ("arithmetic", "math-verify")                      # how a pass@k sample is checked


def _at_least(option: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RouteLensError(f"{option} must be an integer >= {low}, got {value!r}")


def _is_layer_list(value) -> bool:
    """A non-empty list (or tuple) of layer indices."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value)


@dataclass
class CounterfactualConfig:
    """Settings of a counterfactual run, validated on construction (a bad value raises
    `RouteLensError` with the message the command line prints).

    Examples:
        >>> from routelens import CounterfactualConfig
        >>> CounterfactualConfig(layers=[-1], num_routes=8).num_routes
        8
        >>> CounterfactualConfig(fragile=0.95, confident=0.9)
        Traceback (most recent call last):
        ...
        routelens.errors.RouteLensError: need 0 <= --fragile (0.95) <= --confident (0.9) <= 1
    """

    layers: list[int] = field(default_factory=lambda: [-1])
    joint_layers: list[int] | None = None  # also score routes forced at all these layers at once (layers = these)
    num_routes: int = 32
    num_candidates: int | None = None  # None: min(32, E)
    gumbel_temperature: float = 1.0     # of the Gumbel-top-k route sampler (not a sampling temperature of text)
    seed: int = 0
    confident: float = 0.9
    fragile: float = 0.5
    win_tolerance: float = 1e-3         # an alternative wins only if p_alt - p_std > this (probability)
    only_step_ok: bool | None = None    # score only tokens of right steps; None: when every trajectory has step checks
    engine: str = "fast"
    route_batch_size: int = 33          # reference engine: routes per forward
    memory_budget: int = 2 * 2**30      # fast engine: bytes for one chunk of perturbed sequences
    group_tokens: int = 2048            # fast engine: trajectories scored together up to this many tokens
    bootstrap_resamples: int = 2000

    def __post_init__(self) -> None:
        if not _is_layer_list(self.layers):
            raise RouteLensError(f"--layers must be a non-empty list of layer indices such as [0, -1], got {self.layers!r}")
        self.layers = list(self.layers)
        if self.joint_layers is not None:
            if not _is_layer_list(self.joint_layers) or len(set(self.joint_layers)) < 2:
                raise RouteLensError(f"--joint-layers must list two or more distinct layers such as 0,1,2, "
                                     f"got {self.joint_layers!r}")
            if self.layers not in ([-1], list(self.joint_layers)):
                raise RouteLensError("--joint-layers scores each of its layers alone as well (the comparison needs "
                                     "them); give --joint-layers without --layers")
            self.joint_layers = list(self.joint_layers)
            self.layers = list(self.joint_layers)
        _at_least("--routes", self.num_routes, 1)
        if self.num_candidates is not None:
            _at_least("--candidates", self.num_candidates, 1)
        if not self.gumbel_temperature > 0:
            raise RouteLensError(f"--gumbel-temperature must be positive, got {self.gumbel_temperature}")
        if self.only_step_ok not in (None, True, False):
            raise RouteLensError(f"only_step_ok must be True, False or None (when every trajectory has step checks), "
                                 f"got {self.only_step_ok!r}")
        if not 0 <= self.win_tolerance < 1:
            raise RouteLensError(f"--win-tolerance is a probability difference in [0, 1), got {self.win_tolerance}")
        if not 0 <= self.fragile <= self.confident <= 1:
            raise RouteLensError(f"need 0 <= --fragile ({self.fragile}) <= --confident ({self.confident}) <= 1")
        if self.engine not in ENGINE_NAMES:
            raise RouteLensError(f"unknown --engine {self.engine!r}; available: {', '.join(ENGINE_NAMES)}")
        _at_least("--route-batch-size", self.route_batch_size, 1)
        _at_least("--memory-budget", self.memory_budget, 1)
        _at_least("group_tokens", self.group_tokens, 1)
        _at_least("--bootstrap-resamples", self.bootstrap_resamples, 1)

    def candidates_for(self, num_experts: int) -> int:
        return self.num_candidates if self.num_candidates is not None else min(32, num_experts)

    # Knobs that change speed and memory but not results (tested): not part of a run's identity,
    # so a run resumes under another memory budget.
    PERFORMANCE = ("route_batch_size", "memory_budget", "group_tokens")

    def to_dict(self) -> dict:
        # joint_layers only where set: run folders made before it existed resume unchanged
        return {k: v for k, v in asdict(self).items()
                if k not in self.PERFORMANCE and not (k == "joint_layers" and v is None)}

    def performance(self) -> dict:
        return {k: getattr(self, k) for k in self.PERFORMANCE}


@dataclass
class IsolationConfig:
    """Settings of an isolation run, validated on construction (`RouteLensError`, the
    command line's message).

    Examples:
        >>> from routelens import IsolationConfig
        >>> IsolationConfig(layers=[0, -1], floor_seeds=3).floor_seeds
        3
        >>> IsolationConfig(alpha=1.5)
        Traceback (most recent call last):
        ...
        routelens.errors.RouteLensError: --alpha must lie strictly between 0 and 1, got 1.5
    """

    layers: list[int] | None = None     # None: every MoE layer
    floor_seeds: int = 5
    seed: int = 0
    alpha: float = 0.05
    score: str = "mean"                 # statistic of the cells: "mean" or "first" target-token log-prob
    bootstrap_resamples: int = 2000
    memory_budget: int = 2 * 2**30
    group_items: int = 16               # items sharing one natural forward and scoring passes, at most

    # Settings that only change the summary (recomputed from the tables on every run) or the
    # speed: a run folder resumes, or re-summarises, under other values of these.
    SUMMARY = ("alpha", "score", "bootstrap_resamples")
    PERFORMANCE = ("memory_budget", "group_items")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.layers is not None and not _is_layer_list(self.layers):
            raise RouteLensError(f"--layers must be None (every MoE layer) or a non-empty list of layer indices, "
                                 f"got {self.layers!r}")
        _at_least("--bootstrap-resamples", self.bootstrap_resamples, 1)
        _at_least("--group-items", self.group_items, 1)
        if self.floor_seeds < 0:
            raise RouteLensError(f"--floor-seeds must be 0 or more, got {self.floor_seeds}")
        if not 0 < self.alpha < 1:
            raise RouteLensError(f"--alpha must lie strictly between 0 and 1, got {self.alpha}")
        if self.score not in SCORES:
            raise RouteLensError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}

    def summary_settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SUMMARY}


@dataclass
class PassKConfig:
    """Settings of a pass@k run, validated on construction (`RouteLensError`, the command
    line's message).

    Examples:
        >>> from routelens import PassKConfig
        >>> PassKConfig(samples=8, ks=[1, 4, 8]).ks
        [1, 4, 8]
        >>> PassKConfig(samples=12).ks          # default: powers of two up to the samples, and the samples
        [1, 2, 4, 8, 12]
        >>> PassKConfig(samples=4, ks=[1, 8])
        Traceback (most recent call last):
        ...
        routelens.errors.RouteLensError: --k 8 must lie in 1..--samples (4): pass@k needs at least k samples per problem
    """

    samples: int = 16
    ks: list[int] | None = None     # None: 1, 2, 4, ... up to `samples`, and `samples` itself
    temperature: float = 0.8
    seed: int = 0
    max_new_tokens: int = 96
    checker: str = "arithmetic"
    bootstrap_resamples: int = 2000
    problems_per_unit: int = 50
    batch_size: int = 256

    SUMMARY = ("bootstrap_resamples",)
    PERFORMANCE = ("problems_per_unit", "batch_size")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.checker not in CHECKERS:
            raise RouteLensError(f"unknown checker {self.checker!r}; available: {', '.join(CHECKERS)}")
        for name in ("samples", "max_new_tokens", "bootstrap_resamples", "problems_per_unit", "batch_size"):
            _at_least(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        if self.ks is None:
            self.ks = sorted({2 ** i for i in range(self.samples.bit_length()) if 2 ** i <= self.samples} | {self.samples})
        bad = [k for k in self.ks if not 1 <= k <= self.samples]
        if bad:
            raise RouteLensError(f"--k {','.join(map(str, bad))} must lie in 1..--samples ({self.samples}): "
                                 "pass@k needs at least k samples per problem")
        if not self.temperature > 0:
            raise RouteLensError(f"--temperature must be positive, got {self.temperature}")

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}


@dataclass
class RouterUpdateConfig:
    """Settings of a router update, validated on construction (`RouteLensError`, the
    command line's message).

    Examples:
        >>> from routelens import RouterUpdateConfig
        >>> RouterUpdateConfig(steps=100).steps
        100
        >>> RouterUpdateConfig(bins=["Fragile", "Hard"])
        Traceback (most recent call last):
        ...
        routelens.errors.RouteLensError: unknown bin(s) Hard; bins are Confident, Ambiguous, Fragile
    """

    margin: float = 0.05
    bins: list[str] = field(default_factory=lambda: ["Fragile", "Ambiguous"])
    beta: float = 0.1
    learning_rate: float = 1e-5   # minimal: see the README for 1e-3 and 1e-4
    steps: int = 300
    batch_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for name in ("steps", "batch_size"):
            _at_least(f"--{name.replace('_', '-')}", getattr(self, name), 1)
        unknown = [b for b in self.bins if b not in BINS]
        if unknown:
            raise RouteLensError(f"unknown bin(s) {', '.join(unknown)}; bins are {', '.join(BINS)}")
        for name, option in (("beta", "--beta"), ("learning_rate", "--lr")):
            if not getattr(self, name) > 0:
                raise RouteLensError(f"{option} must be positive, got {getattr(self, name)}")
        if not 0 <= self.margin < 1:
            raise RouteLensError(f"--margin is a probability difference in [0, 1), got {self.margin}")


TOKEN_CHOICES = ("fragile", "all")   # rollout --tokens: these, or a file of (trajectory_id, position, layer)


@dataclass
class RolloutConfig:
    """Settings of a rollout run (continuations under three routes of a scored token),
    validated on construction (`RouteLensError`, the command line's message).

    Examples:
        >>> from routelens import RolloutConfig
        >>> RolloutConfig(samples=4, temperature=0).temperature
        0
        >>> RolloutConfig(tokens="some")
        Traceback (most recent call last):
        ...
        routelens.errors.RouteLensError: --tokens must be fragile, all or a file of ... rows; 'some' is neither ...
    """

    tokens: str = "fragile"       # fragile: Fragile tokens whose best alternative beats the standard by > tolerance
    samples: int = 8              # continuations per arm and token
    max_new_tokens: int = 64
    temperature: float = 0.8      # 0: greedy (then one continuation per arm)
    seed: int = 0
    checker: str = "arithmetic"
    limit: int | None = None      # keep the chosen tokens with the largest gains, at most this many
    bootstrap_resamples: int = 2000

    SUMMARY = ("bootstrap_resamples",)

    def __post_init__(self) -> None:
        import os

        if self.tokens not in TOKEN_CHOICES and not os.path.isfile(str(self.tokens)):
            raise RouteLensError(f"--tokens must be fragile, all or a file of (trajectory_id, position, layer) rows; "
                                 f"{self.tokens!r} is neither and no such file exists")
        for name, option in (("samples", "--samples"), ("max_new_tokens", "--max-tokens"),
                             ("bootstrap_resamples", "--bootstrap-resamples")):
            _at_least(option, getattr(self, name), 1)
        if self.limit is not None:
            _at_least("--limit", self.limit, 1)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise RouteLensError(f"--temperature must be 0 (greedy) or positive, got {self.temperature!r}")
        if self.checker not in CHECKERS:
            raise RouteLensError(f"unknown checker {self.checker!r}; available: {', '.join(CHECKERS)}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY}


FINGERPRINT_KINDS = ("selection", "input")   # mean router selection distribution, or mean MoE input


@dataclass
class SemanticRouteConfig:
    """Settings of a semantic-routing run (route by similarity to per-domain fingerprints),
    validated on construction (`RouteLensError`, the command line's message).

    Examples:
        >>> from routelens import SemanticRouteConfig
        >>> SemanticRouteConfig(layer_sets=[[3], [0, 3]]).layer_sets
        [[3], [0, 3]]
        >>> SemanticRouteConfig(kind="vibes")
        Traceback (most recent call last):
        ...
        routelens.errors.RouteLensError: --kind must be selection or input, got 'vibes'
    """

    layer_sets: list[list[int]] | None = None   # None: every MoE layer alone, and all of them at once
    kind: str = "selection"                      # the fingerprint: mean selection distribution, or mean MoE input
    calibration_share: float = 0.5               # of each domain's items, seeded; the rest are evaluated
    floor_seeds: int = 3
    seed: int = 0
    accuracy: bool = True                        # also generate (greedy) and check answers: the arithmetic task
    max_new_tokens: int = 96
    score: str = "mean"                          # summary statistic: "mean" or "first" target-token log-prob
    alpha: float = 0.05
    bootstrap_resamples: int = 2000
    memory_budget: int = 2 * 2**30

    SUMMARY = ("alpha", "bootstrap_resamples", "score")
    PERFORMANCE = ("memory_budget",)

    def __post_init__(self) -> None:
        if self.score not in SCORES:
            raise RouteLensError(f"--score must be one of {', '.join(SCORES)}, got {self.score!r}")
        _at_least("--max-new-tokens", self.max_new_tokens, 1)
        if self.layer_sets is not None:
            if not isinstance(self.layer_sets, (list, tuple)) or not self.layer_sets or not all(
                    _is_layer_list(s) and len(set(s)) == len(s) for s in self.layer_sets):
                raise RouteLensError("--layer-sets must be non-empty sets of distinct layer indices such as "
                                     f"'3;0,1,2,3', got {self.layer_sets!r}")
            self.layer_sets = [list(s) for s in self.layer_sets]
        if self.kind not in FINGERPRINT_KINDS:
            raise RouteLensError(f"--kind must be {' or '.join(FINGERPRINT_KINDS)}, got {self.kind!r}")
        if not 0 < self.calibration_share < 1:
            raise RouteLensError(f"--calibration-share must lie strictly between 0 and 1, got {self.calibration_share}")
        if isinstance(self.floor_seeds, bool) or not isinstance(self.floor_seeds, int) or self.floor_seeds < 0:
            raise RouteLensError(f"--floor-seeds must be 0 or more, got {self.floor_seeds!r}")
        if not 0 < self.alpha < 1:
            raise RouteLensError(f"--alpha must lie strictly between 0 and 1, got {self.alpha}")
        _at_least("--bootstrap-resamples", self.bootstrap_resamples, 1)
        _at_least("--memory-budget", self.memory_budget, 1)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}
