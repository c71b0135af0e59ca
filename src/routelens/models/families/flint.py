"""Flint: sigmoid affinities without a choice bias, top-k, the chosen affinities renormalised
if norm_topk_prob; an ungated shared expert added in full inside the block; q/k norm and
per-head attention sinks on every layer (eager attention: SDPA cannot apply sinks),
rotary on sliding layers only; dense first layers (`mlp_only_layers`)."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import SIGMOID_TOPK


class FlintAdapter(MoEAdapter):
    gate = SIGMOID_TOPK
