"""What the settings of every analysis share: `setting` (a config field with what its
command-line option needs), the validators, and the names of bins, engines, scores and
checkers. Each analysis keeps its own config dataclass in its folder
(`routelens.analyses.<name>.config`).

A field's name is its command-line option (`routes` is `--routes`): the command line's
options are generated from these fields (`routelens.cli.parsing.config_options`), with the
help text each field declares through `setting`. A bad value raises `SettingError` on
construction, naming the parameter (`` `routes` must be ... ``); the command line shows
the same message with the option (`--routes must be ...`). This module imports nothing
heavy, so the command line reads its options from here without loading torch.
"""

from __future__ import annotations

import math
from dataclasses import MISSING, field

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


def at_least(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise SettingError(f"`{name}` must be an integer >= {low}, got {value!r}", name)


def finite(name: str, value) -> None:
    """A real number, not nan or infinite (argparse's float reads "nan" and "inf")."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise SettingError(f"`{name}` must be a finite number, got {value!r}", name)


def positive(name: str, value) -> None:
    finite(name, value)
    if not value > 0:
        raise SettingError(f"`{name}` must be positive, got {value!r}", name)


# every seed feeds numpy's and torch's generators; numpy's legacy seeding (the demo model's
# training) takes 0..2**32 - 1, and one range for every command keeps a seed portable
SEED_MAX = 2**32 - 1


def seed_value(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= SEED_MAX:
        raise SettingError(f"`{name}` must be an integer in 0..{SEED_MAX} (2**32 - 1), got {value!r}", name)


def fraction(name: str, value) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise SettingError(f"`{name}` must lie strictly between 0 and 1, got {value!r}", name)


def one_of(name: str, value, allowed) -> None:
    if value not in allowed:
        raise SettingError(f"`{name}` must be one of {', '.join(allowed)}, got {value!r}", name)


def switch(name: str, value) -> None:
    if not isinstance(value, bool):
        raise SettingError(f"`{name}` must be True or False, got {value!r}", name)


def is_layer_list(value) -> bool:
    """A non-empty list (or tuple) of layer indices."""
    return isinstance(value, (list, tuple)) and bool(value) and all(
        isinstance(x, int) and not isinstance(x, bool) for x in value)
