"""The rollouts' settings: each field is an option of `routelens rollout`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from routelens.config import (
    CHECKERS,
    at_least,
    finite,
    one_of,
    seed_value,
    setting,
)
from routelens.errors import SettingError

# rollout tokens: these, or a file of (trajectory_id, position, layer). fragile-all and random
# do not look at the token's gain (the proxy's own measure); fragile does.
TOKEN_CHOICES = ("fragile-all", "random", "fragile", "all")
SAMPLED_SELECTIONS = ("fragile-all", "random")   # `limit` keeps a seeded sample of these, not the largest gains
# how the best alternative is picked: top-tokens without the trajectory's next token, realized with it (an oracle)
BEST_BY = ("top-tokens", "realized")


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
        routelens.errors.SettingError: `tokens` must be fragile-all, random, fragile, all or a file of ... rows; 'some' is ...
    """

    tokens: str = setting("fragile-all", help="fragile-all (every Fragile token, whatever its gain), random (a seeded "
                                              "sample of `limit` scored tokens), fragile (Fragile tokens whose best "
                                              "alternative wins by more than the run's tolerance: chosen by the "
                                              "proxy's own gain), all, or a JSONL/Parquet/CSV file of trajectory_id, "
                                              "position, layer rows")
    best_by: str = setting("top-tokens", choices=BEST_BY,
                           help="the best alternative: top-tokens (the highest mean p over the standard route's "
                                "`top_tokens` most probable next tokens, chosen without the trajectory's next token) "
                                "or realized (the highest log p of the trajectory's next token in the run: an oracle "
                                "for the proxy's target)")
    top_tokens: int = setting(5, parse="positive_int", help="top-tokens: how many of the standard route's most probable "
                                                            "next tokens score an alternative")
    include_wrong: bool = setting(False, help="also roll out tokens of trajectories whose final answer is wrong (their "
                                              "record's verified, else the checker on the completion)")
    samples: int = setting(8, parse="positive_int", help="continuations per arm and token (1 when greedy)")
    max_new_tokens: int = setting(64, parse="positive_int", help="tokens generated per continuation at most")
    temperature: float = setting(0.8, help="sampling temperature (0: greedy)")
    seed: int = setting(0, help="seed of the sampling and of the random alternative")
    checker: str = setting("arithmetic", choices=CHECKERS, help="how final answers are checked")
    limit: int | None = setting(None, parse="positive_int",
                                help="keep at most this many chosen tokens: a seeded sample under fragile-all and "
                                     "random, those with the largest gains otherwise")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples of the intervals")

    SUMMARY = ("bootstrap_resamples",)

    def __post_init__(self) -> None:
        import os

        if self.tokens not in TOKEN_CHOICES and os.path.isdir(str(self.tokens)):
            raise SettingError(f"`tokens` {self.tokens} is a folder; give a file of (trajectory_id, position, layer) "
                               "rows (JSONL, Parquet or CSV)", "tokens")
        if self.tokens not in TOKEN_CHOICES and not os.path.isfile(str(self.tokens)):
            raise SettingError(f"`tokens` must be {', '.join(TOKEN_CHOICES)} or a file of (trajectory_id, position, "
                               f"layer) rows; {self.tokens!r} is none of them and no such file exists", "tokens")
        for name in ("samples", "max_new_tokens", "bootstrap_resamples", "top_tokens"):
            at_least(name, getattr(self, name), 1)
        if self.limit is not None:
            at_least("limit", self.limit, 1)
        elif self.tokens == "random":
            raise SettingError("`tokens` random draws `limit` tokens: give `limit` (how many)", "tokens", "limit")
        one_of("best_by", self.best_by, BEST_BY)
        if not isinstance(self.include_wrong, bool):
            raise SettingError(f"`include_wrong` must be True or False, got {self.include_wrong!r}", "include_wrong")
        finite("temperature", self.temperature)
        if self.temperature < 0:
            raise SettingError(f"`temperature` must be 0 (greedy) or positive, got {self.temperature!r}", "temperature")
        seed_value("seed", self.seed)
        one_of("checker", self.checker, CHECKERS)

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    @property
    def selection_uses_gain(self) -> bool:
        """Whether the chosen tokens depend on their proxy gain (a file: as its author chose)."""
        return self.tokens == "fragile" or (self.limit is not None and self.tokens not in SAMPLED_SELECTIONS)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY}
