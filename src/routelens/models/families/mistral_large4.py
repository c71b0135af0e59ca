"""Mistral Large 4, served through its text model (`vision_language`; config.json:
"mistral_large4", a Pixtral encoder around MistralLarge4TextModel), image tokens absent.

Router: Mistral 4's, in float32: scores = softmax(logits), experts chosen by score within the
top topk_group of n_group groups (a group's score: the sum of its top-2 scores; no bias),
weighted by the chosen scores / (their sum + 1e-20) (always), times routed_scaling_factor;
shared experts added (they do not depend on the route); the first first_k_dense_replace
layers (mlp_layer_types "dense") are dense.

Attention: DeepSeek Sparse Attention (`routelens.models.families.dsa`) on every layer (MLA
without a query LoRA, an indexer of its own design with the same contract: attribute
`indexer`, and its mask applied only when the implementation is named "eager" or "sdpa"),
so each layer is declared "indexed_attention": the fast engine serves the last MoE layer and
the cache engine the layers below, each indexed attention running the model's own attention
(`OwnAttention`). Its "shared" layers (`indexer_types`) reuse the top-k of the layer below,
handed from layer to layer (`chain_shared_topk`). Layers may share their latent KV with an
earlier layer (`kv_source_layers`), handed from layer to layer in a `KVSharingDict` beside
the hidden states (`chain_shared_kv`). No-RoPE layers, a learned RoPE frequency scale and a
per-head query scale by log position are all inside the attention module. The full model
soft-caps its logits (final_logit_softcapping): the tower does too (`Tower.logit_softcapping`).

What is counterfactual: the routed experts' choice and weights at one MoE layer; the layers
above route their perturbed states, and their indexers pick keys for them, as the model does.
Measured (tests/models/test_g_families.py): the cache engine and the whole-sequence scorer equal
the model's own forward at every MoE layer of a tiny model with shared top-k and shared KV.
"""

from __future__ import annotations

import copy

import torch

from routelens.models.adapter import MoEAdapter
from routelens.models.families.dsa import IndexedAttentionLayers, chain_shared_topk, own_attention
from routelens.models.gates import MISTRAL_LARGE4
from routelens.models.spec import Layout, Tower


def chain_shared_kv(adapter: MoEAdapter) -> None:
    """Make the KV a layer shares with the layers above (`kv_source_layers`: a "store" layer
    writes its latent KV into the `shared_kv_states` dict the model hands every decoder layer,
    a "reuse" layer reads it) follow each run, once per model:

    - in a pass over consecutive layers (the model's forward, an engine re-running layers l,
      l+1, ... on routes) each layer gets a copy of the dict as the layer below left it: what
      the model's forward passes, so this is the identity there, and the dict an engine
      records for a layer keeps what the layers below wrote (the model's one dict, recorded
      once for every layer, would hold what the layers above wrote last);
    - the first layer of a run gets the dict it was given (the one recorded for it, taken at
      the run's rows by the engine, or a batch of one expanded over the rows).
    """
    layers = adapter.decoder_layers
    if getattr(layers, "_routelens_kv_chain", False):
        return
    state: dict = {"last": None, "current": None}   # the decoder layer that ran last, and the dict it was passed

    def finished(index):
        def hook(module, args, output):
            state["last"] = index
        return hook

    def chain(index):
        def hook(module, args, kwargs):
            given = kwargs.get("shared_kv_states")
            hidden = args[0] if args else kwargs.get("hidden_states")
            if given is None or hidden is None:
                return None
            rows = hidden.shape[0]
            passed = copy.copy(state["current"] if state["last"] == index - 1 and state["current"] is not None
                               else given)
            for name, tensors in passed.items():
                if all(torch.is_tensor(t) and t.shape[0] == 1 for t in tensors) and rows > 1:
                    passed[name] = tuple(t.expand(rows, *t.shape[1:]) for t in tensors)
            state["current"] = passed
            return args, {**kwargs, "shared_kv_states": passed}
        return hook

    for index, layer in enumerate(layers):
        layer.register_forward_hook(finished(index))
        layer.register_forward_pre_hook(chain(index), with_kwargs=True)
    layers._routelens_kv_chain = True


class MistralLarge4Adapter(IndexedAttentionLayers, MoEAdapter):
    gate = MISTRAL_LARGE4
    layout = Layout(windows="none")   # every layer: the causal mask, sparsified by its indexer
    tower = Tower(placeholders=("image_token_id",), logit_softcapping="final_logit_softcapping")

    def __init__(self, model):
        super().__init__(model)
        own_attention(self)
        chain_shared_topk(self)
        chain_shared_kv(self)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        cap = self.config.final_logit_softcapping
        logits = self.lm_head(hidden)
        return logits if not cap else torch.tanh(logits / cap) * cap
