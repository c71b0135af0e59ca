"""The router update's settings: each field is an option of `routelens router-update`."""

from __future__ import annotations

from dataclasses import dataclass

from routelens.config import (
    BINS,
    at_least,
    positive,
    seed_value,
    setting,
)
from routelens.errors import SettingError


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
            at_least(name, getattr(self, name), 1)
        unknown = [b for b in self.bins if b not in BINS]
        if unknown:
            raise SettingError(f"`bins`: unknown bin(s) {', '.join(unknown)}; `bins` are {', '.join(BINS)}", "bins")
        positive("beta", self.beta)
        positive("lr", self.lr)
        seed_value("seed", self.seed)
        if not 0 <= self.margin < 1:
            raise SettingError(f"`margin` is a probability difference in [0, 1), got {self.margin}", "margin")
