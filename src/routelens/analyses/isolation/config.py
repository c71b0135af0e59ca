"""The isolation study's settings: each field is an option of `routelens isolate`."""

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
    floor_seeds: int = setting(5, help="random-routing floors, one condition per seed: uniformly random k-expert routes "
                                       "per token (gating-rule weights) and, with equal_compute, one uniformly random "
                                       "expert per token at weight 1.0")
    equal_compute: bool = setting(True, help="also score the equal-compute arms: each expert forced at the natural "
                                             "route's gate mass, and the single-expert floor, against which harmful and "
                                             "helpful are judged (about twice the passes; off: the forced expert against "
                                             "natural routing and the k-expert floor only, no verdict)")
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
        if self.layers is not None and not is_layer_list(self.layers):
            raise SettingError(f"`layers` must be None (every MoE layer) or a non-empty list of layer indices, "
                               f"got {self.layers!r}", "layers")
        for name in ("bootstrap_resamples", "group_items", "memory_budget"):
            at_least(name, getattr(self, name), 1)
        at_least("floor_seeds", self.floor_seeds, 0)
        seed_value("seed", self.seed)
        switch("equal_compute", self.equal_compute)
        if self.equal_compute and self.floor_seeds == 0:
            raise SettingError("`floor_seeds` 0 leaves the equal-compute arms without their single-expert floor (the "
                               "verdict's baseline): use `floor_seeds` >= 1, or turn the arms off (equal_compute=False, "
                               "--no-equal-compute)", "floor_seeds")
        fraction("alpha", self.alpha)
        one_of("score", self.score, tuple(SCORES))

    def identity(self) -> dict:
        # equal_compute only where on: a run made before the equal-compute arms is a run with
        # them off, so its folder resumes (or re-summarises) under equal_compute=False
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE
                and not (k == "equal_compute" and not v)}

    def summary_settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SUMMARY}
