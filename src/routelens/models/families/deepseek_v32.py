"""DeepSeek-V3.2 (DSA): DeepSeek-V3's router (sigmoid, correction bias for choosing only,
top-2-sum groups, x routed_scaling_factor; shared experts, first layers dense) beside
DeepSeek Sparse Attention: every layer's MLA attends only to the keys its indexer picks,
so the fast engine serves only the last MoE layer and the cache engine the layers below
(`routelens.models.families.dsa`)."""

from routelens.models.families.dsa import DsaAdapter


class DeepseekV32Adapter(DsaAdapter):
    pass
