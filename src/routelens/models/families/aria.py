"""Aria (rhymes-ai), served through its text model (`vision_language`): every decoder layer a
MoE block whose router chooses top-k on the raw logits and weights the k by a softmax over
them (GPT-OSS's and Granite's rule, no bias), with shared experts always added; its experts
store their projections transposed (in, out), one slice per expert all the same."""

from routelens.models.adapter import MoEAdapter
from routelens.models.gates import TOPK_THEN_SOFTMAX
from routelens.models.spec import Layout, Tower


class AriaAdapter(MoEAdapter):
    gate = TOPK_THEN_SOFTMAX
    layout = Layout(windows="none")   # "no sliding" (its mask builder)
    tower = Tower(placeholders=("image_token_index",))
