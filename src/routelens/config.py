"""The settings of each analysis, as typed dataclasses that validate themselves.

A field's name is its command-line option (`routes` is `--routes`): the command line's
options are generated from these fields (`routelens.cli.parsing.config_options`), with the
help text each field declares through `setting`. A bad value raises `SettingError` on
construction, naming the parameter (`` `routes` must be ... ``); the command line shows
the same message with the option (`--routes must be ...`). This module imports nothing
heavy, so the command line reads its options from here without loading torch.
"""

from __future__ import annotations

from dataclasses import MISSING, asdict, dataclass, field

from routelens.errors import SettingError

ENGINE_NAMES = ("fast", "cache", "reference")
BINS = ("Confident", "Ambiguous", "Fragile")
ALL_TOKENS = "All"                                            # the summary's row over every bin
SCORES = {"mean": "mean_logprob", "first": "first_logprob"}   # isolation cell statistic -> column
CHECKERS = ("arithmetic", "math-verify")                      # how a pass@k sample is checked


def setting(default=MISSING, help: str = "", *, factory=None, parse: str | None = None, choices=None):
    """A config field with what its command-line option needs: `help`, how text is parsed
    (`parse`: a value type of `routelens.cli.parsing`, e.g. "int_list"; default: the field's
    annotation) and the `choices`."""
    metadata = {"help": help, "parse": parse, "choices": choices}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def _at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingError(f"`{name}` must be an integer >= {low}, got {value!r}", name)


