"""Step 3.7 (StepFun, step3p7), served through its text model (`vision_language`): a
vision-language checkpoint (Step3p7ForConditionalGeneration, AutoModelForImageTextToText)
whose decoder (`model.language_model`, config type step3p5) is a routed MoE.

Router (Step3p7TopKRouter): sigmoid affinities of the logits; experts chosen by top-k of
affinity + the router's e_score_correction_bias (for choosing only), weighted by the unbiased
affinities over their sum (no epsilon): Laguna's gate. The block (Step3p7SparseMoeBlock)
multiplies the experts' weighted sum by moe_router_scaling_factor after the router
(`routed_scale`) and adds an always-active shared expert; the first layers are dense MLPs
(mlp_layer_types). Routed and shared experts may clamp their SwiGLU (swiglu_limits), inside
the experts. Attention: sliding-window and full layers (layer_types, sliding_window) with
per-layer head counts, per-layer-type (partial) rotary embeddings, and a sigmoid output gate
per head; all inside the layer, left as the model computes them.

Not served: a config with use_bidirectional_attention (its masks let a token see later ones:
no causal trajectory). The image placeholder (image_token_id) is refused: text only; the MTP
layers of a checkpoint (num_nextn_predict_layers) are not loaded by the plain model.
"""

from routelens.errors import RouteLensError
from routelens.models.adapter import MoEAdapter
from routelens.models.gates import LAGUNA
from routelens.models.spec import Tower


class Step3p7Adapter(MoEAdapter):
    gate = LAGUNA
    tower = Tower()

    def __init__(self, model):
        if getattr(model.config, "use_bidirectional_attention", False):
            raise RouteLensError("this step3p7 checkpoint sets use_bidirectional_attention: its attention lets a token "
                                 "see later tokens, so a text has no causal trajectory to score")
        super().__init__(model)

    def routed_scale(self, layer: int) -> float:
        return float(self.config.moe_router_scaling_factor)
