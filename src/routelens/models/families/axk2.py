"""A.X-K2 (SK Telecom): DeepSeek-V3.2's DSA attention with a sigmoid output gate, gated
RMSNorms (RMSNorm x sigmoid of a low-rank MLP) before attention and before each MoE block;
DeepSeek-V3's router, whose groups exist only where `n_group` is set (A.X-K2-Light routes
over all experts: `n_group` = None)."""

from routelens.models.families.dsa import DsaAdapter
from routelens.models.spec import Gate

#: the router with n_group = None: DeepSeek-V3's, without groups
UNGROUPED = Gate("sigmoid", choice_bias="router.e_score_correction_bias", normalise="norm_topk_prob", epsilon=1e-20,
                 scale="routed_scaling_factor")


class AXK2Adapter(DsaAdapter):
    def __init__(self, model):
        super().__init__(model)
        if getattr(self.config, "n_group", None) is None:
            self.gate = UNGROUPED
