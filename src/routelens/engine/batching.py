"""Sequences of unequal length as one batch, and a batch's recorded arguments per row.

Sequences are right-padded: under causal attention (and causal recurrences) padding comes
after every real position, so it never reaches one; engines check that on the checkpoint
at hand (`PaddingNotInert`) rather than assume it. A decoder layer's recorded keyword
arguments follow the rows an engine re-runs it on: each row takes its source sequence's
slice, and a tensor the whole batch shares is kept once and broadcast.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence

import numpy as np
import torch


def pad_right(input_ids: list[torch.Tensor]) -> torch.Tensor:
    """Sequences of any lengths as one right-padded batch [B, T] (causal attention keeps the
    padding out of every real position)."""
    batch = torch.zeros(len(input_ids), max(ids.shape[0] for ids in input_ids), dtype=torch.long)
    for b, ids in enumerate(input_ids):
        batch[b, : ids.shape[0]] = ids
    return batch


def per_row_arguments(kwargs: dict, sources: torch.Tensor, batch: int, positional: dict[str, tuple[int, int]],
                      positions: torch.Tensor | None = None) -> dict:
    """A decoder layer's recorded arguments for the perturbed rows: the per-position ones
    (`positional`: name -> (batch dim, position dim), from the adapter; position embeddings
    [B, T, d], position ids [B, T] or multimodal [3, B, T], ...) picked by each row's source
    sequence (a batch of one broadcasts as it is), and with `positions` [rows, P] taken at
    each row's positions."""
    if batch == 1 and positions is None:
        return dict(kwargs)

    def pick(value, dims):
        batch_dim, position_dim = dims
        if not torch.is_tensor(value) or value.dim() <= max(batch_dim, position_dim):
            return value
        if value.shape[batch_dim] == batch and batch > 1:
            value = value.index_select(batch_dim, sources.to(value.device))
        if positions is None:
            return value
        shape = list(value.shape)
        shape[batch_dim] = positions.shape[0]
        value = value.expand(*shape)                                         # a broadcast batch of one, per row
        index_shape = [1] * value.dim()
        index_shape[batch_dim], index_shape[position_dim] = positions.shape
        shape[position_dim] = positions.shape[1]
        return value.gather(position_dim, positions.to(value.device).reshape(index_shape).expand(*shape))

    out = dict(kwargs)
    for name, dims in positional.items():
        value = out.get(name)
        if name == "position_ids" and torch.is_tensor(value) and value.dim() == 3:
            dims = (1, 2)   # multimodal position ids [3, B, T]
        if isinstance(value, tuple):
            out[name] = tuple(pick(member, dims) for member in value)
        elif torch.is_tensor(value):
            out[name] = pick(value, dims)
    return out


def shared_rows(kwargs: dict, batch: int, positional: dict[str, tuple[int, int]]) -> dict:
    """Recorded arguments with every tensor whose rows are all equal (an attention mask or
    position embeddings the padded batch shares) kept as one row, which broadcasts to any
    number of rows: [B, 1, T, T] masks are not copied per re-run row."""
    if batch == 1:
        return dict(kwargs)

    def reduce(value, batch_dim: int):
        # a batched tensor has at least one dimension besides the batch (a 1-d tensor such as
        # cache_position is not per row)
        if not torch.is_tensor(value) or value.dim() < 2 or value.shape[batch_dim] != batch:
            return value
        first = value.narrow(batch_dim, 0, 1)
        return first if bool((value == first).all()) else value

    out = {}
    for name, value in kwargs.items():
        # positional arguments have a declared batch dimension; any other has it first
        batch_dim = positional[name][0] if name in positional else 0
        if name == "position_ids" and torch.is_tensor(value) and value.dim() == 3:
            batch_dim = 1
        out[name] = tuple(reduce(v, batch_dim) for v in value) if isinstance(value, tuple) else reduce(value, batch_dim)
    return out


def rows_of(kwargs: dict, sources: torch.Tensor, batch: int, positional: dict[str, tuple[int, int]]) -> dict:
    """`per_row_arguments` for re-running whole sequences: also every other tensor with the
    batch first (an attention mask [B, 1, T, T]) taken at each row's source sequence, and so
    the tensors of a mapping of tensor tuples (KV that layers share, `KVSharingDict`), in a copy."""
    out = per_row_arguments(kwargs, sources, batch, positional)
    if batch == 1:
        return out

    def pick(value):
        if torch.is_tensor(value) and value.dim() >= 2 and value.shape[0] == batch:
            return value.index_select(0, sources.to(value.device))
        return value

    for name, value in out.items():
        if name in positional:
            continue
        if isinstance(value, Mapping) and all(isinstance(member, tuple) for member in value.values()):
            value = copy.copy(value)
            for key, member in value.items():
                value[key] = tuple(pick(tensor) for tensor in member)
            out[name] = value
        else:
            out[name] = pick(value)
    return out


def row_positions(positions: Sequence, slots: int, device) -> torch.Tensor:
    """[rows, slots]: each row's scored positions, the last one repeated to fill the row
    (a repeated position computes the same thing again and is not read)."""
    index = torch.empty(len(positions), slots, dtype=torch.long)
    for row, row_positions in enumerate(positions):
        row_positions = torch.as_tensor(np.asarray(row_positions))
        index[row, : len(row_positions)] = row_positions
        index[row, len(row_positions):] = row_positions[-1]
    return index.to(device)


def sequence_routes(captured: dict, row: int, length: int, count: int) -> dict:
    """Sequence `row`'s own router outputs from a right-padded batch's capture (flat rows
    b * length + t): its first `count` tokens, per layer."""
    from routelens.models.routing import RouterOutput

    return {layer: RouterOutput(*(value.reshape(-1, value.shape[-1])[row * length: row * length + count]
                                  for value in (out.logits, out.weights, out.experts)))
            for layer, out in captured.items()}
