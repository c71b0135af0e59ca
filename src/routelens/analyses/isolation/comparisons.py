"""The isolation study's arms and the comparisons between them, named once.

Paper 2 compares one expert forced at weight 1.0 with natural top-k routing: one expert's
compute against k, at weight 1.0 against the router's gate mass (below 1 where the gating
rule does not renormalise the k weights), so "forcing hurts" is partly expected by
construction.
Two more arms (on by default, `equal_compute`) separate compute from scale:

- `forced_matched_mass`: expert e alone, its weight on each token the natural route's total
  gate weight there (the sum of the k weights the router applied): natural routing's
  output scale with one expert's compute;
- `single_expert_floor`: one uniformly random expert per token at weight 1.0, one
  condition per floor seed: the forced expert's own compute and scale.

Five comparisons per (domain, layer, expert), each a paired per-item test; the verdict
(harmful / helpful) is judged against the single-expert floor, the only baseline of equal
compute and equal scale. The cells table names each comparison's columns by `suffix`.

This module imports nothing heavy: the printed tables and the report read summaries of any
age through `comparisons_of` (runs made before these arms carry two comparisons, flat).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

NATURAL, FORCED, FLOOR = "natural", "forced", "floor"
FORCED_MATCHED_MASS, SINGLE_EXPERT_FLOOR = "forced_matched_mass", "single_expert_floor"
EQUAL_COMPUTE_CONDITIONS = (FORCED_MATCHED_MASS, SINGLE_EXPERT_FLOOR)

ARMS = {
    NATURAL: "natural top-k routing (k experts, the router's own weights)",
    FORCED: "expert e alone on every token at layer l, weight 1.0 (paper 2's arm)",
    FORCED_MATCHED_MASS: "expert e alone on every token at layer l, weighted on each token by the natural route's "
                         "total gate weight there (the sum of the k weights the router applied)",
    FLOOR: "k distinct experts drawn uniformly per token, weighted by the model's gating rule (mean over floor seeds)",
    SINGLE_EXPERT_FLOOR: "one expert drawn uniformly per token, weight 1.0 (mean over floor seeds)",
}


@dataclass(frozen=True)
class Comparison:
    """arm - baseline per item, over the domain's items; `suffix` names its cells columns."""

    name: str
    arm: str
    baseline: str
    suffix: str
    label: str          # a short heading for tables
    compute: str        # experts evaluated per token, arm against baseline
    scale: str          # total weight per token, arm against baseline


COMPARISONS = (
    Comparison("forced_vs_natural", FORCED, NATURAL, "", "forced vs natural",
               "unequal: 1 vs k experts", "unequal: 1.0 vs the router's gate mass"),
    Comparison("forced_vs_floor", FORCED, FLOOR, "_vs_floor", "forced vs k-expert floor",
               "unequal: 1 vs k experts", "unequal: 1.0 vs the gating rule's weights"),
    Comparison("forced_vs_single_expert_floor", FORCED, SINGLE_EXPERT_FLOOR, "_vs_single_expert_floor",
               "forced vs single-expert floor", "equal: 1 expert each", "equal: 1.0 each"),
    Comparison("matched_mass_vs_natural", FORCED_MATCHED_MASS, NATURAL, "_matched_mass_vs_natural",
               "matched mass vs natural", "unequal: 1 vs k experts", "equal: the router's gate mass, per token"),
    Comparison("matched_mass_vs_floor", FORCED_MATCHED_MASS, FLOOR, "_matched_mass_vs_floor",
               "matched mass vs k-expert floor", "unequal: 1 vs k experts",
               "unequal: the router's gate mass vs the gating rule's weights"),
)
BY_NAME = {comparison.name: comparison for comparison in COMPARISONS}
VERDICT = "forced_vs_single_expert_floor"      # the comparison "harmful" and "helpful" are judged on


def finite(value) -> float | None:
    """A float, or None where missing or not finite (null in summary.json, - in tables)."""
    return None if value is None or not math.isfinite(value) else float(value)


def comparisons_of(summary: dict) -> dict[str, dict | None]:
    """Each comparison's counts from a summary.json: {name: {cells, significant, harmful,
    helpful, significant_by_domain, harmful_by_domain} or None where the run has none}. A
    summary made before the equal-compute arms holds only forced vs natural and vs the
    k-expert floor, as flat keys without harmful counts (None here)."""
    if "comparisons" in summary:
        return {c.name: summary["comparisons"].get(c.name) for c in COMPARISONS}
    old = {c.name: None for c in COMPARISONS}
    old["forced_vs_natural"] = {"cells": summary["cells"], "significant": summary["significant_cells"],
                                "helpful": summary["significant_better_than_natural"], "harmful": None,
                                "significant_by_domain": summary.get("significant_by_domain"), "harmful_by_domain": None}
    old["forced_vs_floor"] = {"cells": summary["cells"], "significant": summary["significant_vs_floor"],
                              "helpful": summary.get("significant_better_than_floor"), "harmful": None,
                              "significant_by_domain": None, "harmful_by_domain": None}
    return old


def missing_arms_note(summary: dict) -> str | None:
    """What a reader must be told when the run has no equal-compute arms, else None."""
    if comparisons_of(summary)[VERDICT] is not None:
        return None
    why = ("it was run with equal_compute off" if summary.get("equal_compute") is False
           else "it was made before the equal-compute arms existed")
    return (f"this run has no equal-compute arms ({why}): the comparisons against the single-expert floor and at the "
            "natural gate mass are absent (shown as -), and so is the verdict (harmful / helpful at equal compute)")
