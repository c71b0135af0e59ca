"""The replay audit's settings: each field is an option of `routelens replay`."""

from __future__ import annotations

from dataclasses import asdict, dataclass

from routelens.config import at_least, finite, fraction, seed_value, setting
from routelens.errors import SettingError

#: what `compare_to` takes: a second Hugging Face run of the same model, audited as an engine's routes
COMPARE_KINDS = ("dtype", "experts-implementation", "batch")
COMPARE_DTYPES = ("float32", "bfloat16", "float16")
COMPARE_EXPERTS = ("eager", "grouped_mm", "batched_mm")
COMPARE_FORMS = "dtype=bfloat16|float16|float32, experts-implementation=eager|grouped_mm|batched_mm or batch=N (N >= 2)"


def parse_compare_to(spec: str) -> tuple[str, str | int]:
    """`compare_to` as (kind, value): ("dtype", "bfloat16"), ("experts-implementation",
    "grouped_mm"), ("batch", 4); anything else is a one-line `SettingError`.

    Examples:
        >>> parse_compare_to("batch=4")
        ('batch', 4)
        >>> parse_compare_to("dtype=int8")
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: `compare_to` must be dtype=bfloat16|float16|float32, ... got 'dtype=int8'
    """
    if not isinstance(spec, str) or "=" not in spec:
        raise SettingError(f"`compare_to` must be {COMPARE_FORMS}, got {spec!r}", "compare_to")
    kind, _, value = (part.strip() for part in spec.partition("="))
    kind = kind.replace("_", "-")
    if kind == "dtype" and value in COMPARE_DTYPES:
        return kind, value
    if kind == "experts-implementation" and value in COMPARE_EXPERTS:
        return kind, value
    if kind == "batch" and value.isdigit() and int(value) >= 2:
        return kind, int(value)
    raise SettingError(f"`compare_to` must be {COMPARE_FORMS}, got {spec!r}", "compare_to")


@dataclass
class ReplayConfig:
    """Settings of a routing replay audit, validated on construction.

    Examples:
        >>> from routelens.analyses.replay.config import ReplayConfig
        >>> ReplayConfig(margin_bins=4).margin_bins
        4
        >>> ReplayConfig(fragile=0.95)
        Traceback (most recent call last):
        ...
        routelens.errors.SettingError: need 0 <= `fragile` (0.95) <= `confident` (0.9) <= 1
    """

    margin_bins: int = setting(5, parse="positive_int",
                               help="quantile bins of the router's margin (k-th minus (k+1)-th selection score of the "
                                    "natural run) in the flip-risk curve")
    confident: float = setting(0.9, help="Confident bin: the natural run's p of the next token >= this (counterfactual's "
                                         "default; its `bins standard` rule)")
    fragile: float = setting(0.5, help="Fragile bin: the natural run's p of the next token < this")
    seed: int = setting(0, help="seed of the bootstrap")
    bootstrap_resamples: int = setting(2000, parse="positive_int", help="bootstrap resamples of the intervals")
    confidence: float = setting(0.95, help="confidence level of the bootstrap intervals")

    # Settings that only change the summary (recomputed from the tables on every run): a run
    # folder resumes, or re-summarises, under other values of these (the bins' thresholds are
    # not among them: the tables carry each token's bin)
    SUMMARY = ("margin_bins", "seed", "bootstrap_resamples", "confidence")

    def __post_init__(self) -> None:
        at_least("margin_bins", self.margin_bins, 1)
        at_least("bootstrap_resamples", self.bootstrap_resamples, 1)
        for name in ("fragile", "confident"):
            finite(name, getattr(self, name))
        if not 0 <= self.fragile <= self.confident <= 1:
            raise SettingError(f"need 0 <= `fragile` ({self.fragile}) <= `confident` ({self.confident}) <= 1",
                               "fragile", "confident")
        seed_value("seed", self.seed)
        fraction("confidence", self.confidence)

    def identity(self) -> dict:
        return {k: v for k, v in asdict(self).items() if k not in self.SUMMARY}

    def summary_settings(self) -> dict:
        return {k: getattr(self, k) for k in self.SUMMARY}
