"""MiniMax-M3 (`minimax_m3_vl`), served through its text model (`vision_language`, image
tokens absent; a checkpoint of the text model alone, `minimax_m3_vl_text`, loads as its
causal LM, `MiniMaxM3VLTextAdapter`): MiniMax-M2's sigmoid router with the correction bias in the router, dense or
MoE MLPs per layer (`mlp_layer_types`), and block-sparse attention on the layers
`config.layer_types` calls "minimax_m3_sparse".

- Router (`MiniMaxM3VLTopKRouter`, the standard (logits, weights, experts)): sigmoid
  affinities in fp32; top-k of affinity + the router's e_score_correction_bias; weights =
  the chosen affinities over their sum (Laguna's gate, `gates.LAGUNA`). The block multiplies
  the experts' weighted sum by routed_scaling_factor after the router (`routed_scale`) and
  adds a shared expert (the same in every route: it cancels out of the fast engine's algebra).
- Sparse layers: a lightning indexer (its own q/k projections and norms, RoPE on its first
  dims) scores every earlier key of each query, max-pools the scores over blocks of
  `index_block_size` keys and keeps the `index_topk_blocks` best blocks plus the
  `index_local_blocks` blocks ending at the query; the attention then sees only the kept
  blocks (an additive mask built by the module, where the attention implementation is eager
  or sdpa). It is DSA's contract (`routelens.models.families.dsa`) at block granularity: a
  perturbed route changes the states above it, hence the blocks picked there, which the fast
  engine's diagonal patch does not model. The sparse layers are "indexed_attention"
  (`layer_kind`): the fast engine serves the MoE layers with no sparse layer above them and
  hands the others to the cache engine, which decodes with the model's own cache (its sparse
  layers cache the indexer's keys, `MiniMaxM3VLSparseCacheLayer`, copied per route row
  through its own `reorder_cache`) and is exact: a decode step scores the query against the
  same keys, pools the same blocks (the blocks after the query are -inf in a full forward
  too) and keeps the same ones (tests/models/test_h_families.py compares every position's
  blocks). The sparse layers read their config through `OwnAttention`, so under the fast
  engine's wrapper ("routelens_sdpa") they still build and apply their mask.
- A config with `index_local_blocks` > `index_topk_blocks` is refused: the local blocks,
  all boosted to +inf, then outnumber the slots, and top-k picks among those equal scores in
  an order that depends on the number of key blocks, so a query's keys (and its output) change
  with the number of tokens after it in the model's own forward: no engine, not even whole
  forwards of the prefix, reproduces it. (MiniMax-M3 keeps 16 blocks, one of them local.)
- No lightning/linear-attention layers (the "lightning" indexer only selects keys); no sliding
  windows. Multi-token-prediction weights (`mtp.*`) are not loaded by transformers.
"""

from routelens.errors import RouteLensError
from routelens.models.adapter import MoEAdapter
from routelens.models.families.dsa import INDEXED_ATTENTION, IndexedAttentionLayers, own_attention
from routelens.models.gates import LAGUNA
from routelens.models.spec import Tower


class MiniMaxM3VLAdapter(IndexedAttentionLayers, MoEAdapter):
    gate = LAGUNA
    tower = Tower()   # model.language_model and lm_head; image_token_id / video_token_id (aliases of *_index)

    def __init__(self, model):
        super().__init__(model)
        local, kept = getattr(self.config, "index_local_blocks", 0), getattr(self.config, "index_topk_blocks", 0)
        if any(self.layer_kind(i) == INDEXED_ATTENTION for i in range(self.num_layers)) and local > kept:
            raise RouteLensError(
                f"index_local_blocks = {local} > index_topk_blocks = {kept}: the indexer boosts more local key blocks "
                "to +inf than it keeps, and top-k breaks those ties by the number of key blocks, so a token's attention "
                "depends on how many tokens follow it (no causal trajectory to score exactly)")
        own_attention(self)

    def routed_scale(self, layer: int) -> float:
        return float(self.config.routed_scaling_factor)


class MiniMaxM3VLTextAdapter(MiniMaxM3VLAdapter):
    """The text model alone (`MiniMaxM3VLForCausalLM`, model type minimax_m3_vl_text)."""

    tower = None
