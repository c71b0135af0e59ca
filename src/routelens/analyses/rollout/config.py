"""The rollouts' settings: each field is an option of `routelens rollout`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from routelens.config import (
    CHECKERS,
    at_least,
    one_of,
    setting,
)
from routelens.errors import SettingError

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
            at_least(name, getattr(self, name), 1)
        if self.limit is not None:
            at_least("limit", self.limit, 1)
        if isinstance(self.temperature, bool) or not isinstance(self.temperature, (int, float)) or self.temperature < 0:
            raise SettingError(f"`temperature` must be 0 (greedy) or positive, got {self.temperature!r}", "temperature")
        one_of("checker", self.checker, CHECKERS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY}
