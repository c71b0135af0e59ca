"""What an engine scores: one sequence's routes at one layer, or at several layers at once."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ScoreItem:
    """input_ids [L]; positions [P] (each scored for token t + 1); experts and weights
    [P, R, k] for routes at one layer, or [P, R, J, k] for joint routes at J layers (one
    route per listed layer, applied together); route 0 the standard route."""

    input_ids: torch.Tensor
    positions: np.ndarray
    experts: torch.Tensor
    weights: torch.Tensor


def joint_layers(layer: int | Sequence[int]) -> tuple[int, ...]:
    """The layers an engine call forces routes at: one layer, or several (ascending, distinct)."""
    if isinstance(layer, (int, np.integer)):
        return (int(layer),)
    layers = tuple(int(value) for value in layer)
    if not layers or list(layers) != sorted(set(layers)):
        raise ValueError(f"joint layers must be distinct and ascending, got {list(layers)}")
    return layers


def per_layer(routes, layer: int | Sequence[int]) -> torch.Tensor:
    """Routes as given for `layer` -> with a layer axis: [..., R, k] for one layer (an int)
    becomes [..., R, 1, k]; [..., R, J, k] for a list of J layers stays as it is."""
    routes = torch.as_tensor(routes)
    if isinstance(layer, (int, np.integer)):
        return routes.unsqueeze(-2)
    if routes.shape[-2] != len(joint_layers(layer)):
        raise ValueError(f"routes of shape {tuple(routes.shape)} do not hold one route per layer of {list(layer)}")
    return routes


def layer_label(layer: int | Sequence[int]) -> str:
    """'layer 3' for one layer, 'layers 1+2+3' for joint routes: for messages."""
    layers = joint_layers(layer)
    return f"layer {layers[0]}" if isinstance(layer, (int, np.integer)) else "layers " + "+".join(map(str, layers))


def joint_overrides(layers: Sequence[int], rows: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> dict:
    """One `RouteOverride` per layer: rows [N] flat token rows, experts/weights [N, J, k]
    (route j of each row forced at `layers[j]`)."""
    from routelens.models.routing import RouteOverride

    return {at: RouteOverride(rows, experts[:, j], weights[:, j]) for j, at in enumerate(layers)}
