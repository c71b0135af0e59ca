"""Sparse attention picked by an indexer beside the router (DeepSeek Sparse Attention, DSA:
DeepSeek-V3.2, GLM-5 (glm_moe_dsa), A.X-K2, dots3-note, Hy4, Qwen4-Exp's QSA).

An indexed layer is not softmax attention over every earlier key: a small indexer scores
the keys of each query (its own projections of the query's and the keys' hidden states)
and the query attends only to its top `index_topk` keys. Perturbing a token's route at
layer l changes its hidden state above l, hence which keys the indexer picks for it there:
the fast engine's diagonal patch (standard keys of earlier positions, the token's own
perturbed key on the diagonal, over the model's mask) does not model that choice. So an
indexed layer is declared a layer kind of its own (`layer_kind` -> "indexed_attention",
not one of `SOFTMAX_ATTENTION`): the fast engine hands every MoE layer below one to the
cache engine, which decodes the routes with the model's own cache (the indexer's key cache
included) and is exact (measured: `tests/models/test_b_families.py`); the fast engine
serves the MoE layers with no indexed layer above them (the last one), where nothing above
attends.

transformers' DSA attention applies the indexer's mask only when the attention
implementation is named "eager" or "sdpa" (any other name hands the indices to a flash-MLA
kernel and attends to every key), and the fast engine runs its passes under wrapper
functions of other names ("routelens_sdpa"). So each indexed layer's attention reads the
model's config through `OwnAttention`, which names the implementation the wrapper wraps:
an indexed layer always runs the model's own attention, with its mask, and the fast
engine (which never patches such a layer) records nothing of it.

Shared indexer layers (GLM-5's `indexer_types`, Hy4): a "shared" layer reuses the top-k of
the layer below, handed from decoder layer to decoder layer as an argument
(`prev_topk_indices`). An engine that re-runs the layers from l up on a batch of routes
passes each layer the arguments the natural step gave it, i.e. the natural top-k of one
row; `chain_shared_topk` instead hands each layer the top-k its layer below produced in the
same run (expanded over the rows where the layer below ran on one row), which is what the
model's own forward passes: exact, and the identity for every plain forward.
"""

from __future__ import annotations

import torch

from routelens.models.adapter import MoEAdapter
from routelens.models.families.deepseek_v3 import DeepseekV3Adapter

INDEXED_ATTENTION = "indexed_attention"


class IndexedAttentionLayers:
    """Mixin: `layer_kind` says "indexed_attention" for every layer whose attention an indexer
    sparsifies: what `config.layer_types` says, and any layer whose attention holds an
    indexer (a checkpoint whose config calls its DSA layers "full_attention")."""

    def layer_kind(self: MoEAdapter, layer: int) -> str:
        kind = MoEAdapter.layer_kind(self, layer)
        attention = getattr(self.decoder_layers[layer], "self_attn", None)
        if getattr(attention, "indexer", None) is not None or getattr(attention, "skip_topk", False):
            return INDEXED_ATTENTION
        return kind


class OwnAttention:
    """The model's config as an indexed attention module reads it: everything as the config
    says, except that a routelens attention wrapper ("routelens_sdpa") reads as the
    implementation it wraps ("sdpa"), so the module applies its indexer's mask and runs the
    model's own attention function. Writes go to the config."""

    PREFIX = "routelens_"

    def __init__(self, config):
        object.__setattr__(self, "_config", config)

    def __getattr__(self, name: str):
        if name.startswith("__") or name == "_config":
            raise AttributeError(name)
        value = getattr(self._config, name)
        if name == "_attn_implementation" and isinstance(value, str) and value.startswith(self.PREFIX):
            return value[len(self.PREFIX):]
        return value

    def __setattr__(self, name: str, value) -> None:
        setattr(self._config, name, value)


def own_attention(adapter: MoEAdapter) -> None:
    """Give every indexed layer's attention module the config view `OwnAttention` (once)."""
    for index in range(adapter.num_layers):
        attention = getattr(adapter.decoder_layers[index], "self_attn", None)
        if adapter.layer_kind(index) == INDEXED_ATTENTION and attention is not None \
                and not isinstance(attention.config, OwnAttention):
            attention.config = OwnAttention(attention.config)


def chain_shared_topk(adapter: MoEAdapter) -> None:
    """Make every decoder layer that takes `prev_topk_indices` get the top-k of the layer
    below as it ran in the same pass (once per model; see the module docstring):

    - where the layer below was the last decoder layer to run (a pass over consecutive
      layers: the model's forward, an engine re-running layers l, l+1, ... on routes), its
      top-k output, which is what the model's forward passes, so this is the identity there;
    - else (the first layer an engine re-runs) the argument as recorded, a batch of one
      expanded over the rows (every row shares that layer's input).
    """
    layers = adapter.decoder_layers
    if getattr(layers, "_routelens_topk_chain", False):
        return
    state: dict = {"last": None, "topk": None}   # the decoder layer that ran last, and its top-k output

    def finished(index):
        def hook(module, args, output):
            state["last"] = index
            state["topk"] = output[1] if isinstance(output, tuple) and len(output) > 1 else None
        return hook

    def chain(index):
        def hook(module, args, kwargs):
            hidden = args[0] if args else kwargs.get("hidden_states")
            given = kwargs.get("prev_topk_indices")
            if hidden is None or "prev_topk_indices" not in kwargs:
                return None
            rows = hidden.shape[0]
            below = state["topk"] if state["last"] == index - 1 else given
            if not torch.is_tensor(below) or below.shape[0] not in (1, rows):
                return None
            return args, {**kwargs, "prev_topk_indices": below.expand(rows, *below.shape[1:])}
        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_hook(finished(index))
        layer.register_forward_pre_hook(chain(index), with_kwargs=True)
    layers._routelens_topk_chain = True


class DsaAdapter(IndexedAttentionLayers, DeepseekV3Adapter):
    """DeepSeek-V3's router (sigmoid, correction bias for choosing only, top-2-sum groups,
    x routed_scaling_factor) beside DSA attention layers."""

    def __init__(self, model):
        super().__init__(model)
        own_attention(self)
