"""Items scored in groups through the whole-sequence scorer's shared passes (semantic
routing, graft evaluation), as the isolation study scores them.

A group of items shares one right-padded natural forward (`WholeSequenceScorer.natural_batch`)
and its scoring passes (`score_batch`); groups are the isolation study's (`item_groups`: in
order of length, as many items as fill one scoring chunk, at most `group_items`). Scores
equal one item at a time to float rounding (tested). A model whose right padding reaches
real positions (`PaddingNotInert`, found on the first padded group) is scored one item at a
time from then on: exact either way, and run.json says so (`batching_checks`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

from routelens.analyses.isolation.analysis import item_groups
from routelens.engine.checks import PaddingNotInert

Item = TypeVar("Item")
Result = TypeVar("Result")


def groups_of(lengths: Sequence[int], rows_per_item: int, scorer, group_items: int) -> list[list[int]]:
    """Indices into `lengths` (token counts of the items) in groups that share passes:
    `rows_per_item` scored rows per item and scoring call, at most `group_items` items."""
    return item_groups(list(lengths), rows_per_item, scorer.rows_per_chunk, group_items)


def scored_in_groups(scorer, items: Sequence[Item], groups: list[list[int]],
                     score: Callable[[list[Item]], list[Result]]) -> list[Result]:
    """`score(group)` (one result per item of the group) for each group of indices into
    `items`; the results in the order of `items` (None for an item in no group). One item at
    a time where the model's padding is not inert."""
    results: list = [None] * len(items)
    for group in groups:
        members = [items[index] for index in group]
        scored = None
        if len(members) > 1 and not scorer.padding.failure:
            try:
                scored = score(members)
            except PaddingNotInert:   # exact either way: this model's items one at a time from here on
                scored = None
        if scored is None:
            scored = [score([member])[0] for member in members]
        for index, result in zip(group, scored, strict=True):
            results[index] = result
    return results


def batching_checks(scorer, unit: str, group_items: int) -> dict:
    """run.json's record of how items shared forwards and how padding was checked."""
    return scorer.padding.record(unit, f"groups of up to {group_items} items")