def _positive(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise SettingError(f"`{name}` must be positive, got {value!r}", name)


def _fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise SettingError(f"`{name}` must lie strictly between 0 and 1, got {value!r}", name)


def _one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise SettingError(f"`{name}` must be one of {', '.join(allowed)}, got {value!r}", name)


def _is_layer_list(value) -> bool:
    """A non-empty list (or tuple) of layer indices."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value)


SEED_HELP = "seed of the route sampling and the bootstrap"


@dataclass
class CounterfactualConfig:
    """Settings of a counterfactual run, validated on construction.

    Examples:
        >>> from routelens import CounterfactualConfig
        >>> CounterfactualConfig(layers=[-1], routes=8).routes
        8
        >>> CounterfactualConfig(fragile=0.95, confident=0.9)
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: need 0 <= `fragile` (0.95) <= `confident` (0.9) <= 1
    """

    layers: list[int] = setting(factory=lambda: [-1], parse="int_list",
                                help="decoder-layer indices, comma-separated; negative counts from the end")
    joint_layers: list[int] | None = setting(
        None, parse="int_list", help="score each of these layers alone and, in the same run, routes forced at all of "
                                     "them at once (one independently sampled alternative per layer), e.g. 0,1,2")
    routes: int = setting(32, parse="positive_int", help="alternative routes S per token")
    candidates: int | None = setting(None, parse="positive_int",
                                     help="sample alternatives from the router's top-M experts (default min(32, E))")
    gumbel_temperature: float = setting(1.0, help="temperature of the Gumbel-top-k route sampler (higher: flatter; "
                                                  "not a sampling temperature of text)")
    seed: int = setting(0, help=SEED_HELP)
    confident: float = setting(0.9, help="Confident bin: route-averaged p >= this")
    fragile: float = setting(0.5, help="Fragile bin: route-averaged p < this")
    win_tolerance: float = setting(1e-3, help="an alternative wins only if its p beats the standard route's by more "
                                              "than this (probability; within it: a tie)")
    only_step_ok: bool | None = setting(None, help="score only tokens of right intermediate steps (default: on when "
                                                   "every trajectory carries step checks, as the arithmetic task's do)")
    engine: str = setting("fast", choices=ENGINE_NAMES,
                          help="scoring engine: fast (exact, batched; the cache engine for layers it cannot patch), "
                               "cache (the model's own cache, one decode step per token) or reference (plain forwards)")
    route_batch_size: int = setting(33, parse="positive_int", help="routes per forward (reference engine)")
    memory_budget: int = setting(2 * 2**30, parse="memory",
                                 help="memory for one chunk of perturbed sequences, e.g. 512MiB, 8GiB")
    group_tokens: int = setting(2048, parse="positive_int",
                                help="fast engine: trajectories scored together up to this many tokens (on --ray, a "
                                     "group is what one actor scores at a time)")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples of the intervals")

    def __post_init__(self) -> None:
        if not _is_layer_list(self.layers):
            raise SettingError(f"`layers` must be a non-empty list of layer indices such as [0, -1], got {self.layers!r}",
                               "layers")
        self.layers = list(self.layers)
        if self.joint_layers is not None:
            if not _is_layer_list(self.joint_layers) or len(set(self.joint_layers)) < 2:
                raise SettingError(f"`joint_layers` must list two or more distinct layers such as 0,1,2, "
                                   f"got {self.joint_layers!r}", "joint_layers")
            if self.layers not in ([-1], list(self.joint_layers)):
                raise SettingError("`joint_layers` and `layers` together: `joint_layers` scores each of them alone as "
                                   "well (the comparison needs it); give `joint_layers` alone",
                                   "joint_layers", "layers")
            self.joint_layers = list(self.joint_layers)
            self.layers = list(self.joint_layers)
        _at_least("routes", self.routes, 1)
        if self.candidates is not None:
            _at_least("candidates", self.candidates, 1)
        _positive("gumbel_temperature", self.gumbel_temperature)
        if self.only_step_ok not in (None, True, False):
            raise SettingError(f"`only_step_ok` must be True, False or None (when every trajectory has step checks), "
                               f"got {self.only_step_ok!r}", "only_step_ok")
        if not 0 <= self.win_tolerance < 1:
            raise SettingError(f"`win_tolerance` is a probability difference in [0, 1), got {self.win_tolerance}",
                               "win_tolerance")
        if not 0 <= self.fragile <= self.confident <= 1:
            raise SettingError(f"need 0 <= `fragile` ({self.fragile}) <= `confident` ({self.confident}) <= 1",
                               "fragile", "confident")
        _one_of("engine", self.engine, ENGINE_NAMES)
        for name in ("route_batch_size", "memory_budget", "group_tokens", "bootstrap_resamples"):
            _at_least(name, getattr(self, name), 1)

    def candidates_for(self, num_experts: int) -> int:
        return self.candidates if self.candidates is not None else min(32, num_experts)

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
    """Settings of an isolation run, validated on construction.

    Examples:
        >>> from routelens import IsolationConfig
        >>> IsolationConfig(layers=[0, -1], floor_seeds=3).floor_seeds
        3
        >>> IsolationConfig(alpha=1.5)
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: `alpha` must lie strictly between 0 and 1, got 1.5
    """

    layers: list[int] | None = setting(None, parse="layers_or_all",
                                       help="'all' (default: every MoE layer) or decoder-layer indices, comma-separated")
    floor_seeds: int = setting(5, help="random-routing floor: uniformly random k-expert routes per token, one per seed")
    seed: int = setting(0, help="seed of the floor routes and the bootstrap")
    alpha: float = setting(0.05, help="FDR level of the BH step-up")
    score: str = setting("mean", choices=tuple(SCORES),
                         help="cell statistic: mean target-token log-prob or the first target token's")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples of the calibration interval")
    memory_budget: int = setting(2 * 2**30, parse="memory", help="memory for one batch of conditions, e.g. 512MiB, 8GiB")
    group_items: int = setting(16, parse="positive_int",
                               help="items of similar length sharing one forward and its scoring passes, at most (1: one "
                                    "item at a time; on --ray, a group is what one actor scores at a time)")

    # Settings that only change the summary (recomputed from the tables on every run) or the
    # speed: a run folder resumes, or re-summarises, under other values of these.
    SUMMARY = ("alpha", "score", "bootstrap_resamples")
    PERFORMANCE = ("memory_budget", "group_items")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        if self.layers is not None and not _is_layer_list(self.layers):
            raise SettingError(f"`layers` must be None (every MoE layer) or a non-empty list of layer indices, "
                               f"got {self.layers!r}", "layers")
        for name in ("bootstrap_resamples", "group_items", "memory_budget"):
            _at_least(name, getattr(self, name), 1)
        _at_least("floor_seeds", self.floor_seeds, 0)
        _fraction("alpha", self.alpha)
        _one_of("score", self.score, tuple(SCORES))

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}

    def summary_settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SUMMARY}


@dataclass
class PassKConfig:
    """Settings of a pass@k run, validated on construction.

    Examples:
        >>> from routelens import PassKConfig
        >>> PassKConfig(samples=8, k=[1, 4, 8]).k
        [1, 4, 8]
        >>> PassKConfig(samples=12).k          # default: powers of two up to the samples, and the samples
        [1, 2, 4, 8, 12]
        >>> PassKConfig(samples=4, k=[1, 8])
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: `k` 8 must lie in 1..`samples` (4): pass@k needs that many draws per problem
    """

    samples: int = setting(16, parse="positive_int", help="samples per problem")
    k: list[int] | None = setting(None, parse="int_list",
                                  help="k values, comma-separated (default 1, 2, 4, ... up to --samples, and --samples)")
    temperature: float = setting(0.8, help="sampling temperature")
    seed: int = setting(0, help="sampling and bootstrap seed")
    max_new_tokens: int = setting(96, parse="positive_int", help="tokens generated per sample at most")
    checker: str = setting("arithmetic", choices=CHECKERS, help="how a sample's final answer is checked")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples")
    problems_per_unit: int = setting(50, parse="positive_int",
                                     help="problems per unit of work (what a kill loses at most)")
    batch_size: int = setting(256, parse="positive_int", help="sequences per generate call")

    SUMMARY = ("bootstrap_resamples",)
    PERFORMANCE = ("problems_per_unit", "batch_size")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        _one_of("checker", self.checker, CHECKERS)
        for name in ("samples", "max_new_tokens", "bootstrap_resamples", "problems_per_unit", "batch_size"):
            _at_least(name, getattr(self, name), 1)
        if self.k is None:
            self.k = sorted({2 ** i for i in range(self.samples.bit_length()) if 2 ** i <= self.samples} | {self.samples})
        bad = [k for k in self.k if not 1 <= k <= self.samples]
        if bad:
            raise SettingError(f"`k` {','.join(map(str, bad))} must lie in 1..`samples` ({self.samples}): "
                               "pass@k needs that many draws per problem", "k", "samples")
        _positive("temperature", self.temperature)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}


@dataclass
class RouterUpdateConfig:
    """Settings of a router update, validated on construction.

    Examples:
        >>> from routelens import RouterUpdateConfig
        >>> RouterUpdateConfig(steps=100).steps
        100
        >>> RouterUpdateConfig(bins=["Fragile", "Hard"])
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: `bins`: unknown bin(s) Hard; `bins` are Confident, Ambiguous, Fragile
    """

    margin: float = setting(0.05, help="preferred route beats the standard by >= this probability")
    bins: list[str] = setting(factory=lambda: ["Fragile", "Ambiguous"], parse="names",
                              help="token bins to learn from, comma-separated")
    beta: float = setting(0.1, help="DPO beta")
    lr: float = setting(1e-5, help="Adam learning rate (a minimal update; 1e-4 and up moved most routes on the demo "
                                   "model)")
    steps: int = setting(300, parse="positive_int", help="optimizer steps")
    batch_size: int = setting(256, parse="positive_int", help="pairs per step")
    seed: int = setting(0, help="seed of the minibatch order")

    def __post_init__(self) -> None:
        self.check()

    def check(self) -> None:
        for name in ("steps", "batch_size"):
            _at_least(name, getattr(self, name), 1)
        unknown = [b for b in self.bins if b not in BINS]
        if unknown:
            raise SettingError(f"`bins`: unknown bin(s) {', '.join(unknown)}; `bins` are {', '.join(BINS)}", "bins")
        _positive("beta", self.beta)
        _positive("lr", self.lr)
        if not 0 <= self.margin < 1:
            raise SettingError(f"`margin` is a probability difference in [0, 1), got {self.margin}", "margin")


TOKEN_CHOICES = ("fragile", "all")   # rollout tokens: these, or a file of (trajectory_id, position, layer)


@dataclass
class RolloutConfig:
    """Settings of a rollout run (continuations under three routes of a scored token),
    validated on construction.

    Examples:
        >>> from routelens import RolloutConfig
        >>> RolloutConfig(samples=4, temperature=0).temperature
        0
        >>> RolloutConfig(tokens="some")
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: `tokens` must be fragile, all or a file of ... rows; 'some' is neither ...
    """

    tokens: str = setting("fragile", help="fragile (Fragile tokens whose best alternative wins by more than the "
                                          "run's tolerance), all, or a JSONL/Parquet/CSV file of trajectory_id, "
                                          "position, layer rows")
    samples: int = setting(8, parse="positive_int", help="continuations per arm and token (1 when greedy)")
    max_new_tokens: int = setting(64, parse="positive_int", help="tokens generated per continuation at most")
    temperature: float = setting(0.8, help="sampling temperature (0: greedy)")
    seed: int = setting(0, help="seed of the sampling and of the random alternative")
    checker: str = setting("arithmetic", choices=CHECKERS, help="how final answers are checked")
    limit: int | None = setting(None, parse="positive_int",
                                help="keep at most this many chosen tokens, those with the largest gains")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples of the intervals")

    SUMMARY = ("bootstrap_resamples",)

    def __post_init__(self) -> None:
        import os

        if self.tokens not in TOKEN_CHOICES and not os.path.isfile(str(self.tokens)):
            raise SettingError(f"`tokens` must be fragile, all or a file of (trajectory_id, position, layer) rows; "
                               f"{self.tokens!r} is neither and no such file exists", "tokens")
        for name in ("samples", "max_new_tokens", "bootstrap_resamples"):
            _at_least(name, getattr(self, name), 1)
        if self.limit is not None:
            _at_least("limit", self.limit, 1)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise SettingError(f"`temperature` must be 0 (greedy) or positive, got {self.temperature!r}", "temperature")
        _one_of("checker", self.checker, CHECKERS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY}


FINGERPRINT_KINDS = ("selection", "input")   # mean router selection distribution, or mean MoE input


@dataclass
class SemanticRouteConfig:
    """Settings of a semantic-routing run (route by similarity to per-domain fingerprints),
    validated on construction.

    Examples:
        >>> from routelens import SemanticRouteConfig
        >>> SemanticRouteConfig(layer_sets=[[3], [0, 3]]).layer_sets
        [[3], [0, 3]]
        >>> SemanticRouteConfig(kind="vibes")
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: `kind` must be one of selection, input, got 'vibes'
    """

    layer_sets: list[list[int]] | None = setting(
        None, parse="layer_sets", help="';'-separated sets of layers forced together, e.g. '3;0,1,2,3' (default: each "
                                       "MoE layer alone and all of them at once)")
    kind: str = setting("selection", choices=FINGERPRINT_KINDS,
                        help="fingerprint: mean router selection distribution or mean MoE input")
    calibration_share: float = setting(0.5, help="share of each domain's items that calibrate (seeded; the rest are "
                                                 "evaluated)")
    floor_seeds: int = setting(3, help="random-floor seeds")
    seed: int = setting(0, help="seed of the split, the floor and the bootstrap")
    accuracy: bool = setting(True, help="also generate greedy answers under each arm and check them (the arithmetic "
                                        "task)")
    max_new_tokens: int = setting(96, parse="positive_int", help="generated tokens per answer at most")
    score: str = setting("mean", choices=tuple(SCORES),
                         help="summary statistic: mean or first target-token log-prob")
    alpha: float = setting(0.05, help="FDR level")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples")
    memory_budget: int = setting(2 * 2**30, parse="memory", help="memory for one batch of forced routes, e.g. 8GiB")

    SUMMARY = ("alpha", "bootstrap_resamples", "score")
    PERFORMANCE = ("memory_budget",)

    def __post_init__(self) -> None:
        _one_of("score", self.score, tuple(SCORES))
        _at_least("max_new_tokens", self.max_new_tokens, 1)
        if self.layer_sets is not None:
            if not isinstance(self.layer_sets, (list, tuple)) or not self.layer_sets or not all(
                    _is_layer_list(s) and len(set(s)) == len(s) for s in self.layer_sets):
                raise SettingError("`layer_sets` must be non-empty sets of distinct layer indices such as "
                                   f"[[3], [0, 1, 2, 3]], got {self.layer_sets!r}", "layer_sets")
            self.layer_sets = [list(s) for s in self.layer_sets]
        _one_of("kind", self.kind, FINGERPRINT_KINDS)
        _fraction("calibration_share", self.calibration_share)
        _at_least("floor_seeds", self.floor_seeds, 0)
        _fraction("alpha", self.alpha)
        _at_least("bootstrap_resamples", self.bootstrap_resamples, 1)
        _at_least("memory_budget", self.memory_budget, 1)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}
