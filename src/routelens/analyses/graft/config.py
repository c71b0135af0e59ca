"""The graft evaluation's settings: each field is an option of `routelens graft --evaluate`."""

from __future__ import annotations

from dataclasses import dataclass

from routelens.config import at_least, fraction, setting


@dataclass
class GraftEvaluationConfig:
    """Settings of a graft evaluation, validated on construction.

    Examples:
        >>> from routelens.analyses.graft.config import GraftEvaluationConfig
        >>> GraftEvaluationConfig(alpha=2.0)
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: `alpha` must lie strictly between 0 and 1, got 2.0
    """

    seed: int = setting(0, help="seed of the bootstrap")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples of the intervals")
    alpha: float = setting(0.05, help="FDR level of the BH step-up over the grafted slots' tests")
    group_items: int = setting(16, parse="positive_int",
                               help="items of similar length sharing one forward and its scoring passes, at most (1: "
                                    "one item at a time)")

    def __post_init__(self) -> None:
        at_least("bootstrap_resamples", self.bootstrap_resamples, 1)
        fraction("alpha", self.alpha)
        at_least("group_items", self.group_items, 1)
