"""Run-time checks every run makes on the user's own checkpoint (not only in tests).

- The gating rule: `weights_for` applied to the experts the router chose must reproduce the
  weights the router returned. A wrong rule would weight every alternative route wrongly.
- Padding: sequences of unequal length share a right-padded forward; the first such group
  also runs its shortest sequence alone, which must give the same log-probs (`PaddingCheck`).
- The standard route: an engine's score of the standard route (route 0) must equal the
  natural forward's log-probability of the same token. A broken attention patch, a wrong
  attention window or a layout the engine misreads shows up here first.

Tolerances depend on the dtype the model computes in: fp32 noise between two orderings of
the same sums is ~1e-6 nats, far below the errors these checks exist to catch (0.06-0.3
nats for a wrong window); bf16/fp16 compare means as well as maxima, since a single token
of a long bf16 sequence can drift by more than a systematic error moves the mean.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from routelens.engine.readout import final_norm_states, target_log_probs
from routelens.errors import RuntimeCheckFailed


@dataclass(frozen=True)
class Tolerance:
    weight: float          # max |weights_for - router weights| (in the router's output dtype)
    logprob_max: float     # max |standard route - natural| in nats
    logprob_mean: float    # mean |standard route - natural| in nats


TOLERANCES = {
    torch.float32: Tolerance(weight=1e-5, logprob_max=2e-3, logprob_mean=2e-3),
    torch.float64: Tolerance(weight=1e-9, logprob_max=1e-6, logprob_mean=1e-6),
    torch.bfloat16: Tolerance(weight=2e-2, logprob_max=0.5, logprob_mean=0.05),
    torch.float16: Tolerance(weight=4e-3, logprob_max=0.1, logprob_mean=0.01),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])


def gating_rule_error(adapter, logits: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> float:
    """max |weights_for(logits, experts) - weights| over tokens: logits [N, E], experts/weights [N, k]."""
    if experts.numel() == 0:
        return 0.0
    rule = adapter.weights_for(logits.float(), experts.long()).to(weights.dtype).float()
    return float((rule - weights.float()).abs().max())


def check_gating_rule(adapter, layer: int, logits: torch.Tensor, experts: torch.Tensor,
                      weights: torch.Tensor) -> float:
    """Raise `RuntimeCheckFailed` unless the adapter's gating rule reproduces the router's own
    weights for the experts it chose; returns the largest difference."""
    error = gating_rule_error(adapter, logits, experts, weights)
    limit = tolerance_for(weights.dtype).weight
    if not error <= limit:
        raise RuntimeCheckFailed(
            f"gating rule check failed at layer {layer} ({adapter.config.model_type}, {type(adapter).__name__}): "
            f"weights_for on the router's own experts differs from the router's weights by {error:.3g} "
            f"(tolerance {limit:g} in {str(weights.dtype).removeprefix('torch.')}); the adapter's gating rule "
            "does not describe this checkpoint, so alternative routes would be weighted wrongly"
        )
    return error


def standard_route_error(scored: np.ndarray, natural: np.ndarray) -> tuple[float, float]:
    """(max, mean) |scored - natural| in nats over tokens."""
    difference = np.abs(np.asarray(scored, dtype=np.float64) - np.asarray(natural, dtype=np.float64))
    if difference.size == 0:
        return 0.0, 0.0
    if not np.isfinite(difference).all():
        return float("inf"), float("inf")
    return float(difference.max()), float(difference.mean())


def standard_route_mismatch(scored: np.ndarray, natural: np.ndarray, dtype: torch.dtype,
                            what: str = "the standard route's log-prob differs from the natural forward's") -> str | None:
    """None when the standard route's scores equal the natural forward's log-probs within the
    dtype's tolerance, else a clause saying by how much they differ (`what` names the two)."""
    largest, mean = standard_route_error(scored, natural)
    tolerance = tolerance_for(dtype)
    if largest <= tolerance.logprob_max and mean <= tolerance.logprob_mean:
        return None
    return (f"{what} by up to {largest:.3g} nats "
            f"(mean {mean:.3g}; tolerance {tolerance.logprob_max:g} max, {tolerance.logprob_mean:g} mean "
            f"in {str(dtype).removeprefix('torch.')})")


