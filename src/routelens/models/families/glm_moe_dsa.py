"""GLM-5 (glm_moe_dsa): DeepSeek-V3.2's DSA with cross-layer top-k sharing: a "shared"
layer of `config.indexer_types` attends to the keys the layer below picked, handed up as
`prev_topk_indices`; DeepSeek-V3's router. Engines that re-run layers on a batch of routes
get each layer's top-k from the layer below in the same run (`chain_shared_topk`)."""

from routelens.models.families.dsa import DsaAdapter, chain_shared_topk


class GlmMoeDsaAdapter(DsaAdapter):
    def __init__(self, model):
        super().__init__(model)
        chain_shared_topk(self)
