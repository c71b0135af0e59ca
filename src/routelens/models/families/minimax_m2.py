"""MiniMax-M2: sigmoid affinities; experts chosen by affinity + a correction bias that the
MoE block (not the router) holds and passes in; weights = the chosen affinities over their
sum."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import MINIMAX_M2
from routelens.models.spec import Layout


class MiniMaxM2Adapter(MoEAdapter):
    gate = MINIMAX_M2
    layout = Layout(windows="none")   # plain causal mask
