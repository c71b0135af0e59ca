"""pass@k's settings: each field is an option of `routelens passk`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from routelens.config import (
    CHECKERS,
    at_least,
    one_of,
    positive,
    seed_value,
    setting,
)
from routelens.errors import SettingError


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
        one_of("checker", self.checker, CHECKERS)
        for name in ("samples", "max_new_tokens", "bootstrap_resamples", "problems_per_unit", "batch_size"):
            at_least(name, getattr(self, name), 1)
        if isinstance(self.k, int) and not isinstance(self.k, bool):
            self.k = [self.k]
        if self.k is not None and (not isinstance(self.k, (list, tuple)) or not self.k or not all(
                isinstance(k, int) and not isinstance(k, bool) for k in self.k)):
            raise SettingError(f"`k` must be an integer or a list of integers such as [1, 4, 16], got {self.k!r}", "k")
        if self.k is None:
            self.k = sorted({2 ** i for i in range(self.samples.bit_length()) if 2 ** i <= self.samples} | {self.samples})
        bad = [k for k in self.k if not 1 <= k <= self.samples]
        if bad:
            raise SettingError(f"`k` {','.join(map(str, bad))} must lie in 1..`samples` ({self.samples}): "
                               "pass@k needs that many draws per problem", "k", "samples")
        positive("temperature", self.temperature)
        seed_value("seed", self.seed)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY + self.PERFORMANCE}