class PaddingNotInert(RuntimeCheckFailed):
    """A sequence scored as a row of a right-padded batch differs from the sequence alone:
    something in this model lets padding reach earlier positions, so sequences of unequal
    length must be scored one at a time."""


class PaddingCheck:
    """Whether sequences of unequal length may share a right-padded forward on this model.

    Causal attention keeps padding out of real positions in every served family, but a
    model that mixes positions another way (a non-causal layer, a batch-wide statistic)
    would shift every score of a padded row while the engines' own checks, made on the
    same padded pass, still agree. So the first group of unequal lengths also runs its
    shortest sequence alone (one forward, once per engine or scorer): its log-probs at the
    scored positions must equal the padded row's. `verdict` says how padding was checked;
    `failure` why it may not be used (then score one sequence at a time: exact either way)."""

    def __init__(self, adapter, memory_budget: int):
        self.adapter, self.memory_budget = adapter, int(memory_budget)
        self.verdict: str | None = None
        self.failure: str | None = None

    def due(self, lengths) -> bool:
        return self.verdict is None and self.failure is None and len(set(lengths)) > 1

    @torch.no_grad()
    def check(self, padded_states: torch.Tensor, sequences: list[torch.Tensor], positions: list) -> None:
        """padded_states [B, T, d]: the final norm's output of the right-padded forward of
        `sequences` ([T_b] each), scored at `positions` ([P_b] each). Raises `PaddingNotInert`.
        The shortest padded sequence with a scored position is checked; none: a later group's."""
        longest = max(len(ids) for ids in sequences)
        padded_rows = [b for b in range(len(sequences)) if len(sequences[b]) < longest and len(positions[b])]
        if not padded_rows:
            return
        row = min(padded_rows, key=lambda b: len(sequences[b]))
        ids = torch.as_tensor(sequences[row]).cpu()
        at = torch.as_tensor(np.asarray(positions[row]), dtype=torch.long)
        with final_norm_states(self.adapter) as alone:
            self.adapter.model(ids[None].to(self.adapter.device), use_cache=False, logits_to_keep=1)
        padded, alone = padded_states[row], alone["states"][0]
        targets = ids[at + 1]
        padded = target_log_probs(self.adapter, padded[at.to(padded.device)], targets, self.memory_budget)
        alone = target_log_probs(self.adapter, alone[at.to(alone.device)], targets, self.memory_budget)
        mismatch = standard_route_mismatch(padded, alone, model_dtype(self.adapter),
                                           what="a sequence's log-probs as a row of a right-padded batch differ "
                                                "from the sequence alone")
        if mismatch:
            self.failure = (f"{self.adapter.config.model_type}: {mismatch}; padding reaches real positions in this "
                            "model, so sequences of unequal length cannot share a forward")
            raise PaddingNotInert(self.failure)
        largest, _ = standard_route_error(padded, alone)
        self.verdict = f"right padding checked inert on this model (a padded row vs alone: {largest:.2g} nats)"

    def record(self, unit: str, grouping: str) -> dict:
        """What run.json says of how `unit`s (item, trajectory) shared forwards: `grouping`
        (e.g. "groups of up to 16 items") and how padding was checked; the fallback key only
        where this process fell back, so that merging the workers' checks keeps it."""
        if self.failure:
            return {f"{unit}_batching": f"one {unit} at a time (right padding is not inert on this model)",
                    f"{unit}_batching_fallback": f"one {unit} at a time: {self.failure}"}
        return {f"{unit}_batching": self.verdict or f"{grouping} (no padding was needed)"}


def model_dtype(adapter) -> torch.dtype:
    return adapter.lm_head.weight.dtype


class DeviationRecord:
    """The largest (max, mean) |standard route - natural| seen over a run, and the check itself."""

    def __init__(self, adapter):
        self.dtype = model_dtype(adapter)
        self.largest = (0.0, 0.0)

    def check(self, scored: np.ndarray, natural: np.ndarray) -> str | None:
        """Record one batch's deviation; the mismatch clause if it is beyond tolerance, else None."""
        largest, mean = standard_route_error(scored, natural)
        self.largest = (max(self.largest[0], largest), max(self.largest[1], mean))
        return standard_route_mismatch(scored, natural, self.dtype)
