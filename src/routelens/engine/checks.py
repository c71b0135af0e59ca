"""Run-time checks every run makes on the user's own checkpoint (not only in tests).

- The gating rule: `weights_for` applied to the experts the router chose must reproduce the
  weights the router returned. A wrong rule would weight every alternative route wrongly.
  A run checks a bounded number of rows per layer (`GatingCheck`, `check_rows`), chosen by
  `sample_rows`, so the check costs the same at any size.
- Padding: sequences of unequal length share a right-padded forward; the first such group
  also runs its shortest sequence alone, which must give the same log-probs (`PaddingCheck`).
- The standard route: an engine's score of the standard route (route 0) must equal the
  natural forward's log-probability of the same token. A broken attention patch, a wrong
  attention window or a layout the engine misreads shows up here first.

The standard-route tolerance is measured on the model at hand, not taken from a table:
the first check of a run compares the natural forward of a few sequences in the model's
dtype with a higher-precision shadow of the same forward (`routelens.engine.precision`),
and sets the tolerance to a multiple of that noise (max and mean; never below the dtype's
floor). Two correct computations of the same route in bf16 differ by up to about twice
what either differs from the exact value, so a correct engine stays inside, while a
systematic error (a wrong window, a broken patch) moves the mean by more than the dtype's
noise does. Where no shadow can run (offloaded weights), the dtype's fixed tolerance holds.

In bf16/fp16 a miss of the maximum alone, with the mean inside its tolerance, is a tail of
tokens whose routes flipped under rounding, not a broken engine: the run continues, the
tokens beyond the tolerance are flagged (`small_miss`), and run.json counts them. A miss of
the mean, or any miss in float32, is a broken engine: the engine falls back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch

from routelens.engine.readout import final_norm_states, target_log_probs
from routelens.errors import RuntimeCheckFailed
from routelens.models.adapter import SOFTMAX_ATTENTION


@dataclass(frozen=True)
class Tolerance:
    weight: float          # max |weights_for - router weights| (in the router's output dtype)
    logprob_max: float     # max |standard route - natural| in nats
    logprob_mean: float    # mean |standard route - natural| in nats


# fixed tolerances: the gating rule and block checks, and the standard route where no shadow runs
TOLERANCES = {
    torch.float32: Tolerance(weight=1e-5, logprob_max=2e-3, logprob_mean=2e-3),
    torch.float64: Tolerance(weight=1e-9, logprob_max=1e-6, logprob_mean=1e-6),
    torch.bfloat16: Tolerance(weight=2e-2, logprob_max=0.5, logprob_mean=0.05),
    torch.float16: Tolerance(weight=4e-3, logprob_max=0.1, logprob_mean=0.01),
}


def tolerance_for(dtype: torch.dtype) -> Tolerance:
    return TOLERANCES.get(dtype, TOLERANCES[torch.bfloat16])


# the calibrated standard-route tolerance: a multiple of the measured noise (|dtype - shadow|),
# never below a floor a few units of the dtype's rounding wide
# A correct engine shares the natural forward's computation up to the perturbed layer and
# differs in the order of some sums after it: its mean deviation was 0.45-1.03x the natural
# forward's own mean noise on the real-shaped bf16 models (1.03x perturbing OLMoE's layer 0,
# where the engine recomputes every layer), while a 3% error in the patched attention moved
# it to 1.9-2.5x. The mean, which a systematic error moves, is held at 1.5x; the max, a
# tail of tokens, at 4x. The mean is never looser than the dtype's fixed mean tolerance
# (bf16: 0.05), which a 3% error on the noisiest model (DeepSeek-V3 shaped: 1.29x its noise)
# would pass at 1.5x: a systematic error keeps the teeth it had.
NOISE_FACTOR_MAX, NOISE_FACTOR_MEAN = 4.0, 1.5
FLOORS = {   # (max, mean) nats
    torch.float64: (1e-10, 1e-11),
    torch.float32: (1e-4, 1e-5),   # two orderings of fp32 sums on trained 4-layer models: up to ~5e-5
    torch.bfloat16: (0.02, 0.01),
    torch.float16: (4e-3, 2e-3),
}
# a hybrid's recurrent layers are scored through their decode (recurrent) form, a different
# algorithm from the chunked form of the natural forward: ~1e-4 nats apart in fp32 on the
# medium Gated DeltaNet model, which no shadow measures; they keep the fixed fp32 tolerance
HYBRID_FP32_FLOOR = (2e-3, 2e-3)
LOW_PRECISION = (torch.bfloat16, torch.float16)


def calibrated_tolerance(dtype: torch.dtype, noise_max: float, noise_mean: float, hybrid: bool = False) -> Tolerance:
    """The standard-route tolerance from the noise measured on the model (nats)."""
    floor_max, floor_mean = FLOORS.get(dtype, FLOORS[torch.bfloat16])
    if hybrid and dtype in (torch.float32, torch.float64):
        floor_max, floor_mean = HYBRID_FP32_FLOOR
    fixed = tolerance_for(dtype)
    return Tolerance(weight=fixed.weight, logprob_max=max(floor_max, NOISE_FACTOR_MAX * noise_max),
                     logprob_mean=max(floor_mean, min(fixed.logprob_mean, NOISE_FACTOR_MEAN * noise_mean)))


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


DEFAULT_CHECK_ROWS = 256   # rows per layer a run's sampled checks look at (gating rule, block algebra)
SAMPLE_SELECTION = ("deterministic (no random draw): the block check first takes the alternative routes that move the "
                    "most weight away from their token's standard route; then the rows with the largest and smallest "
                    "gate mass (sum of the "
                    "route's weights) and the largest single weight, for every expert id the routes use the row where "
                    "it has its largest weight, then rows evenly spaced over the rest (spread over every trajectory "
                    "and position the call holds), from the first calls of the run until the budget is spent")


def sample_rows(experts: np.ndarray, weights: np.ndarray, budget: int, priority: np.ndarray | None = None) -> np.ndarray:
    """Up to `budget` row indices (sorted) of routes experts/weights [N, k], chosen to catch
    a rule that goes wrong on some tokens only; every row where N <= budget. Deterministic,
    in this order until the budget is spent:

    - with `priority` [N], the rows of highest priority, up to a quarter of the budget (at
      least one): the block check ranks an alternative route by the weight it moves away
      from its token's standard route, which is where a wrong algebra shows most;
    - extremes: the rows with the largest and the smallest gate mass (sum of weights: where
      a normalisation floor, an epsilon or a scale shows most) and the largest single
      weight (a peaked router), up to budget / 16 of each (at least one), taken in turn;
    - coverage: for each expert id that occurs, the row where it carries its largest weight
      (a rule or block that goes wrong for some experts only), the heaviest first: every
      expert of a 64- or 128-expert model at the default 256;
    - the rest evenly spaced over all rows (rows come in trajectory and position order, so
      every trajectory of the call contributes).

    It cannot see rows it does not pick: a fault confined to tokens that are neither extreme
    in these statistics nor among the evenly spaced ones (say one token's hidden state in a
    thousand) can pass."""
    count = len(experts)
    if count <= budget:
        return np.arange(count)
    weights = np.asarray(weights, dtype=np.float64).reshape(count, -1)
    experts = np.asarray(experts).reshape(count, -1)
    ordered: list[np.ndarray] = []
    if priority is not None:
        ordered.append(_largest(np.asarray(priority, dtype=np.float64), max(1, budget // 4)))
    extreme = max(1, budget // 16)
    mass = weights.sum(-1)
    ordered.append(np.stack([_largest(mass, extreme), _largest(-mass, extreme), _largest(weights.max(-1), extreme)],
                            1).reshape(-1))
    # coverage: each expert id's heaviest row, the heaviest first (no sort of all N * k weights)
    flat_experts, flat_weights = experts.reshape(-1).astype(np.int64), weights.reshape(-1)
    best = np.full(int(flat_experts.max()) + 1, -np.inf)
    np.maximum.at(best, flat_experts, flat_weights)
    at_best = np.flatnonzero(flat_weights == best[flat_experts])
    used, first = np.unique(flat_experts[at_best], return_index=True)   # each expert that occurs: its first heaviest
    ordered.append((at_best[first] // experts.shape[1])[np.argsort(-best[used], kind="stable")])
    picked = np.array(list(dict.fromkeys(np.concatenate(ordered).tolist()))[:budget], dtype=np.int64)
    spare = budget - len(picked)
    if spare > 0:
        rest = np.setdiff1d(np.arange(count), picked)
        picked = np.concatenate([picked, rest[np.unique(np.linspace(0, len(rest) - 1, spare).round().astype(int))]])
    return np.sort(picked)


def _largest(values: np.ndarray, count: int) -> np.ndarray:
    """Indices of the `count` largest values, largest first (ties: the lower index first)."""
    if count >= len(values):
        return np.argsort(-values, kind="stable")
    top = np.argpartition(-values, count - 1)[:count]
    return top[np.lexsort((top, -values[top]))]


@contextmanager
def single_threaded(device) -> Iterator[None]:
    """Run a check's few small tensor operations on one CPU thread. A small op that forks
    torch's intra-op threads waits for every thread to be scheduled: on a busy CPU that is a
    scheduler time slice (measured: 10-15 ms per softmax of 30 x 16 logits on a loaded 2-core
    machine, 0.01 ms single-threaded), which made the checks cost seconds per run. No effect
    on a GPU's work; results do not depend on it (the checks compare within a tolerance)."""
    threads = torch.get_num_threads()
    if torch.device(device).type != "cpu" or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class RowBudget:
    """How many rows per layer a sampled check may still look at in this process (`rows`;
    None: no bound), what it looked at, and its run.json record under `name`."""

    def __init__(self, name: str, rows: int | None, verdict: str):
        if rows is not None and (isinstance(rows, bool) or int(rows) != rows or rows < 1):
            raise ValueError(f"`check_rows` must be a whole number >= 1, got {rows!r}")
        self.name, self.rows, self.verdict = name, None if rows is None else int(rows), verdict
        self.checked: dict[int, int] = {}     # layer -> rows looked at
        self.largest = 0.0

    def left(self, layer: int, available: int) -> int:
        return available if self.rows is None else max(0, min(available, self.rows - self.checked.get(layer, 0)))

    def spend(self, layer: int, rows: int, difference: float) -> None:
        self.checked[layer] = self.checked.get(layer, 0) + rows
        self.largest = max(self.largest, difference)

    def record(self) -> dict:
        return {self.name: {"rows_checked": {str(layer): n for layer, n in sorted(self.checked.items())},
                            "rows_per_layer_limit": self.rows,
                            "selection": "every row" if self.rows is None else SAMPLE_SELECTION,
                            "largest_difference": self.largest, "verdict": self.verdict},
                f"{self.name}_checked_rows": sum(self.checked.values())}


