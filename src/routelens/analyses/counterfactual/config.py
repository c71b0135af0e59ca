"""The counterfactual analysis' settings: each field is an option of `routelens counterfactual`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from routelens.config import (
    ENGINE_NAMES,
    at_least,
    finite,
    fraction,
    is_layer_list,
    one_of,
    positive,
    seed_value,
    setting,
)
from routelens.errors import SettingError

ALTERNATIVE_WEIGHTS = ("model", "matched-mass")
BIN_RULES = ("route-mean", "standard")


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

    layers: list[int] | None = setting(None, parse="int_list",
                                       help="decoder-layer indices, comma-separated; negative counts from the end "
                                            "(default -1: the last layer; with joint_layers: those)")
    joint_layers: list[int] | None = setting(
        None, parse="int_list", help="score each of these layers alone and, in the same run, routes forced at all of "
                                     "them at once (one independently sampled alternative per layer), e.g. 0,1,2")
    routes: int = setting(32, parse="positive_int", help="alternative routes S per token")
    null_routes: int = setting(32, parse="count",
                               help="uniform null routes N per token, scored in the same pass: k candidates drawn "
                                    "uniformly (the router's preference ignored), weighted like the alternatives; the "
                                    "yardstick of 'does the router beat chance' (0: none)")
    candidates: int | None = setting(None, parse="positive_int",
                                     help="sample alternatives from the router's top-M experts (default min(32, E))")
    gumbel_temperature: float = setting(1.0, help="temperature of the Gumbel-top-k route sampler (higher: flatter; "
                                                  "not a sampling temperature of text)")
    seed: int = setting(0, help="seed of the route sampling and the bootstrap")
    alternative_weights: str = setting(
        "model", choices=ALTERNATIVE_WEIGHTS,
        help="weights of an alternative route: model (the gating rule's weights for its experts, the paper's "
             "definition) or matched-mass (those weights rescaled to the standard route's total gate mass, so that "
             "no route wins by a larger output)")
    bins: str = setting("route-mean", choices=BIN_RULES,
                        help="bin tokens by route-mean (the route-averaged p, the paper's definition) or standard (the "
                             "standard route's p); the summary counts the tokens the other rule bins elsewhere")
    confident: float = setting(0.9, help="Confident bin: binned p >= this")
    fragile: float = setting(0.5, help="Fragile bin: binned p < this")
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
    precision_audit: int = setting(
        4, parse="count", help="bf16/fp16 models: the first N trajectories have tokens re-scored under every sampled "
                               "route in a float32 shadow of the model, which finds scores resting on a router above "
                               "the layer that bf16 rounding flipped (0: no audit; nothing to audit in float32)")
    precision_audit_tokens: int = setting(1, parse="positive_int",
                                          help="tokens per audited trajectory and layer (drawn with the seed)")
    check_rows: int = setting(
        256, parse="positive_int",
        help="run-time checks of the gating rule and the fast engine's block algebra: rows per layer each looks at in "
             "a run, chosen deterministically (extreme gate masses and weights, every expert's heaviest use, then "
             "evenly spaced over the first groups' trajectories); recorded in run.json's checks")
    max_fallback_time: float = setting(
        600.0, help="seconds a slower engine may score after a failed check before the run stops with what it "
                    "scored kept (0: no bound)")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples of the intervals")
    confidence: float = setting(0.95, help="confidence level of the bootstrap intervals (the adjusted gain interval "
                                           "spends 1 - confidence over the table's cells)")

    def __post_init__(self) -> None:
        if self.joint_layers is not None:
            if not is_layer_list(self.joint_layers) or len(set(self.joint_layers)) < 2:
                raise SettingError(f"`joint_layers` must list two or more distinct layers such as 0,1,2, "
                                   f"got {self.joint_layers!r}", "joint_layers")
            self.joint_layers = list(self.joint_layers)
            if self.layers is not None and is_layer_list(self.layers) and list(self.layers) != self.joint_layers:
                raise SettingError("`joint_layers` and `layers` together: `joint_layers` scores each of them alone as "
                                   "well (the comparison needs it); give `joint_layers` alone",
                                   "joint_layers", "layers")
        if self.layers is None:   # not given: the last layer, or the joint layers each alone
            self.layers = [-1] if self.joint_layers is None else list(self.joint_layers)
        if not is_layer_list(self.layers):
            raise SettingError(f"`layers` must be a non-empty list of layer indices such as [0, -1], got {self.layers!r}",
                               "layers")
        self.layers = list(self.layers)
        at_least("routes", self.routes, 1)
        at_least("null_routes", self.null_routes, 0)
        one_of("bins", self.bins, BIN_RULES)
        if self.candidates is not None:
            at_least("candidates", self.candidates, 1)
        positive("gumbel_temperature", self.gumbel_temperature)
        seed_value("seed", self.seed)
        for name in ("win_tolerance", "fragile", "confident"):
            finite(name, getattr(self, name))
        if self.only_step_ok not in (None, True, False):
            raise SettingError(f"`only_step_ok` must be True, False or None (when every trajectory has step checks), "
                               f"got {self.only_step_ok!r}", "only_step_ok")
        if not 0 <= self.win_tolerance < 1:
            raise SettingError(f"`win_tolerance` is a probability difference in [0, 1), got {self.win_tolerance}",
                               "win_tolerance")
        if not 0 <= self.fragile <= self.confident <= 1:
            raise SettingError(f"need 0 <= `fragile` ({self.fragile}) <= `confident` ({self.confident}) <= 1",
                               "fragile", "confident")
        one_of("engine", self.engine, ENGINE_NAMES)
        for name in ("route_batch_size", "memory_budget", "group_tokens", "bootstrap_resamples",
                     "precision_audit_tokens", "check_rows"):
            at_least(name, getattr(self, name), 1)
        at_least("precision_audit", self.precision_audit, 0)
        finite("max_fallback_time", self.max_fallback_time)
        if self.max_fallback_time < 0:
            raise SettingError(f"`max_fallback_time` is seconds >= 0 (0: no bound), got {self.max_fallback_time}",
                               "max_fallback_time")
        fraction("confidence", self.confidence)
        one_of("alternative_weights", self.alternative_weights, ALTERNATIVE_WEIGHTS)

    def candidates_for(self, num_experts: int) -> int:
        return self.candidates if self.candidates is not None else min(32, num_experts)

    # Knobs that change speed and memory but not results (tested): not part of a run's identity,
    # so a run resumes under another memory budget.
    PERFORMANCE = ("route_batch_size", "memory_budget", "group_tokens", "max_fallback_time", "check_rows")

    def to_dict(self) -> dict:
        # settings added later only where they differ from their default: run folders made
        # before they existed resume unchanged
        # (null_routes and precision_audit are not: runs made before them have other tables, so they
        # differ from any new run)
        added = {"joint_layers": None, "confidence": 0.95, "alternative_weights": "model", "bins": "route-mean"}
        return {k: v for k, v in asdict(self).items()
                if k not in self.PERFORMANCE and not (k in added and v == added[k])}

    def performance(self) -> dict:
        return {k: getattr(self, k) for k in self.PERFORMANCE}
