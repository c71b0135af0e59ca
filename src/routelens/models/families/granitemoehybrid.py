"""IBM Granite 4 (GraniteMoeHybrid): Mamba-2 and attention layers; Granite MoE's router
(top-k on logits, softmax over the k), a dense shared MLP beside the MoE block, residual x
residual_multiplier, logits / logits_scaling."""

from routelens.models.families.granitemoe import GraniteMoeAdapter


class GraniteMoeHybridAdapter(GraniteMoeAdapter):
    pass