class GatingCheck:
    """The gating-rule check of a run (one per process): `check_gating_rule` on up to `rows`
    rows per layer in all (None: every row of every call), chosen by `sample_rows` from the
    calls that come first (the first group's trajectories, together), so its cost is fixed
    per run. `record` says in run.json how many rows it looked at per layer and how they
    were chosen.

    A wrong rule that shows on every token (a missing normalisation, a wrong activation or
    scale: the families' usual faults) fails on any row; one that shows on a few tokens only
    is caught where those tokens are extreme in gate mass or top weight or hold an expert's
    heaviest use; tokens of groups after the budget is spent are not checked."""

    def __init__(self, adapter, rows: int | None = DEFAULT_CHECK_ROWS):
        self.adapter = adapter
        self.budget = RowBudget("gating_rule", rows, "the adapter's gating rule reproduced the router's weights on "
                                                     "every row checked")

    def check(self, layer: int, logits: torch.Tensor, experts: torch.Tensor, weights: torch.Tensor) -> float | None:
        """Check rows of one call (router outputs of flat rows [N, E], [N, k], [N, k]) within
        this layer's remaining budget; the largest difference, or None when nothing was left
        to check. Raises `RuntimeCheckFailed` as `check_gating_rule` does."""
        count = experts.reshape(-1, experts.shape[-1]).shape[0]
        budget = self.budget.left(layer, count)
        if budget == 0:
            return None
        experts, weights = experts.reshape(count, -1), weights.reshape(count, -1)
        logits = logits.reshape(count, -1)
        with single_threaded(weights.device):
            if budget < count:
                index = torch.as_tensor(sample_rows(experts.cpu().numpy(), weights.float().cpu().numpy(), budget),
                                        device=experts.device)
                logits, experts, weights = logits[index], experts[index], weights[index]
            error = check_gating_rule(self.adapter, layer, logits, experts, weights)
        self.budget.spend(layer, budget, error)
        return error

    def record(self) -> dict:
        return self.budget.record()


