"""A `Gate` computed: the selection scores a router ranks experts by, and the weights it
applies to a given expert set, as pure functions of the raw router logits.

Each step is written once, in the order the families' own routers compute it (the
exactness tests compare against Hugging Face's forward to 1e-6), so the per-family copies
of sigmoid -> normalise -> scale are this one function.
"""

from __future__ import annotations

from operator import attrgetter

import torch

from routelens.models.spec import Gate


def admitted_groups(scores: torch.Tensor, num_groups: int, top_groups: int, group_score: str = "top2") -> torch.Tensor:
    """[N, E] choice scores -> bool [N, E]: experts in the `top_groups` groups the router keeps
    (group score: sum of the group's top-2 scores, or its maximum)."""
    if num_groups <= 1 or top_groups >= num_groups:
        return torch.ones_like(scores, dtype=torch.bool)
    grouped = scores.view(scores.shape[0], num_groups, -1)
    per_group = grouped.topk(2, dim=-1)[0].sum(-1) if group_score == "top2" else grouped.amax(-1)
    kept = torch.zeros_like(per_group, dtype=torch.bool).scatter_(1, per_group.topk(top_groups, dim=-1)[1], True)
    return kept[:, :, None].expand_as(grouped).reshape(scores.shape)


def _activation(gate: Gate, logits: torch.Tensor) -> torch.Tensor:
    """fp32 scores over all experts (a top-k-then-softmax router ranks by its softmax too)."""
    logits = logits.float()
    return torch.sigmoid(logits) if gate.activation == "sigmoid" else torch.softmax(logits, dim=-1)


def _groups_on(gate: Gate, config) -> bool:
    if gate.groups is None:
        return False
    when = gate.groups.when
    return when is None or getattr(config, when[0], None) == when[1]


def selection_scores(gate: Gate, logits: torch.Tensor, bias: torch.Tensor | None, config,
                     admitted_only: bool = True) -> torch.Tensor:
    """[N, E] -> [N, E] non-negative scores the router ranks experts by: the activation plus
    the choice `bias` (clamped at 0: a negative bias can push a tiny score below 0), zero
    outside the groups the router admits when `admitted_only`."""
    scores = _activation(gate, logits)
    choice = scores if bias is None else scores + bias.float().reshape(-1).to(logits.device)
    ranked = choice if bias is None else choice.clamp_min(0.0)
    if admitted_only and _groups_on(gate, config):
        groups = gate.groups
        # groups are ranked by the unclamped choice scores, as the router ranks them
        ranked = ranked * admitted_groups(choice, getattr(config, groups.count), getattr(config, groups.keep),
                                          group_score=groups.score)
    return ranked


def normalises(gate: Gate, config) -> bool:
    """Whether the chosen weights are divided by their sum, for this config."""
    if isinstance(gate.normalise, str):
        return bool(getattr(config, gate.normalise, False))
    return gate.normalise


def weights_for(gate: Gate, logits: torch.Tensor, experts: torch.Tensor, config) -> torch.Tensor:
    """[N, E], [N, k] -> [N, k] fp32 weights the router would apply to `experts` (never biased)."""
    if gate.activation == "topk_then_softmax":
        weights = torch.softmax(logits.float().gather(-1, experts), dim=-1)
    else:
        weights = _activation(gate, logits).gather(-1, experts)
    if normalises(gate, config) and gate.norm_p:
        p = attrgetter(gate.norm_p)(config)
        if p is not None:   # as DBRX's block divides: torch.norm over the chosen weights
            weights = weights / torch.norm(weights, p=p, dim=-1, keepdim=True)
    elif normalises(gate, config):
        total = weights.sum(dim=-1, keepdim=True)
        if gate.norm_floor:
            total = total.clamp_min(getattr(config, gate.norm_floor))
        if gate.epsilon:
            total = total + gate.epsilon
        weights = weights / total
    if gate.scale:
        weights = weights * getattr(config, gate.scale)
    return weights
