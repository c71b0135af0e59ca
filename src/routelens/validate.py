"""The Python API's arguments, checked where they come in: before any model loads, any file
is read for work or anything is written.

An analysis' settings are checked by its config dataclass (the validators of
`routelens.config`); this module checks the other arguments of the entry points
(`routelens.load`, `Lens.capture`/`force`, the trajectory builders, the analyses): paths,
model specs, layer lists, token ids, routes and positions. A bad one is a one-line
`SettingError` that names the parameter as Python spells it, says what is expected and
shows what was given (`` `layers` must be a list of layer indices such as [0, -1] ...,
got 3 ``), never an AttributeError or a TypeError from deep inside. This module imports
nothing heavy: tensors are recognised by their `tolist`.

Examples:
    >>> from routelens import validate
    >>> validate.count(4, "n")
    4
    >>> try:
    ...     validate.count(0, "n")
    ... except validate.SettingError as error:
    ...     print(error)
    `n` must be an integer >= 1, got 0
"""

from __future__ import annotations

import math
import numbers
import os
from collections.abc import Iterable, Mapping

from routelens.config import at_least, seed_value, switch
from routelens.errors import SettingError

__all__ = ["SettingError", "count", "flag", "layer", "layers", "model_spec", "names", "objects", "path", "positions",
           "routes", "seed", "shown", "temperature", "token_ids", "weights"]

LAYERS_EXPECTED = "a list of layer indices such as [0, -1] (one layer: [3]; negative counts from the end)"