def standard_route_error(scored: np.ndarray, natural: np.ndarray) -> tuple[float, float]:
    """(max, mean) |scored - natural| in nats over tokens."""
    difference = np.abs(np.asarray(scored, dtype=np.float64) - np.asarray(natural, dtype=np.float64))
    if difference.size == 0:
        return 0.0, 0.0
    if not np.isfinite(difference).all():
        return float("inf"), float("inf")
    return float(difference.max()), float(difference.mean())


def standard_route_mismatch(scored: np.ndarray, natural: np.ndarray, dtype: torch.dtype,
                            what: str = "the standard route's log-prob differs from the natural forward's",
                            tolerance: Tolerance | None = None, source: str = "") -> str | None:
    """None when the standard route's scores equal the natural forward's log-probs within
    `tolerance` (default: the dtype's fixed one), else a clause saying by how much they
    differ (`what` names the two) against what tolerance (`source`: where it came from)."""
    largest, mean = standard_route_error(scored, natural)
    tolerance = tolerance or tolerance_for(dtype)
    if largest <= tolerance.logprob_max and mean <= tolerance.logprob_mean:
        return None
    return (f"{what} by up to {largest:.3g} nats "
            f"(mean {mean:.3g}; tolerance {tolerance.logprob_max:.3g} max, {tolerance.logprob_mean:.3g} mean "
            f"in {str(dtype).removeprefix('torch.')}{', ' + source if source else ''})")


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


