"""Semantic routing's settings: each field is an option of `routelens semantic-route`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from routelens.config import (
    SCORES,
    at_least,
    fraction,
    is_layer_list,
    one_of,
    seed_value,
    setting,
    switch,
)
from routelens.errors import SettingError

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
    group_items: int = setting(4, parse="positive_int",
                               help="evaluation items of similar length sharing one forward and its scoring passes, at "
                                    "most (1: one item at a time; on CPU 4 is fastest, larger groups pad more)")

    SUMMARY = ("alpha", "bootstrap_resamples", "score")
    PERFORMANCE = ("memory_budget", "group_items")

    def __post_init__(self) -> None:
        one_of("score", self.score, tuple(SCORES))
        at_least("max_new_tokens", self.max_new_tokens, 1)
        if self.layer_sets is not None:
            if not isinstance(self.layer_sets, (list, tuple)) or not self.layer_sets or not all(
                    is_layer_list(s) for s in self.layer_sets):
                raise SettingError("`layer_sets` must be non-empty sets of distinct layer indices such as "
                                   f"[[3], [0, 1, 2, 3]], got {self.layer_sets!r}", "layer_sets")
            self.layer_sets = [list(s) for s in self.layer_sets]
            check_distinct_sets(self.layer_sets)
        one_of("kind", self.kind, FINGERPRINT_KINDS)
        fraction("calibration_share", self.calibration_share)
        at_least("floor_seeds", self.floor_seeds, 0)
        seed_value("seed", self.seed)
        switch("accuracy", self.accuracy)
        fraction("alpha", self.alpha)
        at_least("bootstrap_resamples", self.bootstrap_resamples, 1)
        at_least("memory_budget", self.memory_budget, 1)
        at_least("group_items", self.group_items, 1)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}


def check_distinct_sets(layer_sets: list[list[int]], resolved: list[list[int]] | None = None) -> None:
    """Each set names distinct layers and each set is given once (a set is an arm of the
    study: twice would count it twice). `resolved`: the same sets, element for element, as
    decoder-layer indices, where -1 and the last layer are one layer."""
    resolved = resolved or layer_sets
    shown = [",".join(map(str, s)) for s in layer_sets]
    for given, name, layers in zip(layer_sets, shown, resolved):
        repeated = next((layer for i, layer in enumerate(layers) if layer in layers[:i]), None)
        if repeated is not None:
            spelled = sorted({g for g, r in zip(given, layers) if r == repeated})
            raise SettingError(f"`layer_sets` set {name} names layer {repeated} twice"
                               + (f" (as {' and '.join(map(str, spelled))})" if len(spelled) > 1 else "")
                               + "; a set lists distinct layers, e.g. '3;0,1,2,3'", "layer_sets")
    seen: dict = {}
    for name, layers in zip(shown, resolved):
        if frozenset(layers) in seen:
            raise SettingError(f"`layer_sets` names the same set of layers twice ({seen[frozenset(layers)]} and {name}); "
                               "each set is one arm of the study: give it once", "layer_sets")
        seen[frozenset(layers)] = name