def shown(value, limit: int = 60) -> str:
    """`value` as a short one-line repr (a tensor's repr spans lines; a long list is cut)."""
    text = " ".join(repr(value).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def is_int(value) -> bool:
    """A Python or NumPy integer, not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _plain(value):
    """A tensor or an array as nested lists (its elements Python numbers); anything else as is."""
    return value.tolist() if hasattr(value, "tolist") and not isinstance(value, (str, bytes)) else value


def _sequence(value) -> bool:
    return isinstance(value, (list, tuple))


# ---------------------------------------------------------------------------- scalars
def flag(value, name: str) -> bool:
    switch(name, value)
    return value


def count(value, name: str, low: int = 1, *, optional: bool = False) -> int | None:
    """An integer >= `low` (None passes when `optional`)."""
    if value is None and optional:
        return None
    at_least(name, value, low)
    return int(value)


def seed(value, name: str = "seed") -> int:
    seed_value(name, value)
    return value


def temperature(value, name: str = "temperature") -> float:
    """A sampling temperature: a finite number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < value < math.inf:
        raise SettingError(f"`{name}` must be a finite number > 0 (the sampling temperature), got {shown(value)}", name)
    return float(value)


# ---------------------------------------------------------------------------- paths and models
def path(value, name: str, *, optional: bool = False) -> str | None:
    """A file or folder path: a non-empty str or os.PathLike (None passes when `optional`)."""
    if value is None and optional:
        return None
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        given = "an empty string" if isinstance(value, str) else f"{type(value).__name__} {shown(value)}"
        raise SettingError(f"`{name}` must be a path (a non-empty str or os.PathLike), got {given}", name)
    return value


def model_spec(value, name: str = "model") -> str:
    """What `load` takes: "demo", a folder written by save_pretrained, a hub id or "tiny:<model_type>"."""
    if isinstance(value, os.PathLike):
        value = os.fspath(value)
    if not isinstance(value, str) or not value.strip():
        given = "an empty string" if isinstance(value, str) else f"{type(value).__name__} {shown(value)}"
        raise SettingError(f"`{name}` must name a model: \"demo\", a folder written by save_pretrained, a hub id "
                           f"such as 'allenai/OLMoE-1B-7B-0924' or \"tiny:<model_type>\"; got {given}", name)
    return value


def names(value, name: str, *, optional: bool = True) -> list[str] | None:
    """A non-empty list of non-empty strings (domains); None passes when `optional`."""
    if value is None and optional:
        return None
    if not _sequence(value) or not value or not all(isinstance(v, str) and v.strip() for v in value):
        raise SettingError(f"`{name}` must be a non-empty list of names such as ['mul', 'addsub'], got {shown(value)}",
                           name)
    return list(value)


def objects(value, name: str, kind: type, expected: str) -> list:
    """A non-empty list (or other iterable that is neither text nor a mapping) of `kind`."""
    if isinstance(value, (str, bytes, Mapping)) or not isinstance(value, Iterable):
        raise SettingError(f"`{name}` must be {expected}, got {type(value).__name__} {shown(value)}", name)
    value = list(value)
    if not value:
        raise SettingError(f"`{name}` is empty; give at least one ({expected})", name)
    wrong = next((v for v in value if not isinstance(v, kind)), None)
    if wrong is not None:
        raise SettingError(f"`{name}` must be {expected}; it holds a {type(wrong).__name__} {shown(wrong)}", name)
    return value


# ---------------------------------------------------------------------------- layers
def layers(value, adapter, name: str = "layers") -> list[int]:
    """A non-empty list of layer indices, resolved to the model's decoder-layer indices
    (negative counts from the end): a dense or out-of-range layer, or one layer named
    twice, is refused."""
    value = _plain(value)
    if not _sequence(value) or not value or not all(is_int(v) for v in value):
        raise SettingError(f"`{name}` must be {LAYERS_EXPECTED}, got {shown(value)}", name)
    return distinct_layers([int(v) for v in value], adapter, name)


def distinct_layers(value: list[int], adapter, name: str) -> list[int]:
    """`value` resolved by the adapter; a layer named twice (0 and -4 of four layers) refused."""
    resolved = [adapter.resolve_layers([v])[0] for v in value]
    twice = sorted({r for r in resolved if resolved.count(r) > 1})
    if twice:
        raise SettingError(f"`{name}` {value} name{'s' if len(twice) == 1 else ''} layer{'s' if len(twice) > 1 else ''} "
                           f"{', '.join(map(str, twice))} twice; give each layer once", name)
    return resolved


def layer(value, adapter, name: str = "layer") -> int:
    """One layer index (negative counts from the end), resolved; a dense or out-of-range one refused."""
    if not is_int(value):
        raise SettingError(f"`{name}` must be one layer index such as -1 (an integer; negative counts from the end), "
                           f"got {shown(value)}", name)
    return adapter.resolve_layers([int(value)])[0]


# ---------------------------------------------------------------------------- token ids
def token_ids(value, name: str, vocab_size: int | None = None, where: str = "") -> list[int]:
    """A non-empty sequence of token ids: integers in 0..vocab_size - 1 (>= 0 without a vocabulary)."""
    value = _plain(value)
    at = f" ({where})" if where else ""
    if not _sequence(value) or not value:
        raise SettingError(f"`{name}`{at} must be a non-empty list of token ids (integers), got {shown(value)}", name)
    wrong = next((v for v in value if not is_int(v)), None)
    if wrong is not None:
        raise SettingError(f"`{name}`{at} must hold token ids (integers); it holds {type(wrong).__name__} "
                           f"{shown(wrong)}", name)
    outside = next((v for v in value if v < 0 or (vocab_size is not None and v >= vocab_size)), None)
    if outside is not None:
        allowed = f"lie in 0..{vocab_size - 1} (the model's vocabulary)" if vocab_size is not None else "count from 0"
        raise SettingError(f"`{name}`{at}: token id {outside}: token ids must {allowed}", name)
    return [int(v) for v in value]


def input_ids(ids, vocab_size: int) -> None:
    """What a forward inside `Lens.capture` / `Lens.force` is given: input ids [batch, length],
    an integer tensor, not empty, every id in the vocabulary."""
    import torch

    name = "input_ids"
    if not isinstance(ids, torch.Tensor):
        raise SettingError(f"`{name}` must be a tensor of token ids [batch, length] (e.g. lens.encode(text)), "
                           f"got {type(ids).__name__}", name)
    if ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
        raise SettingError(f"`{name}` must hold integer token ids (torch.long), got dtype {ids.dtype}; "
                           "convert with .long()", name)
    if ids.dim() != 2:
        raise SettingError(f"`{name}` must have shape [batch, length], got {list(ids.shape)}"
                           f"{'; add the batch dimension with ids[None]' if ids.dim() == 1 else ''}", name)
    if ids.numel() == 0:
        raise SettingError(f"`{name}` is empty (shape {list(ids.shape)}); give at least one token", name)
    low, high = int(ids.min()), int(ids.max())
    if low < 0 or high >= vocab_size:
        raise SettingError(f"`{name}`: token id {low if low < 0 else high} is outside 0..{vocab_size - 1} "
                           "(the model's vocabulary)", name)


# ---------------------------------------------------------------------------- routes
def positions(value, name: str = "positions") -> list[tuple[int, int]]:
    """A non-empty list of distinct (batch row, position) pairs of integers >= 0."""
    value = _plain(value)
    expected = "a non-empty list of (batch row, position) pairs such as [(0, 3)]"
    if not _sequence(value) or not value:
        raise SettingError(f"`{name}` must be {expected}, got {shown(value)}", name)
    pairs = []
    for pair in value:
        if not _sequence(pair) or len(pair) != 2 or not all(is_int(v) for v in pair):
            raise SettingError(f"`{name}` must be {expected}; {shown(pair)} is not a pair of integers", name)
        if min(pair) < 0:
            raise SettingError(f"`{name}` {tuple(pair)}: batch rows and positions count from 0 (no negative index)",
                               name)
        pairs.append((int(pair[0]), int(pair[1])))
    twice = next((p for p in pairs if pairs.count(p) > 1), None)
    if twice is not None:
        raise SettingError(f"`{name}` names {twice} twice; a token takes one route", name)
    return pairs


def routes(value, rows: int, top_k: int, num_experts: int, name: str = "experts") -> list[list[int]]:
    """One route per position: `top_k` distinct expert ids in 0..num_experts - 1 (integers)."""
    value = _plain(value)
    expected = f"one list of {top_k} expert ids (the model's top-k, all distinct) per position"
    if not _sequence(value) or not all(_sequence(row) for row in value):
        raise SettingError(f"`{name}` must be {expected}, got {shown(value)}", name)
    if len(value) != rows or any(len(row) != top_k for row in value):
        raise SettingError(f"`{name}` must be {expected}; got {[len(row) for row in value]} expert(s) for "
                           f"{rows} position(s)", name)
    for row in value:
        wrong = next((v for v in row if not is_int(v)), None)
        if wrong is not None:
            raise SettingError(f"`{name}` must hold expert ids (integers); {shown(row)} holds {type(wrong).__name__} "
                               f"{shown(wrong)}", name)
        if any(not 0 <= v < num_experts for v in row):
            raise SettingError(f"`{name}` {shown(row)}: expert ids must lie in 0..{num_experts - 1}", name)
        if len(set(row)) != len(row):
            raise SettingError(f"`{name}` {shown(row)}: the experts of a route must be distinct (a route is k "
                               "different experts)", name)
    return [[int(v) for v in row] for row in value]


def weights(value, rows: int, top_k: int, name: str = "weights") -> list[list[float]]:
    """One weight per expert of each route: finite numbers >= 0, shaped like the experts."""
    value = _plain(value)
    if not _sequence(value) or not all(_sequence(row) for row in value) or len(value) != rows or \
            any(len(row) != top_k for row in value):
        got = [len(row) for row in value] if _sequence(value) and all(_sequence(r) for r in value) else shown(value)
        raise SettingError(f"`{name}` must have the shape of the experts ({rows} list(s) of {top_k} numbers), "
                           f"got {got}", name)
    for row in value:
        if any(isinstance(v, bool) or not isinstance(v, numbers.Real) or not math.isfinite(v) or v < 0 for v in row):
            raise SettingError(f"`{name}` {shown(row)}: weights must be finite numbers >= 0", name)
    return [[float(v) for v in row] for row in value]
