"""Mistral 4 (Mistral Small 4): DeepSeek-V3's decoder (MLA attention, first_k_dense_replace
dense layers, then a MoE block of routed experts plus shared experts) with a softmax router:
scores = softmax(logits) (in the model's dtype), experts chosen by score within the top
topk_group of n_group groups (a group's score: the sum of its top-2 scores; no correction
bias), weighted by the chosen scores / (their sum + 1e-20) if norm_topk_prob, times
routed_scaling_factor. The shared experts do not depend on the route (they cancel in the
fast engine's algebra); MLA queries are scaled by position (Llama 4's attention scale,
read from position_ids, which the engines pass per row), inside the attention module.

What is counterfactual: the routed experts' choice and weights at one MoE layer; the
layers above route their perturbed states as the model does. Alternatives are drawn from
the groups the router admitted.

Two checkpoint forms:
- a text-only checkpoint (config.json: "mistral4") is built by Mistral4ForCausalLM, which
  transformers' AutoModelForCausalLM does not map: the family declares it (`causal_lm`);
- the multimodal Mistral Small 4 (config.json: "mistral3", a Pixtral encoder around a
  Mistral 4 text model) is served through its text model (`spec.Tower`), image tokens
  absent; a mistral3 checkpoint whose text model is not Mistral 4 (Mistral Small 3's dense
  one) is refused in one line.
"""

from routelens.errors import RouteLensError
from routelens.models.adapter import MoEAdapter
from routelens.models.gates import MISTRAL4
from routelens.models.spec import Layout, Tower


class Mistral4Adapter(MoEAdapter):
    gate = MISTRAL4
    layout = Layout(windows="none")   # DeepSeek-V3's mask builder: plain causal, whatever sliding_window says
    causal_lm = "Mistral4ForCausalLM"


class Mistral3Adapter(Mistral4Adapter):
    """The text model of a multimodal Mistral Small 4 checkpoint (Mistral3ForConditionalGeneration)."""

    tower = Tower(placeholders=("image_token_id",))

    @classmethod
    def check_config(cls, config) -> None:
        """Before any weight is read: a mistral3 checkpoint around another text model (Mistral
        Small 3's dense one) has no routed expert to audit."""
        text_config = getattr(config, "text_config", config)
        _refuse_other_text_model(text_config.model_type)

    def __init__(self, model):
        _refuse_other_text_model(model.config.model_type)   # a model wrapped by rl.wrap, too
        super().__init__(model)


def _refuse_other_text_model(text_type: str) -> None:
    if text_type != "mistral4":
        raise RouteLensError(f"this mistral3 checkpoint's text model is {text_type!r}, not Mistral 4's MoE: "
                             "routelens serves mistral3 checkpoints of Mistral Small 4 (a text model with routed "
                             "experts); a dense text model has no router to audit")
