"""What an engine scores: one sequence's routes at one layer."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass
class ScoreItem:
    """input_ids [L]; positions [P] (each scored for token t + 1); experts and weights
    [P, R, k], route 0 the standard route."""

    input_ids: torch.Tensor
    positions: np.ndarray
    experts: torch.Tensor
    weights: torch.Tensor