@dataclass
class Miss:
    """A standard-route check that failed: the clause saying by how much, whether it is a
    small miss (low precision, the mean inside its tolerance: a tail of flipped tokens, the
    run continues) and which tokens lie beyond the max tolerance."""

    clause: str
    small: bool
    flagged: np.ndarray


class DeviationRecord:
    """The largest (max, mean) |standard route - natural| seen over a run, the check itself,
    and its tolerance: the dtype's fixed one until `calibrate` measures the model's noise.

    Engines call `judge` once per batch (in item order) and `calibrate` before the first;
    `batch_flags` holds, per judged batch since `start_batch`, which tokens a small miss
    flagged (all False when the check passed)."""

    def __init__(self, adapter, memory_budget: int | None = None):
        self.adapter = adapter
        self.dtype = model_dtype(adapter)
        self.memory_budget = memory_budget
        self.largest = (0.0, 0.0)
        self.tolerance = tolerance_for(self.dtype)
        self.calibration: dict | None = None
        self.flagged_tokens = 0
        self.judged_tokens = 0
        self.batch_flags: list[np.ndarray] = []
        self.announced = False   # a small miss is said once per run

    @property
    def source(self) -> str:
        if self.calibration and self.calibration.get("noise_max") is not None:
            return (f"calibrated: {NOISE_FACTOR_MAX:g}x / {NOISE_FACTOR_MEAN:g}x (at most the fixed mean) the "
                    f"{self.calibration['method']}'s "
                    f"noise {self.calibration['noise_max']:.3g} max, {self.calibration['noise_mean']:.3g} mean")
        return "fixed"

    def calibrate(self, items) -> None:
        """Measure the dtype's noise on the first batch's sequences (`items`: ScoreItems, up to
        `CALIBRATION_TOKENS` scored positions) and set the tolerance from it; once per record.
        Where no shadow runs, the fixed tolerance stays, said once in bf16/fp16."""
        if self.calibration is not None:
            return
        from routelens.engine.precision import ShadowUnavailable, measure_noise

        try:
            self.calibration = measure_noise(self.adapter, items, self.memory_budget)
        except ShadowUnavailable as reason:
            self.calibration = {"method": "none", "reason": str(reason)}
            if self.dtype in LOW_PRECISION:
                import warnings

                warnings.warn(f"the standard-route check could not measure {str(self.dtype).removeprefix('torch.')}'s "
                              f"noise on this model ({reason}): it keeps the fixed tolerance "
                              f"({self.tolerance.logprob_max:g} nats max, {self.tolerance.logprob_mean:g} mean)",
                              stacklevel=3)
            return
        hybrid = any(self.adapter.layer_kind(i) not in SOFTMAX_ATTENTION for i in range(self.adapter.num_layers))
        self.tolerance = calibrated_tolerance(self.dtype, self.calibration["noise_max"], self.calibration["noise_mean"],
                                              hybrid)

    def start_batch(self) -> None:
        self.batch_flags = []

    def judge(self, scored: np.ndarray, natural: np.ndarray) -> Miss | None:
        """Record one batch's deviation; None when it is within tolerance, else the `Miss`."""
        scored, natural = np.asarray(scored, dtype=np.float64), np.asarray(natural, dtype=np.float64)
        largest, mean = standard_route_error(scored, natural)
        self.largest = (max(self.largest[0], largest), max(self.largest[1], mean))
        self.judged_tokens += scored.size
        clause = standard_route_mismatch(scored, natural, self.dtype, tolerance=self.tolerance, source=self.source)
        if clause is None:
            self.batch_flags.append(np.zeros(scored.size, dtype=bool))
            return None
        flagged = ~(np.abs(scored - natural) <= self.tolerance.logprob_max)
        small = self.dtype in LOW_PRECISION and np.isfinite(mean) and mean <= self.tolerance.logprob_mean
        if small:
            self.flagged_tokens += int(flagged.sum())
            self.batch_flags.append(flagged)
        return Miss(clause, small, flagged)

    def announce(self, miss: Miss, where: str) -> None:
        """Say once per run that a small low-precision miss is flagged, not fallen back on."""
        if self.announced:
            return
        self.announced = True
        import warnings

        warnings.warn(f"{where}: {miss.clause}; the mean is within tolerance, so this is a tail of tokens whose "
                      f"routes flip under {str(self.dtype).removeprefix('torch.')} rounding, not a broken engine: "
                      "continuing, with those tokens counted in run.json's checks (a counterfactual's tokens table flags "
                      "them: precision_flag)", stacklevel=3)

    def check(self, scored: np.ndarray, natural: np.ndarray) -> str | None:
        """Record one batch's deviation; the mismatch clause if it is beyond tolerance, else None."""
        miss = self.judge(scored, natural)
        return None if miss is None else miss.clause

    def record(self) -> dict:
        """What run.json says of the standard-route check's tolerance and its small misses."""
        return {"standard_route_tolerance": {
                    "dtype": str(self.dtype).removeprefix("torch."), "max_nats": self.tolerance.logprob_max,
                    "mean_nats": self.tolerance.logprob_mean, "source": self.source,
                    **({"calibration": self.calibration} if self.calibration else {})},
                "standard_route_flagged_tokens": self.flagged_tokens,
                "standard_route_checked_tokens": self.judged_tokens}
